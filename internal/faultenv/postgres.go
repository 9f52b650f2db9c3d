package faultenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Postgres is a throwaway PostgreSQL server: one data directory, one port,
// trust authentication for the "postgres" user, fsync off (a server that
// dies keeps every commit it acknowledged; only a crash of the machine
// would lose some). It can be
// stopped and started again on the same port and data directory.
type Postgres struct {
	tb      testing.TB
	bin     string // directory of initdb, postgres, pg_isready
	dir     string // temporary directory holding everything below
	data    string
	sock    string // directory of the unix socket
	logPath string
	port    int
	db      string
	cred    *syscall.Credential // the postgres user's, when running as root

	srv server
}

// Database is the name of the database StartPostgres creates.
const Database = "faultenv"

// PostgresBinDir returns the directory holding initdb and postgres:
// $TASKING_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin, else the
// directory of initdb on PATH. It returns "" when none is found.
func PostgresBinDir() string {
	has := func(dir string) bool {
		for _, b := range []string{"initdb", "postgres", "pg_isready"} {
			if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || fi.IsDir() {
				return false
			}
		}
		return true
	}
	if d := os.Getenv("TASKING_PG_BINDIR"); d != "" {
		if has(d) {
			return d
		}
		return ""
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { // newest major version first
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
		return vi > vj
	})
	for _, d := range dirs {
		if has(d) {
			return d
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil && has(filepath.Dir(p)) {
		return filepath.Dir(p)
	}
	return ""
}

// StartPostgres initialises a cluster in a temporary directory, starts it on
// a free port of 127.0.0.1, creates the database [Database] and returns once
// it accepts connections. It skips the test when the server binaries are
// missing, and stops the server and removes its directory when the test
// ends. PostgreSQL refuses to run as root; as root the server runs as the
// "postgres" system user.
func StartPostgres(tb testing.TB) *Postgres {
	tb.Helper()
	bin := PostgresBinDir()
	if bin == "" {
		tb.Skip("faultenv: PostgreSQL server binaries (initdb, postgres, pg_isready) not found in " +
			"$TASKING_PG_BINDIR, /usr/lib/postgresql/*/bin or PATH; install postgresql to run this test")
	}
	p := &Postgres{tb: tb, bin: bin, db: Database}
	uid, gid := -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			tb.Skip("faultenv: running as root, and PostgreSQL refuses root; no \"postgres\" user to run it as: " + err.Error())
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
		p.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	dir, err := os.MkdirTemp("", "faultenv-pg-")
	if err != nil {
		tb.Fatalf("faultenv: %v", err)
	}
	p.dir = dir
	tb.Cleanup(func() {
		if err := p.Stop(); err != nil {
			tb.Logf("faultenv: stop PostgreSQL: %v", err)
		}
		_ = os.RemoveAll(dir)
	})
	p.data = filepath.Join(dir, "data")
	p.sock = filepath.Join(dir, "sock")
	p.logPath = filepath.Join(dir, "postgres.log")
	if err := os.Mkdir(p.sock, 0o700); err != nil {
		tb.Fatalf("faultenv: %v", err)
	}
	if p.cred != nil {
		for _, d := range []string{dir, p.sock} {
			if err := os.Chown(d, uid, gid); err != nil {
				tb.Fatalf("faultenv: hand %s to the postgres user: %v", d, err)
			}
		}
	}

	initdb := p.command("initdb", "-D", p.data, "-U", "postgres", "--auth=trust",
		"--no-sync", "--no-instructions", "--encoding=UTF8", "--locale=C")
	if out, err := initdb.CombinedOutput(); err != nil {
		tb.Fatalf("faultenv: initdb: %v\n%s", err, out)
	}
	if p.port, err = freePort(); err != nil {
		tb.Fatal(err)
	}
	if err := p.Start(); err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.url("postgres"))
	if err != nil {
		tb.Fatalf("faultenv: connect to the new server: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{p.db}.Sanitize()); err != nil {
		tb.Fatalf("faultenv: create database: %v", err)
	}
	return p
}

// command builds a command of the server's bin directory, run as the
// postgres user when the test runs as root.
func (p *Postgres) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(p.bin, name), args...)
	cmd.Dir = p.dir // the postgres user may not be able to read the test's cwd
	cmd.Env = append(os.Environ(), "LC_ALL=C", "PGTZ=UTC")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	return cmd
}

