// Package bench is the benchmark program of examples/bench: it dispatches a
// workload into a schema of its own, drains it with a fleet of workers (in
// this process or in child processes), once per locker, and reports
// throughput, waits, statements and commands per task, connections and CPU,
// side by side.
//
// Throughput is Pulp's formula from the tasks table (database clock):
// completed tasks / (last finish − first start). Statements are counted by a
// pgx tracer on the pools' ConnConfig (which the PostgreSQL locker's lock
// connection and the LISTEN connection copy); Redis commands by a wrapper
// around the rueidis client the locker is given, and, server-wide, by INFO
// commandstats.
package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

// Config is the program's flags.
type Config struct {
	Lockers       []string      // "pg", "redis"
	Slots         int           // in all, split between Procs
	Procs         int           // worker processes
	Tasks         int           // tasks per trial
	Workload      string        // see Workloads
	Head          int           // hot: tasks in the blocked head
	Body          time.Duration // handler sleep; 0: return at once
	Mode          string        // "backlog" or "stream"
	Rate          float64       // stream: tasks/s in all; 0: as fast as the dispatchers can
	Dispatchers   int           // backlog: concurrent DispatchMany batches; stream: Dispatch loops
	DispatchProcs int           // stream: processes the Dispatch loops are spread over (1: this one)
	Batch         int           // backlog: tasks per DispatchMany
	StopAfter     int           // stop once this many tasks are done (0: drain all)
	MaxDrain      time.Duration // stop this long after the workers started, and measure the tasks done (0: no limit)
	Repeat        int           // trials per locker, interleaved; the report shows medians
	PoolConns     int32         // worker pool size per process (0: pgx's default)
	Conns         int           // tasking.WithConnections of each worker process (0: its default)
	ClaimAhead    int           // tasking.WithClaimAhead of each worker process (-1: its default)
	Poll          time.Duration // worker fallback poll interval
	Out           string        // output prefix: <out>.json, <out>.svg
	DSN, Redis    string
	CPUProfile    string // prefix of CPU profiles of the worker processes
	Seed          uint64
	LogLevel      string
	Progress      io.Writer // live progress line; nil: none
	PgBouncer     int       // >0: the workers go through a throwaway PgBouncer with this many server connections
	// Deployment settings of the worker processes (0: the defaults).
	WorkerMaxProcs int           // GOMAXPROCS of each worker process
	RedisKeepAlive time.Duration // the workers' rueidis Dialer.KeepAlive, which is also its idle PING interval (default 1s)
}

