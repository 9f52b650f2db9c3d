package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// pgBouncer is a throwaway PgBouncer in transaction pooling mode in front
// of the bench's PostgreSQL, for the worker processes (-pgbouncer N): its
// config, pidfile and log live in a temp dir that goes with it. It runs in
// a process group of its own, so a Ctrl-C in the terminal reaches the bench
// (which then stops its workers first, and PgBouncer last), and on Linux it
// gets SIGTERM if the bench dies without stopping it.
type pgBouncer struct {
	dir     string
	port    int
	dsn     string // the bench's database through PgBouncer
	version string
	cmd     *exec.Cmd
	exited  chan struct{}

	mu    sync.Mutex
	admin *pgx.Conn // the admin console (database "pgbouncer")
}

// findPgBouncer returns the pgbouncer binary's path, if there is one.
func findPgBouncer() (string, bool) {
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p, true
	}
	// Debian's package puts it in /usr/sbin, which a user's PATH may lack.
	for _, p := range []string{"/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"} {
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, true
		}
	}
	return "", false
}

// pgBouncerBin finds the pgbouncer binary; as root with apt-get it installs
// Debian's package when there is none.
func pgBouncerBin() (string, error) {
	if p, ok := findPgBouncer(); ok {
		return p, nil
	}
	const hint = "-pgbouncer needs PgBouncer: install it first (Debian/Ubuntu: sudo apt-get install pgbouncer)"
	if _, err := exec.LookPath("apt-get"); err != nil || os.Geteuid() != 0 {
		return "", errors.New(hint)
	}
	fmt.Fprintln(os.Stderr, "bench: installing pgbouncer with apt-get (running as root)...")
	install := func() error {
		cmd := exec.Command("apt-get", "install", "-y", "-q", "--no-install-recommends", "pgbouncer")
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		return cmd.Run()
	}
	if err := install(); err != nil {
		// Package lists may be missing or stale on a fresh machine.
		upd := exec.Command("apt-get", "update", "-q")
		upd.Stdout, upd.Stderr = os.Stderr, os.Stderr
		if uerr := upd.Run(); uerr != nil || install() != nil {
			return "", fmt.Errorf("apt-get install pgbouncer failed; %s", hint)
		}
	}
	if p, ok := findPgBouncer(); ok {
		return p, nil
	}
	return "", errors.New("installed pgbouncer but found no pgbouncer binary")
}

// startPgBouncer starts a PgBouncer for the database of dsn, with at most
// poolSize server connections and maxClients client connections.
func startPgBouncer(ctx context.Context, dsn string, poolSize, maxClients int) (b *pgBouncer, err error) {
	bin, err := pgBouncerBin()
	if err != nil {
		return nil, err
	}
	pc, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse -dsn: %w", err)
	}
	out, _ := exec.Command(bin, "-V").Output()
	version := strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])

	tmp := "" // $TMPDIR; as root /tmp, which the postgres user can reach
	if os.Geteuid() == 0 {
		tmp = "/tmp"
	}
	dir, err := os.MkdirTemp(tmp, "tasking-bench-pgbouncer-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(dir)
		}
	}()
	// PgBouncer refuses to run as root: as root, run it as the postgres
	// user (which the PostgreSQL packages create), else nobody.
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		u, uerr := user.Lookup("postgres")
		if uerr != nil {
			if u, uerr = user.Lookup("nobody"); uerr != nil {
				return nil, fmt.Errorf("pgbouncer must not run as root, and there is no postgres or nobody user: %w", uerr)
			}
		}
		uid, _ := strconv.ParseUint(u.Uid, 10, 32)
		gid, _ := strconv.ParseUint(u.Gid, 10, 32)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}

	q := func(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
	target := fmt.Sprintf("host=%s port=%d dbname=%s user=%s", q(pc.Host), pc.Port, q(pc.Database), q(pc.User))
	if pc.Password != "" {
		target += " password=" + q(pc.Password)
	}
	var lastErr error
	for range 3 { // the free port may be taken before PgBouncer binds it
		port, perr := freePort()
		if perr != nil {
			return nil, perr
		}
		ini := fmt.Sprintf(`[databases]
%s = %s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
admin_users = %s
pool_mode = transaction
default_pool_size = %d
max_db_connections = %d
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = %d
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = %s
pidfile = %s
`, pc.Database, target, port, filepath.Join(dir, "userlist.txt"), pc.User, poolSize, poolSize, maxClients,
			filepath.Join(dir, "pgbouncer.log"), filepath.Join(dir, "pgbouncer.pid"))
		files := map[string]string{
			"pgbouncer.ini": ini,
			"userlist.txt":  fmt.Sprintf("%q \"\"\n", pc.User),
		}
		for name, body := range files {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
				return nil, err
			}
		}
		if cred != nil {
			for _, p := range []string{dir, filepath.Join(dir, "pgbouncer.ini"), filepath.Join(dir, "userlist.txt")} {
				if err := os.Chown(p, int(cred.Uid), int(cred.Gid)); err != nil {
					return nil, err
				}
			}
		}
		b = &pgBouncer{dir: dir, port: port, version: version, exited: make(chan struct{})}
		b.cmd = exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
		b.cmd.SysProcAttr = bouncerSysProcAttr(cred)
		if err := b.cmd.Start(); err != nil {
			return nil, fmt.Errorf("start pgbouncer: %w", err)
		}
		go func() { _ = b.cmd.Wait(); close(b.exited) }()
		u := url.URL{Scheme: "postgres", User: url.User(pc.User), Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
			Path: "/" + pc.Database, RawQuery: "sslmode=disable"}
		b.dsn = u.String()
		if lastErr = b.waitReady(ctx, pc.User); lastErr == nil {
			return b, nil
		}
		b.kill()
	}
	return nil, fmt.Errorf("pgbouncer did not start: %w%s", lastErr, logTail(filepath.Join(dir, "pgbouncer.log")))
}

