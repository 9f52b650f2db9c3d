// Package faultenv starts throwaway PostgreSQL and Redis servers for fault
// injection tests and lets the test kill, stop and restart them.
//
// Each server lives in a temporary directory of its own, listens on a free
// port of 127.0.0.1 and is stopped and removed when the test ends. Startup
// waits for the server to answer (pg_isready, PING), never for a fixed time.
// When the server binaries are missing the test is skipped with a reason
// saying what to install.
//
// These servers are the test's alone: stopping, restarting or flushing them
// never touches the shared services a developer may run on 5432 or 6379.
package faultenv

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// startTimeout bounds how long a server may take to answer after it was
// started.
const startTimeout = 30 * time.Second

// freePort asks the kernel for a free TCP port on 127.0.0.1. Another
// process could take it before the server binds it; that is rare enough for
// tests, and the server then fails to start with a clear log.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("faultenv: find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// server is a process the test started and may stop again.
type server struct {
	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // its exit status, valid after done
}

// start runs cmd and watches it exit.
func (s *server) start(cmd *exec.Cmd) error {
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
	go func() {
		err := cmd.Wait()
		s.mu.Lock()
		s.err = err
		s.mu.Unlock()
		close(done)
	}()
	return nil
}

// running reports whether the process is alive, and its done channel.
func (s *server) running() (bool, chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return false, nil
	}
	select {
	case <-s.done:
		return false, s.done
	default:
		return true, s.done
	}
}

// signal sends sig and, when wait is set, waits up to d for the process to
// exit, then kills it.
func (s *server) stop(sig syscall.Signal, d time.Duration) error {
	alive, done := s.running()
	if !alive {
		return nil
	}
	s.mu.Lock()
	p := s.cmd.Process
	s.mu.Unlock()
	if err := p.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("faultenv: signal %v: %w", sig, err)
	}
	select {
	case <-done:
		return nil
	case <-time.After(d):
	}
	_ = p.Kill()
	<-done
	return fmt.Errorf("faultenv: process %d did not exit within %v of %v; killed", p.Pid, d, sig)
}

// pid returns the server's process id, 0 when it is not running.
func (s *server) pid() int {
	if alive, _ := s.running(); !alive {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd.Process.Pid
}

// waitReady calls probe until it succeeds, the process exits or the start
// timeout passes. Probes are cheap and quick; the pause between them only
// keeps a slow start from spinning a core.
func (s *server) waitReady(what, logPath string, probe func() error) error {
	deadline := time.Now().Add(startTimeout)
	_, done := s.running()
	var err error
	for pause := 5 * time.Millisecond; ; pause = min(pause*2, 100*time.Millisecond) {
		if err = probe(); err == nil {
			return nil
		}
		if done != nil {
			select {
			case <-done:
				return fmt.Errorf("faultenv: %s exited during startup (%v)%s", what, s.err, logTail(logPath, 20))
			default:
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("faultenv: %s not ready after %v: %v%s", what, startTimeout, err, logTail(logPath, 20))
		}
		time.Sleep(pause)
	}
}

// logTail returns the last n lines of a log file, indented, for an error.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "\n\tlog " + path + ":\n\t\t" + strings.Join(lines, "\n\t\t")
}