// Result is one trial: one locker draining one workload once.
type Result struct {
	Locker  string `json:"locker"`
	Variant string `json:"variant,omitempty"` // hot: "head" or "no-head"
	Rep     int    `json:"rep"`
	Schema  string `json:"schema"`

	All    groupStats            `json:"all"`
	ByName map[string]groupStats `json:"by_name"`

	DispatchSeconds float64 `json:"dispatch_seconds"`
	DispatchSplits  int64   `json:"dispatch_batches_split"` // DispatchMany batches that overflowed the lock table
	DispatchRate    float64 `json:"dispatch_tasks_per_s"`

	Stmts        stmtCounts  `json:"-"`
	StmtKinds    []kindCount `json:"stmt_kinds"`
	DispatchStmt int64       `json:"dispatch_statements"`
	WorkerStmt   int64       `json:"worker_statements"`
	StmtPerTask  float64     `json:"statements_per_task"`
	Prepares     int64       `json:"prepares"`
	Listen       int64       `json:"listen_calls"`
	Notify       int64       `json:"notify_calls"`
	SessionLocks int64       `json:"session_advisory_calls"`
	PGSSCalls    *int64      `json:"pg_stat_statements_calls,omitempty"`

	RedisClient      map[string]int64 `json:"redis_commands_client,omitempty"`
	RedisClientTotal int64            `json:"redis_commands_client_total"`
	RedisPerTask     float64          `json:"redis_commands_per_task"`
	RedisServer      int64            `json:"redis_commands_server"` // INFO commandstats delta, server-wide
	RedisServerPer   float64          `json:"redis_commands_server_per_task"`
	RedisCPU         float64          `json:"redis_cpu_seconds"`

	PeakConns      int     `json:"peak_pg_connections"`
	PeakConnsProc  int     `json:"peak_connections_per_worker_process"` // to PostgreSQL, or to PgBouncer with one
	PeakConnsWork  int     `json:"peak_pg_connections_workers"`         // the workers' (through PgBouncer, its servers')
	PeakBouncer    int     `json:"peak_pgbouncer_server_connections,omitempty"`
	ConnErrors     int64   `json:"connection_errors_workers"`  // failed connection attempts
	DispatchConnEr int64   `json:"connection_errors_dispatch"` // failed connection attempts
	LostProcs      []int   `json:"lost_worker_processes,omitempty"`
	LostErr        string  `json:"lost_first_error,omitempty"`
	PgBouncerCPU   float64 `json:"pgbouncer_cpu_seconds,omitempty"`
	WorkerCPU      float64 `json:"worker_process_cpu_seconds"`
	PGWorkerCPU    float64 `json:"pg_backend_cpu_seconds_workers"`
	PGDispatchCPU  float64 `json:"pg_backend_cpu_seconds_dispatch"`
	MachineBusy    float64 `json:"machine_busy_cores"` // average busy cores while draining
	// The oldest transaction of a session not the benchmark's, seen while
	// draining: it holds back the horizon below which dead index entries can
	// be skipped, so every claim reads the entries of every task claimed
	// since it began (60,000-task mix, a 2-minute idle transaction elsewhere:
	// 7,800 index entries read per claim, 1,746 tasks/s instead of 8,600).
	OtherXact float64 `json:"other_session_oldest_transaction_seconds"`
	DrainWall float64 `json:"drain_wall_seconds"`
	// With several worker processes: tasks/s from the moment every one of
	// them had started a task (SteadyFrom seconds after the first start)
	// to the last finish.
	SteadyRate     float64 `json:"steady_tasks_per_s,omitempty"`
	SteadyFrom     float64 `json:"steady_from_s,omitempty"`
	Buckets        []int   `json:"finished_per_100ms"`
	BucketsOf      string  `json:"buckets_of"` // which tasks the buckets count
	WorkersStarted time.Time
}

// Report is everything a run measured.
type Report struct {
	Config  reportConfig `json:"config"`
	Started time.Time    `json:"started"`
	Results []*Result    `json:"results"`
}

type reportConfig struct {
	Lockers       []string `json:"lockers"`
	Workload      string   `json:"workload"`
	Mode          string   `json:"mode"`
	Tasks         int      `json:"tasks"`
	Head          int      `json:"head,omitempty"`
	Slots         int      `json:"slots"`
	Procs         int      `json:"procs"`
	Body          string   `json:"body"`
	Rate          float64  `json:"rate,omitempty"`
	Dispatchers   int      `json:"dispatchers"`
	DispatchProcs int      `json:"dispatch_procs,omitempty"`
	Batch         int      `json:"batch"`
	StopAfter     int      `json:"stop_after,omitempty"`
	MaxDrain      string   `json:"max_drain,omitempty"`
	Repeat        int      `json:"repeat"`
	PoolConns     int32    `json:"pool_conns"`
	Conns         int      `json:"conns,omitempty"`
	ClaimAhead    int      `json:"claim_ahead"` // -1: the library's default
	PgBouncer     int      `json:"pgbouncer_pool,omitempty"`
	PgBouncerV    string   `json:"pgbouncer_version,omitempty"`
	Seed          uint64   `json:"seed"`
	GOMAXPROCS    int      `json:"cores"`
	WorkerProcs   int      `json:"worker_gomaxprocs,omitempty"`
	KeepAlive     string   `json:"redis_keepalive,omitempty"`
}

