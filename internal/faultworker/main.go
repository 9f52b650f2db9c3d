// Command faultworker is a tasking worker run as a child process by the
// fault injection tests (fault_test.go): the test kills, stops and
// disconnects it, and judges the fleet from the events each worker appends
// to its events file.
//
// It handles one task name, "t", whose args are {"ms": N}: the handler
// works (sleeps) N milliseconds unless its context is canceled first. Around
// the work it appends to the events file:
//
//	ready <worker id> <pid> <unixnano>     once, when the worker has registered
//	start <task id> <fence> <unixnano>     before the work
//	cancel <task id> <unixnano>            when the work stopped because the
//	                                       task was canceled (the context's
//	                                       cause is tasking.ErrCanceled)
//	end <task id> <unixnano>               after the work, or when canceled
//
// Each line is one write(2) on a file opened with O_APPEND, so a kill -9
// never leaves half a line, and several processes may share one file.
//
// SIGTERM or SIGINT shut the worker down gracefully; the exit status is 0
// after a clean shutdown.
//
// Every flag may also be given in the environment as FAULTWORKER_<FLAG>
// (upper case, dashes as underscores); a flag on the command line wins.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

type config struct {
	dsn       string
	schema    string
	locker    string
	redis     string
	lease     time.Duration
	renew     time.Duration
	slots     int
	name      string
	ttl       time.Duration
	poll      time.Duration
	grace     time.Duration
	lockCheck time.Duration
	startTO   time.Duration
	events    string
	migrate   bool
	logLevel  string
	periodic  time.Duration
}

func parseFlags(args []string) (config, error) {
	var c config
	fs := flag.NewFlagSet("faultworker", flag.ContinueOnError)
	fs.StringVar(&c.dsn, "dsn", "", "PostgreSQL connection URL; add application_name=... to name the pool's sessions")
	fs.StringVar(&c.schema, "schema", tasking.DefaultSchema, "tasking schema")
	fs.StringVar(&c.locker, "locker", "postgres", `resource locker: "postgres", "memory" (this process only) or "redis"`)
	fs.StringVar(&c.redis, "redis", "127.0.0.1:6379", "Redis address, for -locker redis")
	fs.DurationVar(&c.lease, "redis-lease", 0, "Redis locker: lease (0: the library's default)")
	fs.DurationVar(&c.renew, "redis-renew", 0, "Redis locker: renewal interval (0: the library's default)")
	fs.IntVar(&c.slots, "slots", 4, "handler slots")
	fs.StringVar(&c.name, "name", "", "worker name (default faultworker-<pid>)")
	fs.DurationVar(&c.ttl, "ttl", time.Second, "heartbeat TTL")
	fs.DurationVar(&c.poll, "poll", 200*time.Millisecond, "fallback poll interval")
	fs.DurationVar(&c.grace, "grace", 2*time.Second, "shutdown grace")
	fs.DurationVar(&c.lockCheck, "lock-check", 200*time.Millisecond, "PostgreSQL locker: lock connection check interval")
	fs.DurationVar(&c.startTO, "start-timeout", 10*time.Second, "keep retrying a start that fails before the worker registered for this long")
	fs.StringVar(&c.events, "events", "", "events file (required)")
	fs.BoolVar(&c.migrate, "migrate", false, "migrate the schema before starting")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.DurationVar(&c.periodic, "periodic", 0, `register the periodic task "tick": task "t" with {"ms": 0} every this long (0: none)`)

	// Environment defaults, then the command line.
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		key := "FAULTWORKER_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(key); ok {
			if err := f.Value.Set(v); err != nil && envErr == nil {
				envErr = fmt.Errorf("%s=%q: %w", key, v, err)
			}
		}
	})
	if envErr != nil {
		return c, envErr
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if c.name == "" {
		c.name = "faultworker-" + strconv.Itoa(os.Getpid())
	}
	switch {
	case c.dsn == "":
		return c, errors.New("-dsn is required")
	case c.events == "":
		return c, errors.New("-events is required")
	}
	return c, nil
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "faultworker:", err)
		os.Exit(2)
	}
	if err := run(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "faultworker:", err)
		os.Exit(1)
	}
}

