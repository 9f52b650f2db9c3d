package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/pprof"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

// workerSpec is what one worker process runs. It goes to a child process
// as JSON.
type workerSpec struct {
	DSN        string        `json:"dsn"`
	Schema     string        `json:"schema"`
	Locker     string        `json:"locker"` // "pg" or "redis"
	Redis      string        `json:"redis"`
	Namespace  string        `json:"namespace"`
	Slots      int           `json:"slots"`
	PoolConns  int32         `json:"pool_conns"`  // 0: pgx's default
	Conns      int           `json:"conns"`       // tasking.WithConnections; 0: its default
	ClaimAhead int           `json:"claim_ahead"` // tasking.WithClaimAhead; -1: its default
	Body       time.Duration `json:"body"`
	Poll       time.Duration `json:"poll"`
	Index      int           `json:"index"`
	CPUProfile string        `json:"cpuprofile"`
	LogLevel   string        `json:"log_level"`
	PgBouncer  bool          `json:"pgbouncer"` // DSN is a PgBouncer in transaction pooling mode
	// Progress is how often the process reports its count, when it
	// changed (0: 200 ms). Every report wakes the process and the bench:
	// in a fleet of 80 idle processes a 200 ms report was about half of
	// the workers' CPU on the 2-core machine. The bench sees the end of a
	// drain up to one interval late (drain_wall_seconds, -stop-after);
	// rates come from the tasks table and are not affected.
	Progress time.Duration `json:"progress"`
	// Deployment settings (0: the defaults): GOMAXPROCS, and the rueidis
	// client's Dialer.KeepAlive, which is also its idle PING interval.
	MaxProcs       int           `json:"maxprocs,omitempty"`
	RedisKeepAlive time.Duration `json:"redis_keepalive,omitempty"`
}

// msg is one report from a worker process to the bench: a new connection
// (backend pid, local port) or a failed connection attempt, readiness,
// progress, the final counts, or an error.
type msg struct {
	PID     uint32      `json:"pid,omitempty"`
	Port    int         `json:"port,omitempty"`
	ConnErr bool        `json:"conn_err,omitempty"`
	Ready   bool        `json:"ready,omitempty"`
	Done    int64       `json:"done,omitempty"`
	Final   *procReport `json:"final,omitempty"`
	Err     string      `json:"err,omitempty"`
}

// procReport is what a worker process counted over its run.
type procReport struct {
	Stmts      stmtCounts       `json:"stmts"`
	Redis      map[string]int64 `json:"redis"`
	CPUSeconds float64          `json:"cpu_seconds"` // user+system of the process while the worker ran
	Done       int64            `json:"done"`
}

// newPool opens a pool whose statements tr counts.
func newPool(ctx context.Context, dsn string, maxConns int32, tr *stmtTracer, app string) (*pgxpool.Pool, error) {
	return newPoolMode(ctx, dsn, maxConns, tr, app, false)
}

// newPoolMode is newPool, for a PgBouncer in transaction pooling mode when
// bouncer is set: a transaction may run on any server connection, so no
// named prepared statements (pgx's default statement cache). The Exec mode
// sends each statement as an unnamed one in a single round trip.
func newPoolMode(ctx context.Context, dsn string, maxConns int32, tr *stmtTracer, app string, bouncer bool) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse -dsn: %w", err)
	}
	if bouncer {
		cfg.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
	}
	if maxConns > 0 {
		cfg.MaxConns = maxConns
	}
	if tr != nil {
		cfg.ConnConfig.Tracer = tr
	}
	if app != "" {
		cfg.ConnConfig.RuntimeParams["application_name"] = app
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("PostgreSQL not reachable: %w", err)
	}
	return pool, nil
}