// Run runs every trial and returns the report. Each trial works in a schema
// and Redis namespace of its own and removes them when it ends, also when
// ctx is canceled (Ctrl-C).
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	var suffix [4]byte
	_, _ = rand.Read(suffix[:])
	base := "tasking_bench_" + hex.EncodeToString(suffix[:])
	mon, err := newPool(ctx, cfg.DSN, 4, nil, "tasking_bench monitor")
	if err != nil {
		return nil, err
	}
	defer mon.Close()
	var redis *redisEnv
	if slices.Contains(cfg.Lockers, "redis") {
		if redis, err = openRedis(ctx, cfg.Redis, 0); err != nil {
			return nil, err
		}
		defer redis.close()
	}
	var bouncer *pgBouncer
	if cfg.PgBouncer > 0 && slices.Contains(cfg.Lockers, "pg") {
		fmt.Fprintln(os.Stderr, "bench: -locker pg behind PgBouncer in transaction pooling mode: the PostgreSQL locker's"+
			" advisory locks and LISTEN need a session of their own; expect the library to refuse it, or the run to fail")
	}
	if cfg.PgBouncer > 0 {
		// Clients: every worker's pool, lock and LISTEN connections, with
		// room to spare; PgBouncer queues them on cfg.PgBouncer servers.
		perProc := int(cfg.PoolConns)
		if perProc == 0 {
			perProc = max(4, numCPU())
		}
		if bouncer, err = startPgBouncer(ctx, cfg.DSN, cfg.PgBouncer, max(1000, cfg.Procs*(perProc+4)+100)); err != nil {
			return nil, err
		}
		defer bouncer.stop()
	}
	rep := &Report{Started: time.Now(), Config: reportConfig{
		Lockers: cfg.Lockers, Workload: cfg.Workload, Mode: cfg.Mode, Tasks: cfg.Tasks, Slots: cfg.Slots,
		Procs: cfg.Procs, Body: bodyString(cfg.Body), Rate: cfg.Rate, Dispatchers: cfg.Dispatchers, DispatchProcs: cfg.DispatchProcs,
		Batch: cfg.Batch, StopAfter: cfg.StopAfter, Repeat: cfg.Repeat, PoolConns: cfg.PoolConns,
		Conns: cfg.Conns, ClaimAhead: cfg.ClaimAhead, PgBouncer: cfg.PgBouncer, Seed: cfg.Seed, GOMAXPROCS: numCPU(),
		WorkerProcs: cfg.WorkerMaxProcs,
	}}
	if cfg.RedisKeepAlive > 0 {
		rep.Config.KeepAlive = cfg.RedisKeepAlive.String()
	}
	if cfg.MaxDrain > 0 {
		rep.Config.MaxDrain = cfg.MaxDrain.String()
	}
	if bouncer != nil {
		rep.Config.PgBouncerV = bouncer.version
	}
	if cfg.Workload == "hot" {
		rep.Config.Head = cfg.Head
	}
	variants := []string{""}
	if cfg.Workload == "hot" {
		variants = []string{"head", "no-head"}
	}
	for r := 1; r <= cfg.Repeat; r++ {
		for _, v := range variants {
			for _, lk := range cfg.Lockers {
				t := &trial{cfg: cfg, mon: mon, redis: redis, bouncer: bouncer, locker: lk, variant: v, rep: r,
					schema: fmt.Sprintf("%s_%s%s_%d", base, lk, variantSuffix(v), r)}
				res, err := t.run(ctx)
				if err != nil {
					return rep, fmt.Errorf("%s%s run %d: %w", lk, variantLabel(v), r, err)
				}
				rep.Results = append(rep.Results, res)
			}
		}
	}
	return rep, nil
}

func variantSuffix(v string) string {
	switch v {
	case "head":
		return "_h"
	case "no-head":
		return "_n"
	}
	return ""
}

func variantLabel(v string) string {
	if v == "" {
		return ""
	}
	return " (" + v + ")"
}

func bodyString(d time.Duration) string {
	if d == 0 {
		return "noop"
	}
	return d.String()
}

