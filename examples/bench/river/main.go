// Command river measures River (github.com/riverqueue/river), a Go job queue
// on PostgreSQL without resource locking, the way examples/bench measures
// tasking, so the two can be compared in one session: no-op jobs, a backlog
// inserted first and then drained by -workers in all, in this process or
// split over -procs child processes (this program re-executed), and jobs/s
// by the database clock: jobs / (last finalized_at − first attempted_at).
//
// It is a module of its own so that tasking's module never requires River.
// It works in its own schema (created and migrated with rivermigrate),
// empties its river_job table at start and at the end, and touches nothing
// else.
//
//	go run . -n 30000 -workers 80 -procs 4 -json
package main

import (
	"bufio"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
)

// childEnv marks a worker child process; its value is the childSpec as JSON.
const childEnv = "TASKING_RIVERBENCH_CHILD"

const dsnFallback = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

type config struct {
	DSN      string        `json:"-"`
	Schema   string        `json:"schema"`
	Jobs     int           `json:"jobs"`
	Workers  int           `json:"workers"`
	Procs    int           `json:"procs"`
	Pool     int32         `json:"pool_conns"`
	Cooldown time.Duration `json:"-"`
	Poll     time.Duration `json:"-"`
	Batch    int           `json:"-"`
	Drop     bool          `json:"-"`
}

// childSpec is what one worker child runs.
type childSpec struct {
	DSN      string        `json:"dsn"`
	Schema   string        `json:"schema"`
	Workers  int           `json:"workers"`
	Pool     int32         `json:"pool"`
	Cooldown time.Duration `json:"cooldown"`
	Poll     time.Duration `json:"poll"`
	AppName  string        `json:"app_name"`
}

// result is the -json line.
type result struct {
	System              string  `json:"system"`
	Version             string  `json:"version"`
	Jobs                int64   `json:"jobs"`
	Workers             int     `json:"workers"`
	Procs               int     `json:"procs"`
	Cooldown            string  `json:"cooldown"`
	Poll                string  `json:"poll"`
	Seconds             float64 `json:"seconds"`
	JobsPerSecond       float64 `json:"jobs_per_s"`
	InsertSeconds       float64 `json:"insert_seconds"`
	PeakConns           int     `json:"peak_pg_connections"`
	PeakConnsPerProcess int     `json:"peak_pg_connections_per_process"`
}

type noopArgs struct{}

func (noopArgs) Kind() string { return "noop" }

type noopWorker struct {
	river.WorkerDefaults[noopArgs]
	done *atomic.Int64
}

func (w *noopWorker) Work(context.Context, *river.Job[noopArgs]) error {
	w.done.Add(1)
	return nil
}

func main() {
	if s := os.Getenv(childEnv); s != "" {
		os.Exit(childMain(s))
	}
	var cfg config
	flag.StringVar(&cfg.DSN, "dsn", "", "PostgreSQL URL (default $TASKING_DATABASE_URL, else "+dsnFallback+")")
	flag.StringVar(&cfg.Schema, "schema", "tasking_bench_river", "schema of River's tables (created and migrated; its river_job is emptied)")
	flag.IntVar(&cfg.Jobs, "n", 30000, "jobs in the backlog")
	flag.IntVar(&cfg.Workers, "workers", 80, "River workers in all, split between the processes")
	flag.IntVar(&cfg.Procs, "procs", 1, "worker processes; more than 1 re-executes this program as child workers")
	pool := flag.Int("pool", 0, "max connections of each worker process's pool (0: pgx's default, max(4, cores))")
	flag.DurationVar(&cfg.Cooldown, "cooldown", 2*time.Millisecond, "River's FetchCooldown (River's default is 100ms; 2ms is what River's own benchmark uses)")
	flag.DurationVar(&cfg.Poll, "poll", 20*time.Millisecond, "River's FetchPollInterval (River's default is 1s; 20ms as River's own benchmark)")
	flag.IntVar(&cfg.Batch, "batch", 5000, "jobs per InsertManyFast")
	flag.BoolVar(&cfg.Drop, "drop", false, "drop the schema at the end (for a schema of this run's own)")
	asJSON := flag.Bool("json", false, "print one JSON line instead of text")
	flag.Parse()
	cfg.Pool = int32(*pool)
	cfg.DSN = cmp.Or(cfg.DSN, os.Getenv("TASKING_DATABASE_URL"), dsnFallback)
	if cfg.Procs < 1 || cfg.Workers < cfg.Procs || cfg.Jobs < 1 || cfg.Batch < 1 {
		fmt.Fprintln(os.Stderr, "river: need 1 <= -procs <= -workers, and -n, -batch positive")
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	res, err := run(ctx, cfg)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "river:", err)
		os.Exit(1)
	}
	if *asJSON {
		b, _ := json.Marshal(res)
		fmt.Println(string(b))
		return
	}
	fmt.Printf("river %s: %d jobs, %d workers in %d process(es), cooldown %s, poll %s: %.0f jobs/s (%.2f s); peak PG connections %d, per worker process %d\n",
		res.Version, res.Jobs, res.Workers, res.Procs, res.Cooldown, res.Poll, res.JobsPerSecond, res.Seconds,
		res.PeakConns, res.PeakConnsPerProcess)
}

func riverVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/riverqueue/river" {
				return d.Version
			}
		}
	}
	return "(unknown)"
}

func newPool(ctx context.Context, dsn string, maxConns int32, app string) (*pgxpool.Pool, error) {
	pc, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse -dsn: %w", err)
	}
	if maxConns > 0 {
		pc.MaxConns = maxConns
	}
	pc.ConnConfig.RuntimeParams["application_name"] = app
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, err
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("PostgreSQL not reachable: %w", err)
	}
	return pool, nil
}

func newClient(pool *pgxpool.Pool, schema string, workers int, cooldown, poll time.Duration, done *atomic.Int64) (*river.Client[pgx.Tx], error) {
	ws := river.NewWorkers()
	river.AddWorker(ws, &noopWorker{done: done})
	rc := &river.Config{
		Logger:            slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Schema:            schema,
		Workers:           ws,
		FetchCooldown:     cooldown,
		FetchPollInterval: poll,
	}
	if workers > 0 {
		rc.Queues = map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: workers}}
	}
	return river.NewClient(riverpgxv5.New(pool), rc)
}

func run(ctx context.Context, cfg config) (*result, error) {
	// Every connection of this run carries the run's tag in
	// application_name, so the sampler counts exactly this run's backends,
	// per process.
	var id [4]byte
	_, _ = rand.Read(id[:])
	tag := "riverbench " + hex.EncodeToString(id[:])

	mon, err := newPool(ctx, cfg.DSN, 2, tag+" monitor")
	if err != nil {
		return nil, err
	}
	defer mon.Close()
	schema := pgx.Identifier{cfg.Schema}.Sanitize()
	if _, err := mon.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+schema); err != nil {
		return nil, err
	}
	mig, err := rivermigrate.New(riverpgxv5.New(mon), &rivermigrate.Config{Schema: cfg.Schema,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		return nil, err
	}
	if _, err := mig.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return nil, fmt.Errorf("migrate: %w", err)
	}
	truncate := func(ctx context.Context) error {
		_, err := mon.Exec(ctx, "TRUNCATE "+schema+".river_job")
		return err
	}
	if err := truncate(ctx); err != nil {
		return nil, err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if cfg.Drop {
			_, _ = mon.Exec(cctx, "DROP SCHEMA IF EXISTS "+schema+" CASCADE")
			return
		}
		_ = truncate(cctx)
	}()

	// The backlog, inserted with COPY by an insert-only client.
	ins, err := newPool(ctx, cfg.DSN, 4, tag+" insert")
	if err != nil {
		return nil, err
	}
	insClient, err := newClient(ins, cfg.Schema, 0, cfg.Cooldown, cfg.Poll, new(atomic.Int64))
	if err != nil {
		ins.Close()
		return nil, err
	}
	i0 := time.Now()
	batch := make([]river.InsertManyParams, 0, cfg.Batch)
	for i := 0; i < cfg.Jobs; i += cfg.Batch {
		batch = batch[:0]
		for range min(cfg.Batch, cfg.Jobs-i) {
			batch = append(batch, river.InsertManyParams{Args: noopArgs{}})
		}
		if _, err := insClient.InsertManyFast(ctx, batch); err != nil {
			ins.Close()
			return nil, fmt.Errorf("insert: %w", err)
		}
	}
	insertSecs := time.Since(i0).Seconds()
	ins.Close()

	specs := make([]childSpec, cfg.Procs)
	for i := range specs {
		w := cfg.Workers / cfg.Procs
		if i < cfg.Workers%cfg.Procs {
			w++
		}
		specs[i] = childSpec{DSN: cfg.DSN, Schema: cfg.Schema, Workers: w, Pool: cfg.Pool,
			Cooldown: cfg.Cooldown, Poll: cfg.Poll, AppName: fmt.Sprintf("%s w%d", tag, i)}
	}
	fl, err := startFleet(ctx, specs)
	if err != nil {
		return nil, err
	}
	defer fl.stop()

	smp := &sampler{mon: mon, prefix: tag + " w"}
	sctx, stopSampler := context.WithCancel(ctx)
	var sw sync.WaitGroup
	sw.Add(1)
	go func() { defer sw.Done(); smp.run(sctx, 100*time.Millisecond) }()

	fl.start()
	for {
		var n int64
		if err := mon.QueryRow(ctx, "SELECT count(*) FROM "+schema+".river_job WHERE state = 'completed'").Scan(&n); err != nil {
			stopSampler()
			sw.Wait()
			return nil, err
		}
		if n >= int64(cfg.Jobs) {
			break
		}
		if err := fl.failed(); err != nil {
			stopSampler()
			sw.Wait()
			return nil, err
		}
		select {
		case <-ctx.Done():
			stopSampler()
			sw.Wait()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	stopSampler()
	sw.Wait()

	res := &result{System: "river", Version: riverVersion(), Workers: cfg.Workers, Procs: cfg.Procs,
		Cooldown: cfg.Cooldown.String(), Poll: cfg.Poll.String(), InsertSeconds: insertSecs}
	if err := mon.QueryRow(ctx, `SELECT count(*), coalesce(extract(epoch FROM max(finalized_at) - min(attempted_at)), 0)::float8
		FROM `+schema+`.river_job WHERE state = 'completed'`).Scan(&res.Jobs, &res.Seconds); err != nil {
		return nil, err
	}
	if res.Seconds > 0 {
		res.JobsPerSecond = float64(res.Jobs) / res.Seconds
	}
	res.PeakConns, res.PeakConnsPerProcess = smp.peaks()
	return res, nil
}

// sampler counts the workers' backends in pg_stat_activity by
// application_name (one name per worker process): the peak in all and the
// peak of one process.
type sampler struct {
	mon    *pgxpool.Pool
	prefix string

	mu            sync.Mutex
	peak, peakOne int
}

func (s *sampler) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.sample(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *sampler) sample(ctx context.Context) {
	rows, err := s.mon.Query(ctx, `SELECT count(*) FROM pg_stat_activity
		WHERE starts_with(application_name, $1) GROUP BY application_name`, s.prefix)
	if err != nil {
		return
	}
	all, one := 0, 0
	for rows.Next() {
		var n int
		if rows.Scan(&n) == nil {
			all += n
			one = max(one, n)
		}
	}
	rows.Close()
	s.mu.Lock()
	s.peak, s.peakOne = max(s.peak, all), max(s.peakOne, one)
	s.mu.Unlock()
}

func (s *sampler) peaks() (all, one int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak, s.peakOne
}

// fleet is the worker processes. With one process it runs in this one.
type fleet struct {
	local *localWorker
	kids  []*kid
	exits chan error // a worker process that ended
}

type kid struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	exited chan struct{}
}

