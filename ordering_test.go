package tasking_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// testSeed returns TASKING_SEED or a fresh seed (see testdb.Seed).
func testSeed(t testing.TB) uint64 { return testdb.Seed(t) }

// lockerCases are the lockers every fleet-level test runs against. Each
// call of the factory returns the locker for one worker's client.
var lockerCases = []struct {
	name string
	new  func(t testing.TB) func() tasking.ResourceLocker
}{
	{"postgres", func(testing.TB) func() tasking.ResourceLocker {
		return func() tasking.ResourceLocker { return tasking.NewPostgresLocker() }
	}},
	{"memory", func(testing.TB) func() tasking.ResourceLocker {
		l := tasking.NewMemoryLocker() // one lock space for the whole in-process fleet
		return func() tasking.ResourceLocker { return l }
	}},
	{"redis", func(t testing.TB) func() tasking.ResourceLocker {
		ns := testdb.Name("ns") // one namespace per test, shared by its fleet
		return func() tasking.ResourceLocker {
			// Every worker its own connection, as in separate processes.
			return tasking.NewRedisLocker(newRedis(t, testdb.RedisAddr()), tasking.WithRedisNamespace(ns))
		}
	}},
}

// event records one handler run with a global order of starts and ends.
type event struct {
	start, end int64
	runs       int32
}

// TestOrderingProperty runs a fleet of workers over random tasks on a small
// universe of names and checks the promise from the handlers' record:
// P1 (no conflicting overlap), P2 (conflicting tasks start in seq order,
// after the earlier one is final), P4 (no shared task overtakes a waiting
// exclusive one) and P5 (every task final exactly once).
func TestOrderingProperty(t *testing.T) {
	t.Parallel()
	orderingProperty(t, false)
}

// TestOrderingPropertyRetries is TestOrderingProperty with retries: a task
// whose first attempt fails waits for its retry at its place in line, so a
// later conflicting task must not start between its attempts.
func TestOrderingPropertyRetries(t *testing.T) {
	t.Parallel()
	orderingProperty(t, true)
}

func orderingProperty(t *testing.T, retries bool) {
	for _, lc := range lockerCases {
		t.Run(lc.name, func(t *testing.T) {
			t.Parallel()
			seed := testSeed(t)
			rng := rand.New(rand.NewPCG(seed, 0x7a5c))
			const (
				nWorkers     = 3
				slots        = 16
				nTasks       = 2000
				nDispatchers = 4
				universe     = 10
			)
			// Random specs, drawn up front so the seed reproduces them.
			specs := make([]tasking.TaskSpec, nTasks)
			for i := range specs {
				var excl, shared []string
				for _, n := range rng.Perm(universe)[:rng.IntN(4)] {
					if rng.IntN(3) == 0 {
						excl = append(excl, fmt.Sprintf("r%d", n))
					} else {
						shared = append(shared, fmt.Sprintf("r%d", n))
					}
				}
				specs[i] = tasking.Spec("t", map[string]int{"i": i}, tasking.Exclusive(excl...), tasking.Shared(shared...))
			}
			f := fleet{workers: nWorkers, slots: slots, tasks: nTasks, timeout: 40 * time.Second}
			if retries {
				// One task in five fails its first attempt and is retried:
				// it must hold its place in line until its second attempt
				// is final.
				f.failFirst = func(id int64) bool { return id%5 == 0 }
			}
			tasks, events := f.run(t, seed, lc.new(t), func(ctx context.Context, disp *tasking.Client) {
				var wg sync.WaitGroup
				for d := 0; d < nDispatchers; d++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for i := d; i < nTasks; i += nDispatchers {
							if _, err := disp.DispatchMany(ctx, specs[i]); err != nil {
								t.Errorf("dispatch: %v", err)
								return
							}
						}
					}()
				}
				wg.Wait()
			})
			checkPromise(t, seed, tasks, events)
		})
	}
}