func (c *Config) check() error {
	var errs []error
	if len(c.Lockers) == 0 {
		errs = append(errs, errors.New("no locker"))
	}
	for _, l := range c.Lockers {
		if l != "pg" && l != "redis" {
			errs = append(errs, fmt.Errorf("-locker %q: want pg, redis or both", l))
		}
		if l == "redis" && !redisAvailable {
			errs = append(errs, errors.New("-locker redis: this build has no Redis locker (lock_redis.go is not merged yet)"))
		}
	}
	if !slices.Contains(Workloads, c.Workload) {
		errs = append(errs, fmt.Errorf("-workload %q: want one of %v", c.Workload, Workloads))
	}
	if c.Mode != "backlog" && c.Mode != "stream" {
		errs = append(errs, fmt.Errorf("-mode %q: want backlog or stream", c.Mode))
	}
	if c.Procs < 1 || c.Slots < c.Procs {
		errs = append(errs, fmt.Errorf("-procs %d, -slots %d: need 1 <= procs <= slots", c.Procs, c.Slots))
	}
	if c.Tasks < 1 || c.Dispatchers < 1 || c.Batch < 1 || c.Repeat < 1 || c.Rate < 0 || c.Body < 0 {
		errs = append(errs, errors.New("-tasks, -dispatchers, -batch and -repeat must be positive; -rate and -body not negative"))
	}
	if c.DispatchProcs > 1 && (c.Mode != "stream" || c.DispatchProcs > c.Dispatchers) {
		errs = append(errs, fmt.Errorf("-dispatch-procs %d: only with -mode stream, and at most -dispatchers (%d)", c.DispatchProcs, c.Dispatchers))
	}
	if c.Workload == "hot" && (c.Head < 1 || c.Head >= c.Tasks) {
		errs = append(errs, fmt.Errorf("-head %d: need 1 <= head < tasks (%d)", c.Head, c.Tasks))
	}
	if c.MaxDrain < 0 {
		errs = append(errs, errors.New("-max-drain must not be negative"))
	}
	if c.WorkerMaxProcs < 0 || c.RedisKeepAlive < 0 {
		errs = append(errs, errors.New("-worker-maxprocs and -redis-keepalive must not be negative"))
	}
	if c.WorkerMaxProcs > 0 && c.Procs == 1 {
		errs = append(errs, errors.New("-worker-maxprocs: needs -procs > 1 (one worker runs inside the bench's own process)"))
	}
	if c.PgBouncer < 0 {
		errs = append(errs, fmt.Errorf("-pgbouncer %d: want a server pool size, or 0 for none", c.PgBouncer))
	}
	if c.Poll <= 0 {
		c.Poll = time.Second
	}
	return errors.Join(errs...)
}

// trial is one locker draining one workload once.
type trial struct {
	cfg     Config
	mon     *pgxpool.Pool
	redis   *redisEnv
	bouncer *pgBouncer // nil: the workers connect directly
	locker  string
	variant string
	rep     int
	schema  string

	dispatched atomic.Int64
	splits     atomic.Int64 // batches split because they overflowed the lock table
}

func (t *trial) label() string {
	return fmt.Sprintf("%s%s #%d", t.locker, variantLabel(t.variant), t.rep)
}