func run(cfg config) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.logLevel)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	ev, err := openEvents(cfg.events)
	if err != nil {
		return err
	}
	defer ev.Close()

	pool, err := pgxpool.New(ctx, cfg.dsn)
	if err != nil {
		return fmt.Errorf("pool: %w", err)
	}
	defer pool.Close()

	locker, err := newLocker(cfg)
	if err != nil {
		return err
	}
	client, err := tasking.New(pool, tasking.WithSchema(cfg.schema), tasking.WithLogger(log), tasking.WithLocker(locker))
	if err != nil {
		return err
	}
	if cfg.migrate {
		if err := client.Migrate(ctx); err != nil {
			return err
		}
	}

	handler := func(ctx context.Context, t *tasking.Task) error {
		var args struct {
			MS int `json:"ms"`
		}
		if err := json.Unmarshal(t.Args, &args); err != nil {
			return fmt.Errorf("faultworker: args: %w", err)
		}
		if err := ev.line("start %d %d %d", t.ID, t.Fence, time.Now().UnixNano()); err != nil {
			return err
		}
		timer := time.NewTimer(time.Duration(args.MS) * time.Millisecond)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-ctx.Done():
			// Stamped as soon as the handler sees it: the test measures
			// how long a cancel takes to reach the handler.
			if at := time.Now().UnixNano(); errors.Is(context.Cause(ctx), tasking.ErrCanceled) {
				if err := ev.line("cancel %d %d", t.ID, at); err != nil {
					return err
				}
			}
		}
		// The end is recorded before the handler returns, so it precedes the
		// final state and the release of the task's locks.
		if err := ev.line("end %d %d", t.ID, time.Now().UnixNano()); err != nil {
			return err
		}
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		return nil
	}

	// A start that fails before the worker registered (the database not up
	// yet, the name still held by a live instance) is retried for a while,
	// as a service manager would restart the process.
	deadline := time.Now().Add(cfg.startTO)
	for {
		opts := []tasking.WorkerOption{
			tasking.WithSlots(cfg.slots),
			tasking.WithWorkerName(cfg.name),
			tasking.WithHeartbeatTTL(cfg.ttl),
			tasking.WithPollInterval(cfg.poll),
			tasking.WithShutdownGrace(cfg.grace),
		}
		if cfg.periodic > 0 {
			opts = append(opts, tasking.WithPeriodic("tick", tasking.Every(cfg.periodic),
				tasking.Spec("t", map[string]int{"ms": 0})))
		}
		w := tasking.NewWorker(client, opts...)
		w.Handle("t", handler)
		runDone := make(chan error, 1)
		go func() { runDone <- w.Run(ctx) }()
		registered, err := announce(ctx, w, ev, runDone)
		if err != nil {
			return err
		}
		err = <-runDone
		switch {
		case err == nil:
			return nil
		case registered || ctx.Err() != nil || time.Now().After(deadline):
			return fmt.Errorf("worker: %w", err)
		}
		log.Warn("faultworker: worker did not start; retrying", "err", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// announce writes the ready line once the worker has registered (its id is
// known) and reports true, or reports false if Run ends first.
func announce(ctx context.Context, w *tasking.Worker, ev *events, runDone chan error) (bool, error) {
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		if id := w.ID(); id != 0 {
			return true, ev.line("ready %d %d %d", id, os.Getpid(), time.Now().UnixNano())
		}
		select {
		case err := <-runDone:
			runDone <- err // for the caller to read
			return false, nil
		case <-ctx.Done():
			return false, nil
		case <-tick.C:
		}
	}
}

// events is the append-only events file.
type events struct{ f *os.File }

func openEvents(path string) (*events, error) {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("events file: %w", err)
	}
	return &events{f: f}, nil
}

// line appends one line with a single write.
func (e *events) line(format string, a ...any) error {
	b := fmt.Appendf(nil, format+"\n", a...)
	if _, err := e.f.Write(b); err != nil {
		return fmt.Errorf("faultworker: events file: %w", err)
	}
	return nil
}

func (e *events) Close() error { return e.f.Close() }