// fleet is an in-process fleet of workers, each with a client and pool of
// its own (as separate processes would have), handling task name "t".
type fleet struct {
	workers, slots int
	tasks          int           // how many tasks dispatch stores
	timeout        time.Duration // for the whole run
	// failFirst, if set, says which tasks fail their first attempt; the
	// handler retries them once. A task's event then spans both attempts.
	failFirst func(id int64) bool
}

// run starts the fleet on a fresh schema, calls dispatch with a client of
// its own, waits until f.tasks handlers have run and every task is final,
// and returns the tasks (by id) and the handlers' record. A handler whose
// task id is a multiple of 7 sleeps 300 µs; the others return at once.
func (f fleet) run(t *testing.T, seed uint64, newLocker func() tasking.ResourceLocker,
	dispatch func(ctx context.Context, disp *tasking.Client)) ([]*tasking.Task, map[int64]*event) {
	t.Helper()
	pool := testdb.Pool(t, 10)
	schema := testdb.Schema(t, pool)
	client := func(p *pgxpool.Pool) *tasking.Client {
		c, err := tasking.New(p, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()),
			tasking.WithLocker(newLocker()))
		require.NoError(t, err)
		return c
	}
	disp := client(pool)
	require.NoError(t, disp.Migrate(ctxT(t, 30*time.Second)))

	var clock atomic.Int64
	var mu sync.Mutex
	events := make(map[int64]*event)
	var finished atomic.Int64
	allDone := make(chan struct{})
	handler := func(ctx context.Context, task *tasking.Task) error {
		ev := &event{start: clock.Add(1)}
		mu.Lock()
		if old := events[task.ID]; old != nil {
			if task.Attempt == 2 && f.failFirst != nil && f.failFirst(task.ID) && old.end == 0 {
				ev = old // the retry: the event runs from the first attempt's start
			} else {
				old.runs++
				mu.Unlock()
				return fmt.Errorf("task %d ran twice", task.ID)
			}
		}
		ev.runs = 1
		events[task.ID] = ev
		mu.Unlock()
		if task.Attempt == 1 && f.failFirst != nil && f.failFirst(task.ID) {
			return errors.New("first attempt fails")
		}
		if d := task.ID % 7; d == 0 { // some tasks take a little while
			time.Sleep(time.Duration(d+1) * 300 * time.Microsecond)
		}
		ev.end = clock.Add(1)
		if finished.Add(1) == int64(f.tasks) {
			close(allDone)
		}
		return nil
	}
	for i := 0; i < f.workers; i++ {
		w := tasking.NewWorker(client(testdb.Pool(t, 8)), tasking.WithSlots(f.slots),
			tasking.WithWorkerName(fmt.Sprintf("w%d", i)), tasking.WithPollInterval(200*time.Millisecond))
		var opts []tasking.HandlerOption
		if f.failFirst != nil {
			opts = append(opts, tasking.HandlerRetry(tasking.RetryPolicy{Attempts: 2, Backoff: time.Millisecond}))
		}
		w.Handle("t", handler, opts...)
		runWorker(t, w)
	}

	ctx := ctxT(t, f.timeout)
	dispatch(ctx, disp)
	select {
	case <-allDone:
	case <-ctx.Done():
		dumpStuck(t, pool, schema)
		t.Fatalf("seed %d: only %d of %d tasks ran", seed, finished.Load(), f.tasks)
	}

	// Wait for every final state, then read the tasks back.
	var tasks []*tasking.Task
	for {
		tasks = readAll(t, pool, schema)
		if countFinal(tasks) == f.tasks || ctx.Err() != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	require.Len(t, tasks, f.tasks)
	mu.Lock()
	defer mu.Unlock()
	return tasks, maps.Clone(events)
}

func countFinal(ts []*tasking.Task) int {
	n := 0
	for _, t := range ts {
		if t.State.Final() {
			n++
		}
	}
	return n
}

// readAll reads every task of a schema ordered by id.
func readAll(t testing.TB, pool *pgxpool.Pool, schema string) []*tasking.Task {
	t.Helper()
	c, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()))
	require.NoError(t, err)
	var out []*tasking.Task
	var cursor int64
	for {
		page, next, err := c.List(context.Background(), tasking.ListFilter{After: cursor, Limit: 1000})
		require.NoError(t, err)
		out = append(out, page...)
		if next == 0 {
			return out
		}
		cursor = next
	}
}