func (t *trial) run(ctx context.Context) (res *Result, err error) {
	cfg := t.cfg
	res = &Result{Locker: t.locker, Variant: t.variant, Rep: t.rep, Schema: t.schema}
	// Clean up whatever happens, with a context of its own: ctx may be the
	// canceled one of a Ctrl-C.
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if _, derr := t.mon.Exec(cctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{t.schema}.Sanitize()+" CASCADE"); derr != nil {
			err = errors.Join(err, fmt.Errorf("drop schema %s: %w", t.schema, derr))
		}
		if t.redis != nil && t.locker == "redis" {
			if _, rerr := t.redis.removeNamespace(cctx, t.schema); rerr != nil {
				err = errors.Join(err, fmt.Errorf("remove redis namespace %s: %w", t.schema, rerr))
			}
		}
	}()
	{
		c, err := tasking.New(t.mon, tasking.WithSchema(t.schema))
		if err != nil {
			return nil, err
		}
		if err := c.Migrate(ctx); err != nil {
			return nil, err
		}
	}
	groups, err := generate(cfg.Workload, cfg.Tasks, cfg.Head, t.variant == "no-head", cfg.Seed, t.schema+"/")
	if err != nil {
		return nil, err
	}
	total := count(groups)

	smp := newSampler(t.mon, t.bouncer)
	sctx, stopSampler := context.WithCancel(ctx)
	var sw sync.WaitGroup
	sw.Add(1)
	go func() { defer sw.Done(); smp.run(sctx, sampleEvery(cfg.Procs)) }()
	defer func() { stopSampler(); sw.Wait() }()

	// The dispatching side: a pool and client of its own, as an application
	// that dispatches would have.
	var dispatchConnErrs atomic.Int64
	dtr := newStmtTracer(func(ev connEvent) {
		if ev.Failed {
			dispatchConnErrs.Add(1)
		}
		smp.add(ev, ownerDispatch)
	})
	dpool, err := newPool(ctx, cfg.DSN, int32(cfg.Dispatchers+1), dtr, "tasking_bench dispatch")
	if err != nil {
		return nil, err
	}
	defer dpool.Close()
	dcmds := newCmdCounter()
	dlocker := tasking.NewPostgresLocker()
	if t.locker == "redis" {
		dlocker = t.redis.locker(t.schema, dcmds)
	}
	dclient, err := tasking.New(dpool, tasking.WithSchema(t.schema), tasking.WithLocker(dlocker), tasking.WithLogger(logger(cfg.LogLevel)))
	if err != nil {
		return nil, err
	}
	var redisCalls0 int64
	var redisCPU0 float64
	if t.locker == "redis" {
		if redisCalls0, redisCPU0, err = t.redis.serverStats(ctx); err != nil {
			return nil, err
		}
	}
	pgss0, pgssOK := pgssCalls(ctx, t.mon, t.schema)

	// Workers: ready (connected) before anything is dispatched.
	specs := make([]workerSpec, cfg.Procs)
	for i := range specs {
		slots := cfg.Slots / cfg.Procs
		if i < cfg.Slots%cfg.Procs {
			slots++
		}
		specs[i] = workerSpec{DSN: cfg.DSN, Schema: t.schema, Locker: t.locker, Redis: cfg.Redis,
			Namespace: t.schema, Slots: slots, PoolConns: cfg.PoolConns, Conns: cfg.Conns, ClaimAhead: cfg.ClaimAhead, Body: cfg.Body, Poll: cfg.Poll,
			Index: i, LogLevel: cfg.LogLevel, Progress: sampleEvery(cfg.Procs),
			MaxProcs: cfg.WorkerMaxProcs, RedisKeepAlive: cfg.RedisKeepAlive}
		if t.bouncer != nil {
			specs[i].DSN, specs[i].PgBouncer = t.bouncer.dsn, true
		}
		if cfg.CPUProfile != "" {
			specs[i].CPUProfile = fmt.Sprintf("%s-%s%s-%d-p%d.pprof", cfg.CPUProfile, t.locker, variantSuffix(t.variant), t.rep, i)
		}
	}
	fl, err := startFleet(ctx, specs, cfg.Procs == 1, smp.add)
	if err != nil {
		return nil, err
	}
	stopped := false
	defer func() {
		if !stopped { // stop the workers before the schema is dropped
			_, _ = fl.shutdown(15 * time.Second)
		}
	}()

	progress := t.progress(ctx, fl, smp, total)
	defer progress.stop()

	var dispatchDone chan struct{} // stream: closed when the dispatchers are done
	var dispatchErr error
	d0 := time.Now()
	if cfg.Mode == "backlog" {
		progress.phase("dispatching")
		if err := t.dispatchBacklog(ctx, dclient, groups); err != nil {
			return nil, err
		}
		res.DispatchSeconds = time.Since(d0).Seconds()
	}
	progress.phase("running")
	busy0, tot0 := machineCPU()
	cpu0 := processCPU()
	var bouncerCPU0 float64
	if t.bouncer != nil {
		bouncerCPU0 = t.bouncer.cpu()
	}
	res.WorkersStarted = time.Now()
	fl.run()
	if cfg.Mode == "stream" {
		// A service dispatches from a warm pool to workers that run: the
		// stream's clock starts once every worker process has registered
		// and the dispatchers' connections are open. Before, the first
		// second's tasks waited for the start-up of both (64 dispatchers:
		// up to 2.4 s, the whole p95 of a 16 s stream).
		warm := cfg.Dispatchers
		if cfg.DispatchProcs > 1 {
			warm = 0 // the dispatching processes warm their own (dispatchChild)
		}
		if err := warmStream(ctx, t.mon, t.schema, cfg.Procs, dclient, dpool, warm); err != nil {
			return nil, err
		}
		dispatchDone = make(chan struct{})
		go func() {
			defer close(dispatchDone)
			dispatchErr = t.dispatchStream(ctx, dclient, groups)
			res.DispatchSeconds = time.Since(d0).Seconds()
		}()
	}

	target := int64(total)
	if cfg.StopAfter > 0 && cfg.StopAfter < total {
		target = int64(cfg.StopAfter)
	}
	timedOut, err := t.waitDone(ctx, fl, target, res.WorkersStarted, dispatchDone, &dispatchErr)
	if err != nil {
		return nil, err
	}
	if target == int64(total) && !timedOut {
		// Every handler returned; wait for the last final states.
		for {
			n, err := unfinished(ctx, t.mon, t.schema)
			if err != nil {
				return nil, err
			}
			if n == 0 {
				break
			}
			if err := sleep(ctx, 20*time.Millisecond); err != nil {
				return nil, err
			}
		}
	}
	res.DrainWall = time.Since(res.WorkersStarted).Seconds()
	busy1, tot1 := machineCPU()
	if tot1 > tot0 {
		res.MachineBusy = (busy1 - busy0) / (tot1 - tot0) * float64(numCPU())
	}
	smp.sample(ctx) // last CPU readings while the connections are open
	if t.bouncer != nil {
		res.PgBouncerCPU = t.bouncer.cpu() - bouncerCPU0
	}
	res.LostProcs, res.LostErr = lostOf(fl)
	progress.phase("stopping")
	reps, err := fl.shutdown(60 * time.Second)
	stopped = true
	if err != nil {
		return nil, err
	}
	if dispatchDone != nil {
		<-dispatchDone
		if dispatchErr != nil {
			return nil, dispatchErr
		}
	}
	progress.stop()

	// Counts.
	if cfg.Procs == 1 {
		res.WorkerCPU = processCPU() - cpu0
	}
	var ws stmtCounts
	redisClient := dcmds.snapshot()
	for _, r := range reps {
		ws.add(r.Stmts)
		if cfg.Procs > 1 {
			res.WorkerCPU += r.CPUSeconds
		}
		for k, v := range r.Redis {
			redisClient[k] += v
		}
	}
	ds := dtr.snapshot()
	res.DispatchStmt, res.WorkerStmt = ds.total(), ws.total()
	res.Stmts.add(ds)
	res.Stmts.add(ws)
	res.StmtKinds = res.Stmts.byKind()
	res.Prepares = res.Stmts.Prepares
	res.Listen, res.Notify, res.SessionLocks = res.Stmts.wakeupCalls()
	if pgss1, ok := pgssCalls(ctx, t.mon, t.schema); ok && pgssOK {
		d := pgss1 - pgss0
		res.PGSSCalls = &d
	}
	if t.locker == "redis" {
		res.RedisClient = redisClient
		for _, v := range redisClient {
			res.RedisClientTotal += v
		}
		calls, cpu, err := t.redis.serverStats(ctx)
		if err == nil {
			res.RedisServer = calls - redisCalls0
			res.RedisCPU = cpu - redisCPU0
		}
	}
	res.PGDispatchCPU, res.PGWorkerCPU, _ = smp.backendCPU()
	_, res.PeakConns = smp.conns()
	res.PeakConnsProc, res.PeakConnsWork, res.PeakBouncer = smp.peaks()
	res.OtherXact = smp.otherXact()
	res.ConnErrors, res.DispatchConnEr = fl.connErrors(), dispatchConnErrs.Load()

	// The tasks table.
	if res.All, res.ByName, err = tableStats(ctx, t.mon, t.schema); err != nil {
		return nil, err
	}
	res.DispatchSplits = t.splits.Load()
	if res.DispatchSeconds > 0 {
		res.DispatchRate = float64(t.dispatched.Load()) / res.DispatchSeconds
	}
	done := float64(res.All.Completed)
	if done > 0 {
		res.StmtPerTask = float64(res.Stmts.total()) / done
		res.RedisPerTask = float64(res.RedisClientTotal) / done
		res.RedisServerPer = float64(res.RedisServer) / done
	}
	if cfg.Procs > 1 {
		rate, from, ok, err := steadyStats(ctx, t.mon, t.schema, cfg.Procs-len(res.LostProcs), res.All)
		if err != nil {
			return nil, err
		}
		if ok {
			res.SteadyRate, res.SteadyFrom = rate, from
		}
	}
	res.BucketsOf = "all tasks"
	if res.Buckets, err = buckets(ctx, t.mon, t.schema, res.All.FirstStart); err != nil {
		return nil, err
	}
	return res, nil
}