type localWorker struct {
	pool   *pgxpool.Pool
	client *river.Client[pgx.Tx]
	ctx    context.Context
}

func startFleet(ctx context.Context, specs []childSpec) (*fleet, error) {
	f := &fleet{exits: make(chan error, len(specs))}
	if len(specs) == 1 {
		s := specs[0]
		pool, err := newPool(ctx, s.DSN, s.Pool, s.AppName)
		if err != nil {
			return nil, err
		}
		client, err := newClient(pool, s.Schema, s.Workers, s.Cooldown, s.Poll, new(atomic.Int64))
		if err != nil {
			pool.Close()
			return nil, err
		}
		f.local = &localWorker{pool: pool, client: client, ctx: ctx}
		return f, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	ready := make(chan int, len(specs))
	for i, s := range specs {
		js, _ := json.Marshal(s)
		cmd := exec.Command(exe)
		cmd.Env = append(os.Environ(), childEnv+"="+string(js))
		cmd.Stderr = os.Stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			f.stop()
			return nil, err
		}
		stdin, err := cmd.StdinPipe()
		if err != nil {
			f.stop()
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			f.stop()
			return nil, err
		}
		k := &kid{cmd: cmd, stdin: stdin, exited: make(chan struct{})}
		f.kids = append(f.kids, k)
		go func() {
			defer close(k.exited)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if sc.Text() == "ready" {
					ready <- i
				}
			}
			err := cmd.Wait()
			if err == nil {
				err = errors.New("exited")
			}
			f.exits <- fmt.Errorf("worker process %d: %w", i, err)
		}()
	}
	timeout := time.After(60 * time.Second)
	for range specs {
		select {
		case <-ready:
		case err := <-f.exits:
			f.stop()
			return nil, fmt.Errorf("did not start: %w", err)
		case <-timeout:
			f.stop()
			return nil, errors.New("worker processes not ready after 60s")
		case <-ctx.Done():
			f.stop()
			return nil, ctx.Err()
		}
	}
	return f, nil
}