// URL returns the connection URL of the database [Database].
func (p *Postgres) URL() string { return p.url(p.db) }

func (p *Postgres) url(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", p.port, db)
}

// Port returns the TCP port the server listens on.
func (p *Postgres) Port() int { return p.port }

// LogPath returns the server's log file.
func (p *Postgres) LogPath() string { return p.logPath }

// PID returns the postmaster's process id, 0 while the server is stopped.
func (p *Postgres) PID() int { return p.srv.pid() }

// Start starts the stopped server again on the same port and data
// directory and returns once it accepts connections. Starting a running
// server is an error.
func (p *Postgres) Start() error {
	if alive, _ := p.srv.running(); alive {
		return fmt.Errorf("faultenv: PostgreSQL is already running on port %d", p.port)
	}
	logf, err := os.OpenFile(p.logPath, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("faultenv: %w", err)
	}
	defer logf.Close() // the server keeps its own descriptor
	cmd := p.command("postgres", "-D", p.data,
		"-p", strconv.Itoa(p.port),
		"-k", p.sock,
		"-c", "listen_addresses=127.0.0.1",
		// fsync off: a dead server loses nothing the kernel has, and only a
		// crash of the machine could lose more. synchronous_commit stays
		// on, so a commit acknowledged before Crash survives it.
		"-c", "fsync=off",
		"-c", "full_page_writes=off",
		"-c", "max_connections=200",
		"-c", "shared_buffers=32MB",
		"-c", "log_min_messages=warning",
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	// If the test process dies, the server shuts down at once (SIGQUIT is
	// PostgreSQL's immediate shutdown) instead of lingering.
	cmd.SysProcAttr.Pdeathsig = syscall.SIGQUIT
	cmd.SysProcAttr.Setpgid = true // keep a terminal's ^C for the test itself
	if err := p.srv.start(cmd); err != nil {
		return fmt.Errorf("faultenv: start postgres: %w", err)
	}
	return p.srv.waitReady(fmt.Sprintf("PostgreSQL on port %d", p.port), p.logPath, p.ready)
}

// ready runs pg_isready against the server's TCP port.
func (p *Postgres) ready() error {
	cmd := p.command("pg_isready", "-q", "-h", "127.0.0.1", "-p", strconv.Itoa(p.port), "-U", "postgres", "-t", "1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pg_isready: %v %s", err, out)
	}
	return nil
}

// Stop shuts the server down in "fast" mode: every session is ended, the
// server checkpoints and exits. It returns once the postmaster has exited.
// Stopping a stopped server does nothing.
func (p *Postgres) Stop() error {
	return p.srv.stop(syscall.SIGINT, 30*time.Second)
}

// Crash shuts the server down in "immediate" mode: every process exits at
// once without a checkpoint, as after a crash; the next Start runs crash
// recovery.
func (p *Postgres) Crash() error {
	return p.srv.stop(syscall.SIGQUIT, 30*time.Second)
}

// Restart stops the server (fast mode) and starts it again on the same port.
func (p *Postgres) Restart() error {
	if err := p.Stop(); err != nil {
		return err
	}
	return p.Start()
}

// TerminateBackends ends, with pg_terminate_backend, every client backend
// matching the SQL condition filter on pg_stat_activity (for example
// "application_name = $1" with args), except the one asking. It returns the
// application names of the backends it ended, one per backend.
func (p *Postgres) TerminateBackends(filter string, args ...any) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.URL())
	if err != nil {
		return nil, fmt.Errorf("faultenv: terminate backends: %w", err)
	}
	defer conn.Close(ctx)
	// MATERIALIZED: the filter is applied before anything is terminated
	// (the planner may evaluate the conditions of one WHERE in any order).
	rows, err := conn.Query(ctx, `WITH m AS MATERIALIZED (
			SELECT pid, application_name FROM pg_stat_activity
			WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' AND (`+filter+`)
		)
		SELECT application_name FROM m WHERE pg_terminate_backend(pid)`, args...)
	if err != nil {
		return nil, fmt.Errorf("faultenv: terminate backends: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("faultenv: terminate backends: %w", err)
	}
	return names, nil
}