// sampleEvery is how often the sampler reads connections and CPU: every
// 100 ms, less often for large fleets. A sample reads /proc for every worker
// process and database backend; with 80 processes on 2 cores, sampling
// every 100 ms took about 5 % of the machine's CPU (perf), which the fleet
// then lacked. Its connection counts hardly change during such a run, and
// the CPU totals are read again at its end.
func sampleEvery(procs int) time.Duration {
	return min(time.Second, max(1, time.Duration(procs/8))*100*time.Millisecond)
}

// dispatchBacklog stores every group with DispatchMany batches, cfg.Dispatchers
// batches at a time; a group is stored completely before the next starts.
func (t *trial) dispatchBacklog(ctx context.Context, c *tasking.Client, groups []group) error {
	for _, g := range groups {
		batches := make(chan []tasking.TaskSpec)
		errc := make(chan error, t.cfg.Dispatchers)
		var wg sync.WaitGroup
		for range t.cfg.Dispatchers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for b := range batches {
					if err := t.dispatchMany(ctx, c, b); err != nil {
						errc <- err
						return
					}
				}
			}()
		}
		var err error
	feed:
		for i := 0; i < len(g.specs); i += t.cfg.Batch {
			select {
			case batches <- g.specs[i:min(i+t.cfg.Batch, len(g.specs))]:
			case err = <-errc:
				break feed
			case <-ctx.Done():
				err = ctx.Err()
				break feed
			}
		}
		close(batches)
		wg.Wait()
		close(errc)
		if err == nil {
			err = <-errc
		}
		if err != nil {
			return fmt.Errorf("dispatch: %w", err)
		}
	}
	return nil
}

