// Command quickstart runs repository syncs, publications to a shared CDN
// remote, a key rotation that needs the remote alone and a few independent
// tasks on two workers, and prints a timeline: conflicting tasks run one
// after another in dispatch order, the rest in parallel. It works in a
// schema of its own and drops it at the end.
//
//	go run ./examples/quickstart [-dsn postgres://...]
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

// step is one task of the scenario, in dispatch order. Syncs own their
// repository; publications read it and share the CDN remote; the key
// rotation needs the remote alone; the rest have nothing in common.
type step struct {
	name, what   string
	ms           int // how long the handler works
	excl, shared []string
}

var plan = []step{
	{"sync", "repo:a", 300, []string{"repo:a"}, nil},
	{"sync", "repo:b", 200, []string{"repo:b"}, nil},
	{"publish", "repo:a", 200, nil, []string{"repo:a", "remote:cdn"}},
	{"publish", "repo:b", 250, nil, []string{"repo:b", "remote:cdn"}},
	{"rotate-cdn-keys", "", 150, []string{"remote:cdn"}, nil},
	{"sync", "repo:a", 200, []string{"repo:a"}, nil},
	{"publish", "repo:a", 150, nil, []string{"repo:a", "remote:cdn"}},
	{"send-report", "", 400, nil, nil},
	{"resize", "image:42", 100, []string{"image:42"}, nil},
	{"resize", "image:43", 250, []string{"image:43"}, nil},
}

// workArgs are the args of every task: how long its handler works.
type workArgs struct{ MS int }

func main() {
	const fallback = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	dsn := flag.String("dsn", "", "PostgreSQL connection URL (default $TASKING_DATABASE_URL, else "+fallback+")")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	err := run(ctx, cmp.Or(*dsn, os.Getenv("TASKING_DATABASE_URL"), fallback))
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, dsn string) error {
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return err
	}
	defer pool.Close()
	schema := "tasking_quickstart_" + strconv.FormatUint(rand.Uint64()>>24, 36)
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	client, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(logger))
	if err != nil {
		return err
	}
	if err := client.Migrate(ctx); err != nil {
		return err
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			fmt.Fprintln(os.Stderr, "quickstart: drop schema:", err)
		}
	}()

	// One batch: IDs follow the plan's order, and so does every conflict.
	specs := make([]tasking.TaskSpec, len(plan))
	for i, s := range plan {
		specs[i] = tasking.Spec(s.name, workArgs{MS: s.ms}, tasking.Exclusive(s.excl...), tasking.Shared(s.shared...))
	}
	tasks, err := client.DispatchMany(ctx, specs...)
	if err != nil {
		return err
	}
	tl := &timeline{t0: time.Now(), byID: make(map[int64]*row)}
	for i, t := range tasks {
		r := &row{task: t, label: strings.TrimSpace(fmt.Sprintf("#%d %s %s", t.ID, t.Name, plan[i].what))}
		var res []string
		if len(t.Exclusive) > 0 {
			res = append(res, "exclusive "+strings.Join(t.Exclusive, ","))
		}
		if len(t.Shared) > 0 {
			res = append(res, "shared "+strings.Join(t.Shared, ","))
		}
		r.res = strings.Join(res, "; ")
		tl.rows = append(tl.rows, r)
		tl.byID[t.ID] = r
	}
	fmt.Printf("schema %s: dispatched %d tasks, running 2 workers with 3 slots each\n\n", schema, len(tasks))

	// Two workers, as two processes of a fleet would run them. The deferred
	// stop runs before the schema is dropped.
	runCtx, stopWorkers := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stopWorkers(); wg.Wait() }()
	for _, name := range []string{"w1", "w2"} {
		w := tasking.NewWorker(client, tasking.WithSlots(3), tasking.WithWorkerName(name))
		for _, task := range []string{"sync", "publish", "rotate-cdn-keys", "send-report", "resize"} {
			tasking.HandleFunc(w, task, tl.handler(name))
		}
		wg.Go(func() {
			if err := w.Run(runCtx); err != nil {
				fmt.Fprintf(os.Stderr, "quickstart: worker %s: %v\n", name, err)
			}
		})
	}

	waitCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, t := range tasks {
		done, err := client.Wait(waitCtx, t.ID)
		if err != nil {
			return err
		}
		if done.State != tasking.StateCompleted {
			return fmt.Errorf("task %d ended %s: %s", t.ID, done.State, done.Error)
		}
	}
	tl.chart()
	return nil
}

// timeline records when each task ran, and on which worker.
type timeline struct {
	t0   time.Time
	mu   sync.Mutex
	rows []*row // dispatch order
	byID map[int64]*row
}

type row struct {
	task       *tasking.Task
	label, res string
	worker     string
	start, end time.Duration
}

func (tl *timeline) handler(worker string) func(context.Context, workArgs) error {
	return func(ctx context.Context, a workArgs) error {
		id := tasking.TaskFromContext(ctx).ID
		tl.mark(id, worker, "start")
		select {
		case <-time.After(time.Duration(a.MS) * time.Millisecond):
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		tl.mark(id, worker, "end")
		return nil
	}
}

func (tl *timeline) mark(id int64, worker, event string) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	r, now := tl.byID[id], time.Since(tl.t0)
	if event == "start" {
		r.worker, r.start = worker, now
	} else {
		r.end = now
	}
	line := fmt.Sprintf("%5dms  %s  %-5s  %-22s %s", now.Milliseconds(), worker, event, r.label, r.res)
	fmt.Println(strings.TrimRight(line, " "))
}

// chart draws one lane per task ('.' waiting, '#' running) and checks that
// no task started before an earlier conflicting task had ended.
func (tl *timeline) chart() {
	const width = 60
	var span time.Duration
	for _, r := range tl.rows {
		span = max(span, r.end)
	}
	step := span / width
	end := fmt.Sprintf("%dms", span.Milliseconds())
	fmt.Printf("\n%27s0ms%*s\n", "", width-3, end)
	for _, r := range tl.rows {
		from, to := int((r.start+step/2)/step), int((r.end+step/2)/step)
		lane := strings.Repeat(".", from) + strings.Repeat("#", max(to-from, 1))
		fmt.Printf("%-22s %s |%-*s|\n", r.label, r.worker, width, lane)
	}
	fmt.Println("('.' waiting, '#' running)")

	pairs, early := 0, 0
	for i, a := range tl.rows {
		for _, b := range tl.rows[i+1:] {
			if !conflict(a.task, b.task) {
				continue
			}
			pairs++
			if b.start < a.end {
				early++
			}
		}
	}
	fmt.Printf("\n%d conflicting pairs; %d started before the earlier one ended\n", pairs, early)
}

// conflict reports whether a resource is exclusive in one task and named by
// the other.
func conflict(a, b *tasking.Task) bool {
	names := func(t *tasking.Task) func(string) bool {
		return func(n string) bool { return slices.Contains(t.Exclusive, n) || slices.Contains(t.Shared, n) }
	}
	return slices.ContainsFunc(a.Exclusive, names(b)) || slices.ContainsFunc(b.Exclusive, names(a))
}