// waitReady connects to the admin console, for up to 10 s.
func (b *pgBouncer) waitReady(ctx context.Context, usr string) error {
	cc, err := pgx.ParseConfig(fmt.Sprintf("postgres://%s@127.0.0.1:%d/pgbouncer?sslmode=disable",
		url.User(usr).String(), b.port))
	if err != nil {
		return err
	}
	// The admin console speaks the simple query protocol only.
	cc.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	deadline := time.Now().Add(10 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		conn, err := pgx.ConnectConfig(cctx, cc)
		cancel()
		if err == nil {
			b.admin = conn
			return nil
		}
		select {
		case <-b.exited:
			return errors.New("pgbouncer exited")
		default:
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		if serr := sleep(ctx, 50*time.Millisecond); serr != nil {
			return serr
		}
	}
}

// stop ends PgBouncer (SIGTERM: at once, it has no more clients by now)
// and removes its temp dir.
func (b *pgBouncer) stop() {
	b.mu.Lock()
	if b.admin != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = b.admin.Close(ctx)
		cancel()
		b.admin = nil
	}
	b.mu.Unlock()
	b.kill()
	_ = os.RemoveAll(b.dir)
}

func (b *pgBouncer) kill() {
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.exited:
	case <-time.After(5 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.exited
	}
}

// cpu returns the CPU seconds PgBouncer has used.
func (b *pgBouncer) cpu() float64 {
	c, _ := procCPU(b.cmd.Process.Pid)
	return c
}

// show runs an admin console SHOW and returns the values of column col of
// every row, as text.
func (b *pgBouncer) show(ctx context.Context, what, col string) ([]string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.admin == nil {
		return nil, errors.New("pgbouncer stopped")
	}
	rows, err := b.admin.Query(ctx, "SHOW "+what)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	idx := -1
	for i, fd := range rows.FieldDescriptions() {
		if fd.Name == col {
			idx = i
		}
	}
	if idx < 0 {
		return nil, fmt.Errorf("SHOW %s has no column %s", what, col)
	}
	var out []string
	for rows.Next() {
		vals := rows.RawValues()
		out = append(out, string(vals[idx]))
	}
	return out, rows.Err()
}

// serverPIDs returns the backend pids of PgBouncer's server connections.
func (b *pgBouncer) serverPIDs(ctx context.Context) ([]uint32, error) {
	vals, err := b.show(ctx, "SERVERS", "remote_pid")
	if err != nil {
		return nil, err
	}
	var pids []uint32
	for _, v := range vals {
		if p, err := strconv.ParseUint(v, 10, 32); err == nil && p > 0 {
			pids = append(pids, uint32(p))
		}
	}
	return pids, nil
}

// clientPorts returns the client ports of PgBouncer's client connections.
func (b *pgBouncer) clientPorts(ctx context.Context) ([]int, error) {
	vals, err := b.show(ctx, "CLIENTS", "port")
	if err != nil {
		return nil, err
	}
	var ports []int
	for _, v := range vals {
		if p, err := strconv.Atoi(v); err == nil {
			ports = append(ports, p)
		}
	}
	return ports, nil
}

// freePort returns a TCP port on 127.0.0.1 that nothing listens on now.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// logTail returns the last lines of a log file, to explain a failure.
func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	lines = lines[max(0, len(lines)-10):]
	return "\n" + path + ":\n" + string(bytes.Join(lines, []byte("\n")))
}