// dispatchMany stores one batch. A batch whose resources overflow
// PostgreSQL's lock table (dispatch takes a transaction-scoped advisory lock
// per distinct resource, and the table holds max_locks_per_transaction ×
// max_connections locks for the whole server) fails with "out of shared
// memory"; it is then split in halves, in order, and the splits are counted
// for the report.
func (t *trial) dispatchMany(ctx context.Context, c *tasking.Client, b []tasking.TaskSpec) error {
	_, err := c.DispatchMany(ctx, b...)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "53200" && len(b) > 1 {
		t.splits.Add(1)
		if err := t.dispatchMany(ctx, c, b[:len(b)/2]); err != nil {
			return err
		}
		return t.dispatchMany(ctx, c, b[len(b)/2:])
	}
	if err == nil {
		t.dispatched.Add(int64(len(b)))
	}
	return err
}

// dispatchStream calls Dispatch once per task from cfg.Dispatchers loops,
// paced to cfg.Rate tasks/s in all when it is set, in this process or
// spread over cfg.DispatchProcs child processes.
func (t *trial) dispatchStream(ctx context.Context, c *tasking.Client, groups []group) error {
	var all []tasking.TaskSpec
	for _, g := range groups {
		all = append(all, g.specs...)
	}
	tasks := streamTasks(all)
	if t.cfg.DispatchProcs > 1 {
		return t.dispatchStreamProcs(ctx, tasks)
	}
	return dispatchPaced(ctx, c, tasks, t.cfg.Dispatchers, t.cfg.Rate, time.Now(), &t.dispatched)
}

// waitDone waits until the fleet's handlers have run target tasks, or
// until cfg.MaxDrain has passed since started (timedOut). It fails when
// nothing finishes for a minute, or when every worker process has ended;
// one that ends while others go on is reported on stderr and in the result
// (a fleet short of connection slots loses some), not a failure.
func (t *trial) waitDone(ctx context.Context, fl *fleet, target int64, started time.Time, dispatchDone <-chan struct{}, dispatchErr *error) (timedOut bool, err error) {
	last, lastAt := int64(-1), time.Now()
	warned := map[int]bool{}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-dispatchDone:
			if *dispatchErr != nil {
				return false, *dispatchErr
			}
			dispatchDone = nil
		case <-tick.C:
		}
		n := fl.done()
		if n >= target {
			return false, nil
		}
		if t.cfg.MaxDrain > 0 && time.Since(started) >= t.cfg.MaxDrain {
			return true, nil
		}
		if lost, errs := fl.lost(); len(lost) > len(warned) {
			for i, p := range lost {
				if !warned[p] {
					warned[p] = true
					fmt.Fprintf(os.Stderr, "\nbench: [%s] worker process %d ended: %v\n", t.label(), p, errs[i])
				}
			}
			if len(lost) == len(fl.procs) {
				return false, fmt.Errorf("every worker process ended; the first: %v", errs[0])
			}
		}
		if n != last {
			last, lastAt = n, time.Now()
		} else if time.Since(lastAt) > time.Minute && t.dispatched.Load() > n {
			err := fmt.Errorf("stalled: %d of %d tasks done, none for a minute", n, target)
			if t.bouncer != nil && t.locker == "pg" {
				err = fmt.Errorf("%w (the PostgreSQL locker behind a transaction-pooling PgBouncer)", err)
			}
			return false, err
		}
	}
}

