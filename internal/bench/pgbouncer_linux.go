package bench

import "syscall"

// bouncerSysProcAttr puts PgBouncer in a process group of its own, as cred
// when it is set, and has the kernel send it SIGTERM when the bench dies.
func bouncerSysProcAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Credential: cred, Pdeathsig: syscall.SIGTERM}
}
