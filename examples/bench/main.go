// Command bench measures tasking: it dispatches a workload into a schema of
// its own, drains it with workers, once per locker (PostgreSQL advisory
// locks, Redis, or both side by side), and reports throughput, wait times,
// PostgreSQL statements and Redis commands per task, connections and CPU.
// See README.md for the workloads and the exact commands.
//
//	go run ./examples/bench -locker both -workload mix -tasks 100000
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tasking-go/tasking/internal/bench"
)

func main() {
	if os.Getenv(bench.ChildEnv) != "" {
		os.Exit(bench.ChildMain())
	}
	if os.Getenv(bench.DispatchChildEnv) != "" {
		os.Exit(bench.DispatchChildMain())
	}
	const dsnFallback = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	var cfg bench.Config
	locker := flag.String("locker", "both", "pg, redis, or both (each on the same workload, side by side)")
	flag.IntVar(&cfg.Slots, "slots", 80, "handler slots in all, split between the worker processes")
	flag.IntVar(&cfg.Procs, "procs", 1, "worker processes; more than 1 re-executes this program as child workers")
	flag.IntVar(&cfg.Tasks, "tasks", 100000, "tasks per run")
	flag.StringVar(&cfg.Workload, "workload", "noop", "noop | unique | mix | contend | hot")
	flag.IntVar(&cfg.Head, "head", 5000, "hot: tasks in the blocked head (exclusive on one name)")
	body := flag.String("body", "noop", `what a handler does: "noop", or a duration to sleep (e.g. 300ms)`)
	flag.StringVar(&cfg.Mode, "mode", "backlog", "backlog: dispatch everything (DispatchMany batches), then start the workers; stream: Dispatch one task at a time while the workers run")
	flag.Float64Var(&cfg.Rate, "rate", 0, "stream: tasks/s in all (0: as fast as the dispatchers can)")
	flag.IntVar(&cfg.Dispatchers, "dispatchers", 4, "backlog: concurrent DispatchMany batches; stream: concurrent Dispatch loops")
	flag.IntVar(&cfg.DispatchProcs, "dispatch-procs", 1, "stream: spread the -dispatchers loops over this many processes (re-executions of this program)")
	flag.IntVar(&cfg.Batch, "batch", 5000, "backlog: tasks per DispatchMany")
	flag.IntVar(&cfg.StopAfter, "stop-after", 0, "stop once this many tasks are done and measure those (0: drain all)")
	flag.DurationVar(&cfg.MaxDrain, "max-drain", 0, "stop this long after the workers started and measure the tasks done by then (0: drain all)")
	flag.IntVar(&cfg.Repeat, "repeat", 1, "runs per locker, interleaved; the tables show the median run")
	poolConns := flag.Int("pool", 0, "max connections of each worker process's pool (0: pgx's default, max(4, cores))")
	flag.IntVar(&cfg.PgBouncer, "pgbouncer", 0, "N > 0: start a throwaway PgBouncer (transaction pooling, N server connections) and point the worker processes at it; dispatch and measurement stay direct")
	flag.IntVar(&cfg.Conns, "conns", 0, "connections of each worker process (tasking.WithConnections; 0: its default, 1, or 2 from 32 slots)")
	flag.IntVar(&cfg.ClaimAhead, "claim-ahead", -1, "tasks each worker process may claim beyond its free slots (tasking.WithClaimAhead; -1: its default, 64 minus the slots; 0: off)")
	flag.DurationVar(&cfg.Poll, "poll", time.Second, "workers' fallback poll interval (tasking.WithPollInterval)")
	flag.IntVar(&cfg.WorkerMaxProcs, "worker-maxprocs", 0, "GOMAXPROCS of each worker process (0: Go's default, the machine's cores)")
	flag.DurationVar(&cfg.RedisKeepAlive, "redis-keepalive", 0, "the worker processes' rueidis Dialer.KeepAlive, also its idle PING interval (0: rueidis's default, 1s)")
	flag.StringVar(&cfg.Out, "out", "bench", "prefix of the output files <out>.json and <out>.svg")
	flag.StringVar(&cfg.DSN, "dsn", "", "PostgreSQL URL (default $TASKING_DATABASE_URL, else "+dsnFallback+")")
	flag.StringVar(&cfg.Redis, "redis", "", "Redis address (default $TASKING_REDIS_ADDR, else 127.0.0.1:6379)")
	flag.StringVar(&cfg.CPUProfile, "cpuprofile", "", "write a CPU profile of each worker process to <prefix>-<locker>-<run>-p<proc>.pprof")
	flag.Uint64Var(&cfg.Seed, "seed", 1, "seed of the workload's choice of names")
	flag.StringVar(&cfg.LogLevel, "log-level", "warn", "tasking's log level: debug, info, warn, error")
	quiet := flag.Bool("quiet", false, "no live progress line")
	scaling := flag.Bool("scaling", false, "run the scaling table instead (see README.md): noop and mix at -scaling-procs with both lockers and River, then Pulp's fleet; -tasks defaults to 30000 and -repeat to 3 here")
	scalingProcs := flag.String("scaling-procs", "1,4,16", "scaling: worker process counts of the backlog runs")
	river := flag.String("river", "", "scaling: the River program (go build -o ... ./examples/bench/river, from its directory); empty leaves River out")
	fleetProcs := flag.Int("fleet-procs", 80, "scaling: Pulp's fleet, processes with one slot each (0: none)")
	fleetBody := flag.Duration("fleet-body", 300*time.Millisecond, "scaling: Pulp's fleet, handler sleep")
	fleetSeconds := flag.Float64("fleet-seconds", 30, "scaling: Pulp's fleet, tasks for this many seconds at the ideal rate (procs / body)")
	fleetDrain := flag.Duration("fleet-drain", time.Minute, "scaling: Pulp's fleet, measure the tasks done this long after the workers started")
	bouncerProcs := flag.Int("bouncer-procs", 200, "scaling: the fleet behind PgBouncer (-pgbouncer server connections, default 20), Redis locker; 0: none")
	retention := flag.Bool("retention", false, "run the long retention measurement instead (see README.md): one worker process, a kept backlog of -retention-backlog tasks, -tasks in all (default 1,000,000 here), throughput per -retention-window tasks, table and index sizes")
	keep := flag.Duration("retention-keep", 10*time.Second, "retention: how long final tasks are kept (tasking.WithRetention); 0 turns retention off, to compare")
	every := flag.Duration("retention-every", 5*time.Second, "retention: how often the fleet purges (Retention.Every)")
	window := flag.Int("retention-window", 100000, "retention: tasks per measured window")
	backlog := flag.Int("retention-backlog", 20000, "retention: waiting tasks the dispatcher keeps")
	vacuum := flag.Duration("retention-vacuum", 10*time.Second, "retention: when the server's autovacuum is off, vacuum the run's tables this often (0: never)")
	flag.Parse()
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })

	switch *locker {
	case "both":
		cfg.Lockers = []string{"pg", "redis"}
	case "postgres":
		cfg.Lockers = []string{"pg"}
	default:
		cfg.Lockers = strings.Split(*locker, ",")
	}
	if *body != "noop" {
		d, err := time.ParseDuration(*body)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: -body %q: want noop or a duration\n", *body)
			os.Exit(2)
		}
		cfg.Body = d
	}
	cfg.PoolConns = int32(*poolConns)
	cfg.DSN = cmp.Or(cfg.DSN, os.Getenv("TASKING_DATABASE_URL"), dsnFallback)
	cfg.Redis = cmp.Or(cfg.Redis, os.Getenv("TASKING_REDIS_ADDR"), "127.0.0.1:6379")
	if !*quiet {
		cfg.Progress = os.Stderr
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	if *retention {
		rc := bench.RetentionConfig{DSN: cfg.DSN, Redis: cfg.Redis, Lockers: cfg.Lockers, Tasks: 1000000,
			Window: *window, Slots: cfg.Slots, Keep: *keep, Every: *every, Backlog: *backlog, Resources: 1000, Vacuum: *vacuum}
		if set["tasks"] {
			rc.Tasks = cfg.Tasks
		}
		_, err := bench.Retention(ctx, rc, os.Stdout, os.Stderr)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	if *scaling {
		sc := bench.ScalingConfig{Base: cfg, Slots: cfg.Slots, Tasks: 30000, Repeat: 3, River: *river,
			FleetProcs: *fleetProcs, FleetBody: *fleetBody, FleetSeconds: *fleetSeconds, FleetDrain: *fleetDrain,
			BouncerProcs: *bouncerProcs, BouncerPool: 20}
		if set["tasks"] {
			sc.Tasks = cfg.Tasks
		}
		if set["repeat"] {
			sc.Repeat = cfg.Repeat
		}
		if set["pgbouncer"] {
			sc.BouncerPool = cfg.PgBouncer
		}
		out := "scaling"
		if set["out"] {
			out = cfg.Out
		}
		for _, f := range strings.Split(*scalingProcs, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				fmt.Fprintf(os.Stderr, "bench: -scaling-procs %q: want numbers separated by commas\n", *scalingProcs)
				os.Exit(2)
			}
			sc.Procs = append(sc.Procs, n)
		}
		srep, err := bench.Scaling(ctx, sc, os.Stderr)
		stop()
		if srep != nil {
			var md strings.Builder
			srep.Markdown(&md)
			fmt.Print(md.String())
			werr := errors.Join(os.WriteFile(out+".md", []byte(md.String()), 0o644), srep.WriteJSON(out+".json"))
			if werr != nil {
				fmt.Fprintln(os.Stderr, "bench:", werr)
			} else {
				fmt.Fprintf(os.Stderr, "wrote %s.md and %s.json\n", out, out)
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	rep, err := bench.Run(ctx, cfg)
	stop()
	if rep != nil && len(rep.Results) > 0 {
		rep.Markdown(os.Stdout)
		if werr := rep.WriteJSON(cfg.Out + ".json"); werr != nil {
			fmt.Fprintln(os.Stderr, "bench:", werr)
		}
		if werr := rep.WriteSVG(cfg.Out + ".svg"); werr != nil {
			fmt.Fprintln(os.Stderr, "bench:", werr)
		}
		fmt.Fprintf(os.Stderr, "wrote %s.json and %s.svg\n", cfg.Out, cfg.Out)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}
