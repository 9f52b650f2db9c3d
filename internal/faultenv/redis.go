package faultenv

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Redis is a throwaway redis-server without persistence: a restart starts
// it empty, as after a crash of a cache-only deployment.
type Redis struct {
	tb      testing.TB
	bin     string
	dir     string
	logPath string
	port    int
	args    []string // extra redis-server arguments

	srv server
}

// RedisServerPath returns $TASKING_REDIS_SERVER or redis-server from PATH,
// "" when neither is found.
func RedisServerPath() string {
	if p := os.Getenv("TASKING_REDIS_SERVER"); p != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
		return ""
	}
	p, err := exec.LookPath("redis-server")
	if err != nil {
		return ""
	}
	return p
}

// StartRedis starts redis-server on a free port of 127.0.0.1 with
// persistence off and returns once it answers PING. Extra arguments go to
// redis-server (e.g. "--cluster-enabled", "yes"). It skips the test when
// redis-server is missing and stops the server when the test ends.
func StartRedis(tb testing.TB, args ...string) *Redis {
	tb.Helper()
	bin := RedisServerPath()
	if bin == "" {
		tb.Skip("faultenv: redis-server not found in $TASKING_REDIS_SERVER or PATH; install redis-server to run this test")
	}
	r := &Redis{tb: tb, bin: bin, dir: tb.TempDir(), args: args}
	r.logPath = filepath.Join(r.dir, "redis.log")
	var err error
	if r.port, err = freePort(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := r.Stop(); err != nil {
			tb.Logf("faultenv: stop Redis: %v", err)
		}
	})
	if err := r.Start(); err != nil {
		tb.Fatal(err)
	}
	return r
}

// Addr returns the server's host:port.
func (r *Redis) Addr() string { return "127.0.0.1:" + strconv.Itoa(r.port) }

// LogPath returns the server's log file.
func (r *Redis) LogPath() string { return r.logPath }

// PID returns the server's process id, 0 while it is stopped.
func (r *Redis) PID() int { return r.srv.pid() }

// Start starts the stopped server again on the same port, empty, and
// returns once it answers PING.
func (r *Redis) Start() error {
	if alive, _ := r.srv.running(); alive {
		return fmt.Errorf("faultenv: Redis is already running on port %d", r.port)
	}
	logf, err := os.OpenFile(r.logPath, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("faultenv: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(r.bin, append([]string{
		"--port", strconv.Itoa(r.port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", r.dir,
		"--protected-mode", "no",
		"--daemonize", "no",
	}, r.args...)...)
	cmd.Dir = r.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := r.srv.start(cmd); err != nil {
		return fmt.Errorf("faultenv: start redis-server: %w", err)
	}
	return r.srv.waitReady(fmt.Sprintf("Redis on port %d", r.port), r.logPath, func() error {
		reply, err := r.Do("PING")
		if err == nil && reply != "PONG" {
			err = fmt.Errorf("PING answered %q", reply)
		}
		return err
	})
}

// Stop shuts the server down (SIGTERM; nothing is saved) and returns once
// it has exited. Stopping a stopped server does nothing.
func (r *Redis) Stop() error { return r.srv.stop(syscall.SIGTERM, 10*time.Second) }

// Kill ends the server with SIGKILL and returns once it has exited.
func (r *Redis) Kill() error { return r.srv.stop(syscall.SIGKILL, 10*time.Second) }

// Restart stops the server and starts it again, empty, on the same port.
func (r *Redis) Restart() error {
	if err := r.Stop(); err != nil {
		return err
	}
	return r.Start()
}

// FlushAll deletes every key of every database.
func (r *Redis) FlushAll() error {
	reply, err := r.Do("FLUSHALL")
	if err == nil && reply != "OK" {
		err = fmt.Errorf("FLUSHALL answered %q", reply)
	}
	return err
}

// Do sends one command on a fresh connection and returns a simple-string,
// integer or bulk-string reply as text. Error replies are returned as
// errors. It is meant for the few admin commands a fault test needs, not as
// a client.
func (r *Redis) Do(args ...string) (string, error) {
	conn, err := net.DialTimeout("tcp", r.Addr(), time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := conn.Write([]byte(b.String())); err != nil {
		return "", err
	}
	br := bufio.NewReader(conn)
	line, err := br.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return "", fmt.Errorf("faultenv: empty Redis reply")
	}
	switch line[0] {
	case '+', ':':
		return line[1:], nil
	case '-':
		return "", fmt.Errorf("faultenv: Redis: %s", line[1:])
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return "", err
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(br, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("faultenv: unexpected Redis reply %q", line)
}