func (f *fleet) start() {
	if f.local != nil {
		if err := f.local.client.Start(f.local.ctx); err != nil {
			f.exits <- err
		}
		return
	}
	for _, k := range f.kids {
		_, _ = io.WriteString(k.stdin, "go\n")
	}
}

// failed returns the first worker process that ended early.
func (f *fleet) failed() error {
	select {
	case err := <-f.exits:
		return err
	default:
		return nil
	}
}

// stop stops the workers: end of stdin asks a child to stop; one that has
// not within 15 s is killed.
func (f *fleet) stop() {
	if f.local != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		_ = f.local.client.Stop(ctx)
		cancel()
		f.local.pool.Close()
		f.local = nil
		return
	}
	for _, k := range f.kids {
		_ = k.stdin.Close()
	}
	deadline := time.Now().Add(15 * time.Second)
	for _, k := range f.kids {
		select {
		case <-k.exited:
		case <-time.After(time.Until(deadline)):
			_ = k.cmd.Process.Kill()
			<-k.exited
		}
	}
	f.kids = nil
}

// childMain runs one worker process: it connects and says "ready" on
// stdout, starts on "go" from stdin, and stops at the end of stdin (the
// parent closed it, or is gone).
func childMain(js string) int {
	var s childSpec
	if err := json.Unmarshal([]byte(js), &s); err != nil {
		fmt.Fprintln(os.Stderr, "river child: bad spec:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	pool, err := newPool(ctx, s.DSN, s.Pool, s.AppName)
	if err != nil {
		fmt.Fprintln(os.Stderr, "river child:", err)
		return 1
	}
	defer pool.Close()
	client, err := newClient(pool, s.Schema, s.Workers, s.Cooldown, s.Poll, new(atomic.Int64))
	if err != nil {
		fmt.Fprintln(os.Stderr, "river child:", err)
		return 1
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	started := false
	for in.Scan() {
		if strings.TrimSpace(in.Text()) == "go" && !started {
			if err := client.Start(ctx); err != nil {
				fmt.Fprintln(os.Stderr, "river child:", err)
				return 1
			}
			started = true
		}
	}
	if started {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = client.Stop(sctx)
	}
	return 0
}
