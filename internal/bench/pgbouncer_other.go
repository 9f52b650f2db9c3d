//go:build !linux

package bench

import "syscall"

// bouncerSysProcAttr puts PgBouncer in a process group of its own, as cred
// when it is set.
func bouncerSysProcAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Credential: cred}
}