func conflicts(a, b *tasking.Task) bool {
	in := func(n string, s []string) bool { return slices.Contains(s, n) }
	for _, n := range a.Exclusive {
		if in(n, b.Exclusive) || in(n, b.Shared) {
			return true
		}
	}
	for _, n := range b.Exclusive {
		if in(n, a.Shared) {
			return true
		}
	}
	return false
}

func checkPromise(t *testing.T, seed uint64, tasks []*tasking.Task, events map[int64]*event) {
	t.Helper()
	var p1, p2, p4, p5 int
	report := func(counter *int, format string, a ...any) {
		*counter++
		if *counter <= 5 {
			t.Errorf("seed %d: "+format, append([]any{seed}, a...)...)
		}
	}
	for _, task := range tasks {
		ev := events[task.ID]
		switch {
		case ev == nil:
			report(&p5, "P5: task %d never ran (state %s)", task.ID, task.State)
		case ev.runs != 1:
			report(&p5, "P5: task %d ran %d times", task.ID, ev.runs)
		case task.State != tasking.StateCompleted:
			report(&p5, "P5: task %d ended %s: %s", task.ID, task.State, task.Error)
		}
	}
	for i, a := range tasks {
		for _, b := range tasks[i+1:] { // a.ID < b.ID
			if !conflicts(a, b) {
				continue
			}
			ea, eb := events[a.ID], events[b.ID]
			if ea == nil || eb == nil {
				continue
			}
			if ea.start < eb.end && eb.start < ea.end {
				report(&p1, "P1: conflicting tasks %d %v/%v and %d %v/%v overlapped",
					a.ID, a.Exclusive, a.Shared, b.ID, b.Exclusive, b.Shared)
			}
			if eb.start < ea.end || !b.StartedAt.After(a.FinishedAt) {
				report(&p2, "P2: task %d started before earlier conflicting task %d was final", b.ID, a.ID)
				for _, n := range a.Exclusive {
					if slices.Contains(b.Shared, n) && eb.start < ea.end {
						report(&p4, "P4: shared task %d overtook exclusive task %d on %s", b.ID, a.ID, n)
					}
				}
			}
		}
	}
	t.Logf("seed %d: %d tasks; violations P1=%d P2=%d P4=%d P5=%d", seed, len(tasks), p1, p2, p4, p5)
}

// dumpStuck logs what the tasks table says when a fleet test stalls.
func dumpStuck(t *testing.T, pool *pgxpool.Pool, schema string) {
	ctx := context.Background()
	q := pgx.Identifier{schema}.Sanitize()
	rows, err := pool.Query(ctx, `SELECT state, blockers, count(*), min(id) FROM `+q+`.tasks GROUP BY 1, 2 ORDER BY 1, 2`)
	if err != nil {
		t.Logf("dump: %v", err)
		return
	}
	for rows.Next() {
		var st string
		var b, n, id int64
		_ = rows.Scan(&st, &b, &n, &id)
		t.Logf("state %s blockers %d: %d tasks (first %d)", st, b, n, id)
	}
	rows.Close()
	var h int64
	_ = pool.QueryRow(ctx, `SELECT count(*) FROM `+q+`.handoffs`).Scan(&h)
	t.Logf("handoffs %d", h)
	rows, err = pool.Query(ctx, `SELECT l.resource, l.task, l.excl, l.blocked, t.state FROM `+q+`.lines l JOIN `+q+`.tasks t ON t.id = l.task
		WHERE l.task IN (SELECT min(task) FROM `+q+`.lines GROUP BY resource) ORDER BY 1`)
	if err != nil {
		t.Logf("dump: %v", err)
		return
	}
	for rows.Next() {
		var r, st string
		var id int64
		var x, b bool
		_ = rows.Scan(&r, &id, &x, &b, &st)
		t.Logf("line %s head %d excl %v blocked %v state %s", r, id, x, b, st)
	}
	rows.Close()
}
