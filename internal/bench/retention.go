package bench

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

// RetentionConfig is the long-run retention measurement (-retention): one
// worker process runs tasks while a dispatcher keeps a backlog, with the
// fleet's automatic retention on (or off, to compare), and the throughput of
// each window of tasks is compared with the first.
type RetentionConfig struct {
	DSN, Redis string
	Lockers    []string
	Tasks      int           // tasks in all
	Window     int           // tasks per measured window
	Slots      int           // the worker's slots
	Keep       time.Duration // retention of completed tasks; 0: off
	Every      time.Duration // how often the fleet purges
	Backlog    int           // waiting tasks the dispatcher keeps
	Resources  int           // names the tasks take exclusively, at random
	// Vacuum is how often the run vacuums its tables itself when the
	// server's autovacuum is off (as on some test servers): deleted rows
	// are only reclaimed by vacuum, so without it retention only turns live
	// rows into dead ones. 0: never.
	Vacuum time.Duration
}

// RetentionReport is one locker's run.
type RetentionReport struct {
	Locker       string
	Windows      []float64 // tasks/s per window
	SizesBefore  Sizes     // after the first window
	SizesAfter   Sizes     // at the end
	TasksInTable int64     // rows in the tasks table at the end
	Autovacuum   bool      // the server's autovacuum was on
	Vacuums      int       // vacuums the run did itself (autovacuum off)
}

// Sizes are the tasks table's sizes, in bytes.
type Sizes struct{ Heap, Indexes, Lines int64 }

func (s Sizes) String() string {
	mb := func(b int64) float64 { return float64(b) / (1 << 20) }
	return fmt.Sprintf("tasks heap %.1f MB, tasks indexes %.1f MB, lines %.1f MB", mb(s.Heap), mb(s.Indexes), mb(s.Lines))
}

// Retention runs the measurement once per locker and prints it to out.
func Retention(ctx context.Context, cfg RetentionConfig, out, progress io.Writer) ([]RetentionReport, error) {
	var reps []RetentionReport
	for _, l := range cfg.Lockers {
		rep, err := retentionRun(ctx, cfg, l, progress)
		if err != nil {
			return reps, fmt.Errorf("%s: %w", l, err)
		}
		reps = append(reps, rep)
		first := rep.Windows[0]
		fmt.Fprintf(out, "\n%s locker, %d tasks, retention %v every %v:\n", l, cfg.Tasks, cfg.Keep, cfg.Every)
		for i, w := range rep.Windows {
			fmt.Fprintf(out, "  tasks %7d-%7d: %7.0f tasks/s (%+.1f%% vs the first window)\n",
				i*cfg.Window, (i+1)*cfg.Window, w, 100*(w-first)/first)
		}
		fmt.Fprintf(out, "  sizes after the first window: %s\n", rep.SizesBefore)
		fmt.Fprintf(out, "  sizes at the end:             %s (%d rows in tasks)\n", rep.SizesAfter, rep.TasksInTable)
		if rep.Autovacuum {
			fmt.Fprintf(out, "  the server's autovacuum was on\n")
		} else {
			fmt.Fprintf(out, "  the server's autovacuum was off: the run vacuumed its tables itself %d times (every %v)\n", rep.Vacuums, cfg.Vacuum)
		}
	}
	return reps, nil
}