// lostOf lists the worker processes that ended early and the first error.
func lostOf(fl *fleet) ([]int, string) {
	lost, errs := fl.lost()
	if len(lost) == 0 {
		return nil, ""
	}
	return lost, fmt.Sprint(errs[0])
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-tm.C:
		return nil
	}
}

// progressLine prints one line, rewritten in place about twice a second.
type progressLine struct {
	stopOnce sync.Once
	done     chan struct{}
	wg       sync.WaitGroup
	mu       sync.Mutex
	what     string
}

func (p *progressLine) phase(s string) {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.what = s
	p.mu.Unlock()
}

func (p *progressLine) stop() {
	if p == nil {
		return
	}
	p.stopOnce.Do(func() { close(p.done); p.wg.Wait() })
}

func (t *trial) progress(ctx context.Context, fl *fleet, smp *sampler, total int) *progressLine {
	w := t.cfg.Progress
	if w == nil {
		return nil
	}
	p := &progressLine{done: make(chan struct{})}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		tick := time.NewTicker(500 * time.Millisecond)
		defer tick.Stop()
		prev, prevAt := int64(0), time.Now()
		width := 0
		for {
			select {
			case <-p.done:
				fmt.Fprintf(w, "\r%*s\r", width, "")
				return
			case <-ctx.Done():
				fmt.Fprintf(w, "\r%*s\r", width, "")
				return
			case <-tick.C:
			}
			n, now := fl.done(), time.Now()
			rate := float64(n-prev) / now.Sub(prevAt).Seconds()
			prev, prevAt = n, now
			conns, _ := smp.conns()
			p.mu.Lock()
			what := p.what
			p.mu.Unlock()
			line := fmt.Sprintf("[%s] %s: dispatched %d/%d  done %d  %.0f tasks/s  pg conns %d",
				t.label(), what, t.dispatched.Load(), total, n, rate, conns)
			fmt.Fprintf(w, "\r%-*s", width, line)
			width = max(width, len(line))
		}
	}()
	return p
}

func numCPU() int { return runtime.NumCPU() }

// median returns the result with the median rate of those given (the lower
// middle one for an even count).
func median(rs []*Result, rate func(*Result) float64) *Result {
	s := slices.Clone(rs)
	sort.Slice(s, func(i, j int) bool { return rate(s[i]) < rate(s[j]) })
	return s[(len(s)-1)/2]
}

func round(x float64, d int) float64 {
	p := math.Pow(10, float64(d))
	return math.Round(x*p) / p
}

// warmStream waits until procs workers are registered in schema, then
// warms n dispatch connections (warmDispatch).
func warmStream(ctx context.Context, mon *pgxpool.Pool, schema string, procs int, c *tasking.Client, pool *pgxpool.Pool, n int) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	q := `SELECT count(*) FROM ` + pgx.Identifier{schema}.Sanitize() + `.workers`
	for {
		var k int
		if err := mon.QueryRow(ctx, q).Scan(&k); err != nil {
			return fmt.Errorf("stream warm-up: %w", err)
		}
		if k >= procs {
			break
		}
		if err := sleep(ctx, 10*time.Millisecond); err != nil {
			return fmt.Errorf("stream warm-up: %d of %d workers registered: %w", k, procs, err)
		}
	}
	return warmDispatch(ctx, c, pool, schema, n)
}

// warmName names the tasks warmDispatch dispatches; no worker handles it.
const warmName = "bench.warm"

// warmDispatch makes n connections of pool ready to dispatch, as in a
// service that has run for a while: n concurrent Dispatch calls open them
// and plan the dispatch function on each (the first call on a connection
// costs tens of milliseconds of server CPU, and 64 of them at once held up
// a stream's first second). The tasks they dispatched are deleted: they
// name no resource and no worker handles them, so nothing else refers to
// them.
func warmDispatch(ctx context.Context, c *tasking.Client, pool *pgxpool.Pool, schema string, n int) error {
	if n == 0 {
		return nil
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = c.Dispatch(ctx, warmName, nil)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("warm the dispatchers' connections: %w", err)
	}
	q := `DELETE FROM ` + pgx.Identifier{schema}.Sanitize() + `.tasks WHERE name = $1`
	if _, err := pool.Exec(ctx, q, warmName); err != nil {
		return fmt.Errorf("delete the warm-up tasks: %w", err)
	}
	return nil
}
