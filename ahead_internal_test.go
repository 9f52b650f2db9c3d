package tasking

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking/internal/testdb"
)

// aheadClient is a migrated client on a schema of its own, PostgreSQL locker.
func aheadClient(t *testing.T) (*Client, context.Context) {
	t.Helper()
	pool := testdb.Pool(t, 8)
	c, err := New(pool, WithSchema(testdb.Schema(t, pool)), WithLocker(NewPostgresLocker()),
		WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	require.NoError(t, c.Migrate(ctx))
	return c, ctx
}

// runWorker runs w until the test ends; stop stops it early, returning Run's
// error.
func runWorker(t *testing.T, ctx context.Context, w *Worker) (stop func() error) {
	t.Helper()
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(rctx) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() { cancel(); err = <-done })
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

// TestClaimAheadKeepsSlotsAndOrder: a worker with 2 slots that claims ahead
// runs no more than 2 handlers at once, keeps every line's order and
// exclusion, and its steps carry more tasks than it has slots.
func TestClaimAheadKeepsSlotsAndOrder(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	w := NewWorker(c, WithSlots(2), WithClaimAhead(8))
	var mu sync.Mutex
	var steps []int
	w.cfg.onStep = func(n int) { mu.Lock(); steps = append(steps, n); mu.Unlock() }
	var running, most atomic.Int32
	holder := make(map[string]int64) // exclusive resource -> task running on it
	var order []int64                // starts of the tasks on e0
	var errs []string
	w.Handle("t", func(_ context.Context, task *Task) error {
		n := running.Add(1)
		defer running.Add(-1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		r := task.Exclusive[0]
		mu.Lock()
		if h, ok := holder[r]; ok {
			errs = append(errs, fmt.Sprintf("task %d started on %s while %d runs", task.ID, r, h))
		}
		holder[r] = task.ID
		if r == "e0" {
			order = append(order, task.ID)
		}
		mu.Unlock()
		time.Sleep(50 * time.Microsecond)
		mu.Lock()
		delete(holder, r)
		mu.Unlock()
		return nil
	})
	const n = 400
	specs := make([]TaskSpec, n)
	for i := range specs {
		specs[i] = Spec("t", nil, Exclusive(fmt.Sprintf("e%d", i%5)), Shared("s"))
	}
	tasks, err := c.DispatchMany(ctx, specs...)
	require.NoError(t, err)
	runWorker(t, ctx, w)
	for _, task := range tasks {
		waitState(t, ctx, c, task.ID, StateCompleted)
	}
	mu.Lock()
	defer mu.Unlock()
	require.Empty(t, errs)
	require.LessOrEqual(t, most.Load(), int32(2), "never more handlers than slots")
	var want []int64
	for i, task := range tasks {
		if i%5 == 0 {
			want = append(want, task.ID)
		}
	}
	require.Equal(t, want, order, "e0's tasks start in dispatch order")
	biggest := 0
	for _, s := range steps {
		biggest = max(biggest, s)
	}
	require.Greater(t, biggest, 2, "some step finished more tasks than the worker has slots: it claimed ahead (steps %v)", steps)
}

// aheadEnv is a worker with one slot that claims up to 4 ahead, whose
// averages were primed with quick tasks, running a blocking task (until
// release is closed or its context is done) with 4 quick tasks claimed
// ahead behind it, each on a resource of its own. causes holds the cause of
// each quick handler's context when it returned (nil: not canceled).
type aheadEnv struct {
	w       *Worker
	stop    func() error
	after   []*Task
	release chan struct{}
	causes  sync.Map // task id -> error
}

func aheadSetup(t *testing.T, ctx context.Context, c *Client, wait time.Duration) *aheadEnv {
	t.Helper()
	e := &aheadEnv{release: make(chan struct{})}
	w := NewWorker(c, WithWorkerName("first"), WithSlots(1), WithClaimAhead(4), WithPollInterval(50*time.Millisecond))
	w.cfg.aheadWait = wait
	e.w = w
	started := make(chan struct{})
	w.Handle("quick", func(ctx context.Context, task *Task) error {
		e.causes.Store(task.ID, context.Cause(ctx))
		return nil
	})
	w.Handle("block", func(ctx context.Context, _ *Task) error {
		close(started)
		select {
		case <-e.release:
		case <-ctx.Done():
		}
		return nil
	})
	e.stop = runWorker(t, ctx, w)
	primeQuick(t, ctx, c)
	specs := []TaskSpec{Spec("block", nil, Exclusive("b"))}
	for i := range 4 {
		specs = append(specs, Spec("quick", nil, Exclusive(fmt.Sprintf("a%d", i))))
	}
	ts, err := c.DispatchMany(ctx, specs...)
	require.NoError(t, err)
	<-started
	e.after = ts[1:]
	allIn(t, ctx, c, e.after, "the tasks behind the blocking one are claimed ahead", func(got *Task) bool {
		return got.State == StateRunning && got.WorkerID == w.ID()
	})
	return e
}

// primeQuick runs 20 quick tasks (no resources) to the end, so that the
// running worker's averages say its handlers return faster than its steps
// take.
func primeQuick(t *testing.T, ctx context.Context, c *Client) {
	t.Helper()
	var prime []TaskSpec
	for range 20 {
		prime = append(prime, Spec("quick", nil))
	}
	ps, err := c.DispatchMany(ctx, prime...)
	require.NoError(t, err)
	for _, p := range ps {
		_, err := c.Wait(ctx, p.ID)
		require.NoError(t, err)
	}
}

// TestClaimAheadPutBackAtShutdown: tasks claimed ahead that have not started
// when the worker stops go back to waiting, with their attempt undone and
// their locks released, and run under the next worker.
func TestClaimAheadPutBackAtShutdown(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	e := aheadSetup(t, ctx, c, time.Minute)
	putBackAtShutdown(t, ctx, c, e.stop, e.release, e.after)
}

// putBackAtShutdown stops the worker (stop) while its blocking task runs,
// checks that the tasks of after go back to waiting, lets the blocking task
// return (release), and checks that a second worker runs them.
func putBackAtShutdown(t *testing.T, ctx context.Context, c *Client, stop func() error, release chan struct{}, after []*Task) {
	t.Helper()
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	allIn(t, ctx, c, after, "put back at shutdown", func(got *Task) bool { return got.State == StateWaiting })
	close(release)
	require.NoError(t, <-stopped)
	runsAfterPutBack(t, ctx, c, after)
}

// allIn waits until ok holds for every task of ts, as read back.
func allIn(t *testing.T, ctx context.Context, c *Client, ts []*Task, what string, ok func(*Task) bool) {
	t.Helper()
	require.Eventually(t, func() bool {
		for _, a := range ts {
			got, err := c.Get(ctx, a.ID)
			require.NoError(t, err)
			if !ok(got) {
				return false
			}
		}
		return true
	}, 10*time.Second, 5*time.Millisecond, what)
}

// runsAfterPutBack starts a second worker and checks that it runs the tasks
// that the first one claimed ahead and put back: each was claimed twice, and
// by nobody else.
func runsAfterPutBack(t *testing.T, ctx context.Context, c *Client, after []*Task) {
	t.Helper()
	w2 := NewWorker(c, WithWorkerName("second"), WithSlots(4), WithPollInterval(50*time.Millisecond))
	w2.Handle("quick", func(context.Context, *Task) error { return nil })
	w2.Handle("block", func(context.Context, *Task) error { return nil })
	runWorker(t, ctx, w2)
	for _, a := range after {
		got := waitState(t, ctx, c, a.ID, StateCompleted)
		require.Equal(t, w2.ID(), got.WorkerID, "task %d runs on the second worker", a.ID)
		require.Equal(t, 2, got.Epoch, "task %d: claimed ahead, put back, claimed by the second worker", a.ID)
	}
}

// waitState waits for task id to be final and checks its state.
func waitState(t *testing.T, ctx context.Context, c *Client, id int64, want State) *Task {
	t.Helper()
	got, err := c.Wait(ctx, id)
	require.NoError(t, err)
	require.Equal(t, want, got.State, "task %d: %s", id, got.Error)
	return got
}

// TestClaimAheadPutBackWhenSlow: a task claimed ahead behind a handler that
// runs longer than the worker measured is put back after the wait bound,
// and another worker with a free slot runs it meanwhile; the first worker
// does not claim it ahead again.
func TestClaimAheadPutBackWhenSlow(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	e := aheadSetup(t, ctx, c, 100*time.Millisecond)
	defer close(e.release)
	runsAfterPutBack(t, ctx, c, e.after)
}

// TestClaimAheadCancel: a task canceled while it waits for a slot ends
// canceled, its handler started with a canceled context.
func TestClaimAheadCancel(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	e := aheadSetup(t, ctx, c, time.Minute)
	require.NoError(t, c.Cancel(ctx, e.after[1].ID))
	// The cancel reaches the worker by a message (or its heartbeat's sweep,
	// seconds later); give the message ample time.
	time.Sleep(time.Second)
	close(e.release)
	for i, a := range e.after {
		want, cause := StateCompleted, error(nil)
		if i == 1 {
			want, cause = StateCanceled, ErrCanceled
		}
		waitState(t, ctx, c, a.ID, want)
		got, ok := e.causes.Load(a.ID)
		require.True(t, ok, "task %d ran", a.ID)
		require.Equal(t, cause, got, "task %d", a.ID)
	}
}

// TestClaimAheadCancelThenShutdown: a task canceled while it waits for a slot
// is not put back when the worker stops: it ends canceled, at once.
func TestClaimAheadCancelThenShutdown(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	e := aheadSetup(t, ctx, c, time.Minute)
	require.NoError(t, c.Cancel(ctx, e.after[1].ID))
	stopped := make(chan error, 1)
	go func() { stopped <- e.stop() }()
	waitState(t, ctx, c, e.after[1].ID, StateCanceled)
	close(e.release)
	require.NoError(t, <-stopped)
	for i, a := range e.after {
		if i == 1 {
			continue
		}
		got, err := c.Get(ctx, a.ID)
		require.NoError(t, err)
		require.Equal(t, StateWaiting, got.State, "task %d put back", a.ID)
	}
	_, ran := e.causes.Load(e.after[1].ID)
	require.False(t, ran, "the canceled task's handler never ran")
}

// TestClaimAheadOption: the default claims ahead up to 64 tasks in a step,
// none from 64 slots up; a negative value is refused.
func TestClaimAheadOption(t *testing.T) {
	c := &Client{}
	require.Equal(t, 59, NewWorker(c, WithSlots(5)).cfg.ahead)
	require.Equal(t, 32, NewWorker(c, WithSlots(32)).cfg.ahead)
	require.Equal(t, 0, NewWorker(c, WithSlots(64)).cfg.ahead)
	require.Equal(t, 0, NewWorker(c, WithSlots(5), WithClaimAhead(0)).cfg.ahead)
	w := NewWorker(c, WithSlots(5), WithClaimAhead(-1))
	w.Handle("t", func(context.Context, *Task) error { return nil })
	require.ErrorContains(t, w.validate(), "claim ahead")
}