func logger(level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelWarn
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

// runWorker runs one worker process's worker: it connects, reports ready,
// waits for start, runs until ctx is done, and reports its counts. emit
// must be safe for concurrent use.
func runWorker(ctx context.Context, spec workerSpec, start <-chan struct{}, emit func(msg)) error {
	tr := newStmtTracer(func(ev connEvent) { emit(msg{PID: ev.PID, Port: ev.Port, ConnErr: ev.Failed}) })
	setupCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	pool, err := connectRetrying(setupCtx, spec, tr)
	if err != nil {
		return err
	}
	defer pool.Close()
	// The worker runs on connections of its own (taking the pool's
	// settings); the connection the check above opened would only sit idle
	// and count against max_connections.
	pool.Reset()
	cmds := newCmdCounter()
	var closeRedis func()
	locker := tasking.NewPostgresLocker()
	if spec.Locker == "redis" {
		env, err := openRedis(setupCtx, spec.Redis, spec.RedisKeepAlive)
		if err != nil {
			return err
		}
		closeRedis = env.close
		locker = env.locker(spec.Namespace, cmds)
	}
	if closeRedis != nil {
		defer closeRedis()
	}
	log := logger(spec.LogLevel)
	client, err := tasking.New(pool, tasking.WithSchema(spec.Schema), tasking.WithLocker(locker), tasking.WithLogger(log))
	if err != nil {
		return err
	}
	wopts := []tasking.WorkerOption{tasking.WithSlots(spec.Slots), tasking.WithPollInterval(spec.Poll),
		tasking.WithWorkerName(fmt.Sprintf("bench-%s-%d-%d", spec.Locker, spec.Index, os.Getpid()))}
	if spec.Conns > 0 {
		wopts = append(wopts, tasking.WithConnections(spec.Conns))
	}
	if spec.ClaimAhead >= 0 {
		wopts = append(wopts, tasking.WithClaimAhead(spec.ClaimAhead))
	}
	w := tasking.NewWorker(client, wopts...)
	var done atomic.Int64
	body := spec.Body
	handler := func(ctx context.Context, _ *tasking.Task) error {
		if body > 0 {
			t := time.NewTimer(body)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
		}
		done.Add(1)
		return nil
	}
	for _, n := range taskNames {
		w.Handle(n, handler)
	}
	emit(msg{Ready: true})
	select {
	case <-start:
	case <-ctx.Done():
		return nil
	}
	if spec.CPUProfile != "" {
		f, err := os.Create(spec.CPUProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return err
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	cpu0 := processCPU()
	errc := make(chan error, 1)
	go func() { errc <- w.Run(ctx) }()
	every := spec.Progress
	if every <= 0 {
		every = 200 * time.Millisecond
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	var runErr error
	var sent int64
loop:
	for {
		select {
		case runErr = <-errc:
			break loop
		case <-tick.C:
			if n := done.Load(); n != sent {
				sent = n
				emit(msg{Done: n})
			}
		}
	}
	emit(msg{Done: done.Load()})
	rep := &procReport{Stmts: tr.snapshot(), Redis: cmds.snapshot(), CPUSeconds: processCPU() - cpu0, Done: done.Load()}
	emit(msg{Final: rep})
	return runErr
}

// connectRetrying opens the worker's pool and its first connection. A
// server out of connection slots (a big fleet on a small max_connections)
// is what the bench is there to show, not a reason to give up: it tries
// again until ctx ends, and every failure is counted.
func connectRetrying(ctx context.Context, spec workerSpec, tr *stmtTracer) (*pgxpool.Pool, error) {
	// Each process's connections are named apart, for an operator looking
	// at pg_stat_activity (the bench itself tells them apart by backend pid
	// and client port; the PostgreSQL locker renames its lock connection).
	// Not through PgBouncer: it would SET application_name on every server
	// connection that passes from one process to another.
	app := fmt.Sprintf("tasking_bench w%d", spec.Index)
	if spec.PgBouncer {
		app = "tasking_bench worker"
	}
	backoff := 100 * time.Millisecond
	for {
		pool, err := newPoolMode(ctx, spec.DSN, spec.PoolConns, tr, app, spec.PgBouncer)
		if err == nil || ctx.Err() != nil || !retryableConnErr(err) {
			return pool, err
		}
		if serr := sleep(ctx, backoff); serr != nil {
			return nil, fmt.Errorf("%w (still failing when giving up: %v)", serr, err)
		}
		backoff = min(2*backoff, time.Second)
	}
}

// retryableConnErr tells a server that is full (too_many_connections,
// cannot_connect_now) or a PgBouncer queue that timed out from a mistake
// in the settings.
func retryableConnErr(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code == "53300" || pgErr.Code == "57P03" || pgErr.Code == "08P01" && strings.Contains(pgErr.Message, "timeout")
	}
	return false
}

// processCPU returns the user+system CPU seconds this process has used.
func processCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}