func retentionRun(ctx context.Context, cfg RetentionConfig, lockerName string, progress io.Writer) (rep RetentionReport, err error) {
	rep.Locker = lockerName
	pool, err := pgxpool.New(ctx, cfg.DSN)
	if err != nil {
		return rep, err
	}
	defer pool.Close()
	schema := fmt.Sprintf("tasking_bench_%x_retention_%s", rand.Uint32(), lockerName)
	defer func() {
		_, _ = pool.Exec(context.WithoutCancel(ctx), "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
	}()
	opts := []tasking.Option{tasking.WithSchema(schema), tasking.WithLogger(logger("warn"))}
	if lockerName == "redis" {
		env, err := openRedis(ctx, cfg.Redis, 0)
		if err != nil {
			return rep, err
		}
		defer env.close()
		defer func() { _, _ = env.removeNamespace(context.WithoutCancel(ctx), schema) }()
		opts = append(opts, tasking.WithLocker(env.locker(schema, newCmdCounter())))
	}
	c, err := tasking.New(pool, opts...)
	if err != nil {
		return rep, err
	}
	if err := c.Migrate(ctx); err != nil {
		return rep, err
	}
	wopts := []tasking.WorkerOption{tasking.WithSlots(cfg.Slots), tasking.WithHeartbeatTTL(3 * time.Second)}
	if cfg.Keep > 0 {
		wopts = append(wopts, tasking.WithRetention(tasking.Retention{
			Completed: cfg.Keep, Failed: cfg.Keep, Canceled: cfg.Keep, Every: cfg.Every}))
	}
	w := tasking.NewWorker(c, wopts...)
	var done atomic.Int64
	w.Handle("noop", func(context.Context, *tasking.Task) error { done.Add(1); return nil })

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	werr := make(chan error, 1)
	go func() { werr <- w.Run(runCtx) }()
	// The dispatcher keeps about cfg.Backlog tasks waiting.
	derr := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(1, 2))
		sent := 0
		for sent < cfg.Tasks && runCtx.Err() == nil {
			if int64(sent)-done.Load() > int64(cfg.Backlog) {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			n := min(1000, cfg.Tasks-sent)
			specs := make([]tasking.TaskSpec, n)
			for i := range specs {
				specs[i] = tasking.Spec("noop", nil, tasking.Exclusive(fmt.Sprintf("r%d", rng.IntN(cfg.Resources))))
			}
			if _, err := c.DispatchMany(runCtx, specs...); err != nil {
				derr <- err
				return
			}
			sent += n
		}
		derr <- nil
	}()

	var av string
	if err := pool.QueryRow(ctx, "SHOW autovacuum").Scan(&av); err != nil {
		return rep, err
	}
	rep.Autovacuum = av == "on"
	var vacuum <-chan time.Time
	if !rep.Autovacuum && cfg.Vacuum > 0 {
		t := time.NewTicker(cfg.Vacuum)
		defer t.Stop()
		vacuum = t.C
	}
	vacuumed := make(chan error, 1)
	vacuuming := false

	start := time.Now()
	next := int64(cfg.Window)
	for done.Load() < int64(cfg.Tasks) {
		select {
		case err := <-derr:
			if err != nil {
				return rep, fmt.Errorf("dispatch: %w", err)
			}
			derr = nil
		case err := <-werr:
			return rep, fmt.Errorf("worker stopped: %v", err)
		case <-ctx.Done():
			return rep, ctx.Err()
		case <-vacuum:
			if !vacuuming { // in the background, as autovacuum would
				vacuuming = true
				go func() {
					q := pgx.Identifier{schema}.Sanitize()
					_, err := pool.Exec(ctx, "VACUUM "+q+".tasks, "+q+".lines, "+q+".handoffs")
					vacuumed <- err
				}()
			}
		case err := <-vacuumed:
			vacuuming = false
			if err != nil {
				return rep, fmt.Errorf("vacuum: %w", err)
			}
			rep.Vacuums++
		case <-time.After(10 * time.Millisecond):
		}
		if n := done.Load(); n >= next {
			now := time.Now()
			rep.Windows = append(rep.Windows, float64(cfg.Window)/now.Sub(start).Seconds())
			start = now
			if len(rep.Windows) == 1 {
				if rep.SizesBefore, err = sizes(ctx, pool, schema); err != nil {
					return rep, err
				}
			}
			fmt.Fprintf(progress, "\r%s: %d tasks done, last window %.0f tasks/s   ", lockerName, n, rep.Windows[len(rep.Windows)-1])
			next += int64(cfg.Window)
		}
	}
	fmt.Fprintln(progress)
	if vacuuming {
		<-vacuumed
	}
	stop()
	if err := <-werr; err != nil {
		return rep, err
	}
	if rep.SizesAfter, err = sizes(ctx, pool, schema); err != nil {
		return rep, err
	}
	err = pool.QueryRow(ctx, "SELECT count(*) FROM "+pgx.Identifier{schema}.Sanitize()+".tasks").Scan(&rep.TasksInTable)
	return rep, err
}

func sizes(ctx context.Context, pool *pgxpool.Pool, schema string) (Sizes, error) {
	var s Sizes
	tasks := pgx.Identifier{schema, "tasks"}.Sanitize()
	lines := pgx.Identifier{schema, "lines"}.Sanitize()
	err := pool.QueryRow(ctx, `SELECT pg_table_size($1::regclass), pg_indexes_size($1::regclass), pg_total_relation_size($2::regclass)`,
		tasks, lines).Scan(&s.Heap, &s.Indexes, &s.Lines)
	return s, err
}
