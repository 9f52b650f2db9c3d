package tasking

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// chainEnv is a worker with 4 slots, its averages primed with quick tasks,
// running a blocking task exclusive on "r" (until release is closed or its
// context is done) with 4 quick tasks queued behind it on "r". starts
// records the quick handlers in the order they started, with the cause of
// their context (nil: not canceled); each quick handler checks that no
// other task on "r" runs.
type chainEnv struct {
	w       *Worker
	stop    func() error
	block   *Task
	after   []*Task
	release chan struct{}

	mu      sync.Mutex
	onR     int // handlers on "r" running
	overlap bool
	starts  []int64
	causes  map[int64]error
}

func chainSetup(t *testing.T, ctx context.Context, c *Client, wait time.Duration, opts ...WorkerOption) *chainEnv {
	t.Helper()
	e := &chainEnv{release: make(chan struct{}), causes: make(map[int64]error)}
	w := NewWorker(c, append([]WorkerOption{WithWorkerName("first"), WithSlots(4), WithPollInterval(50 * time.Millisecond)}, opts...)...)
	w.cfg.aheadWait = wait
	e.w = w
	started := make(chan struct{})
	enter := func() {
		e.mu.Lock()
		e.onR++
		e.overlap = e.overlap || e.onR > 1
		e.mu.Unlock()
	}
	leave := func() {
		e.mu.Lock()
		e.onR--
		e.mu.Unlock()
	}
	w.Handle("quick", func(ctx context.Context, task *Task) error {
		if len(task.Exclusive) == 0 {
			return nil // priming
		}
		enter()
		defer leave()
		e.mu.Lock()
		e.starts = append(e.starts, task.ID)
		e.causes[task.ID] = context.Cause(ctx)
		e.mu.Unlock()
		return nil
	})
	w.Handle("block", func(ctx context.Context, _ *Task) error {
		enter()
		defer leave()
		close(started)
		select {
		case <-e.release:
		case <-ctx.Done():
		}
		return nil
	})
	e.stop = runWorker(t, ctx, w)
	primeQuick(t, ctx, c)
	specs := []TaskSpec{Spec("block", nil, Exclusive("r"))}
	for range 4 {
		specs = append(specs, Spec("quick", nil, Exclusive("r")))
	}
	ts, err := c.DispatchMany(ctx, specs...)
	require.NoError(t, err)
	<-started
	e.block, e.after = ts[0], ts[1:]
	return e
}

// chained waits until the tasks behind the blocking one are claimed by the
// worker while it runs.
func (e *chainEnv) chained(t *testing.T, ctx context.Context, c *Client) {
	t.Helper()
	require.Eventually(t, func() bool {
		for _, a := range e.after {
			got, err := c.Get(ctx, a.ID)
			require.NoError(t, err)
			if got.State != StateRunning || got.WorkerID != e.w.ID() {
				return false
			}
		}
		return true
	}, 10*time.Second, 5*time.Millisecond, "the tasks behind the blocking one are claimed in its chain")
}

// inOrder checks that ids started in dispatch order, one after another
// (by the handlers and by the database's timestamps), after the blocking
// task.
func (e *chainEnv) inOrder(t *testing.T, ctx context.Context, c *Client, ids []int64) {
	t.Helper()
	e.mu.Lock()
	require.False(t, e.overlap, "two tasks on r ran at once")
	require.Equal(t, ids, e.starts, "the line's tasks start in dispatch order")
	e.mu.Unlock()
	prev, err := c.Get(ctx, e.block.ID)
	require.NoError(t, err)
	for _, id := range ids {
		got := waitState(t, ctx, c, id, StateCompleted)
		require.True(t, got.StartedAt.After(prev.FinishedAt),
			"task %d started at %v, before task %d was final at %v", id, got.StartedAt, prev.ID, prev.FinishedAt)
		prev = got
	}
}

func ids(ts []*Task) []int64 {
	out := make([]int64, len(ts))
	for i, t := range ts {
		out[i] = t.ID
	}
	return out
}

// TestChainRunsLineInOrder: the tasks queued behind a running task on its
// one resource are claimed with it, and each starts when the one before it
// is final, in dispatch order, none beside another.
func TestChainRunsLineInOrder(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	e := chainSetup(t, ctx, c, time.Minute)
	e.chained(t, ctx, c)
	close(e.release)
	for _, a := range e.after {
		waitState(t, ctx, c, a.ID, StateCompleted)
	}
	e.inOrder(t, ctx, c, ids(e.after))
	for _, a := range e.after {
		got, err := c.Get(ctx, a.ID)
		require.NoError(t, err)
		require.Equal(t, 1, got.Epoch, "task %d was claimed once", a.ID)
	}
}

// TestChainPutBackAtShutdown: chained tasks go back to waiting when the
// worker stops, keep their place, and run in order under the next worker.
func TestChainPutBackAtShutdown(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	e := chainSetup(t, ctx, c, time.Minute)
	e.chained(t, ctx, c)
	stopped := make(chan error, 1)
	go func() { stopped <- e.stop() }()
	require.Eventually(t, func() bool {
		for _, a := range e.after {
			got, err := c.Get(ctx, a.ID)
			require.NoError(t, err)
			if got.State != StateWaiting {
				return false
			}
		}
		return true
	}, 10*time.Second, 5*time.Millisecond, "put back at shutdown")
	close(e.release)
	require.NoError(t, <-stopped)
	runsAfterPutBack(t, ctx, c, e.after)
}

// TestChainCancelWhileWaiting: a chained task canceled while the task at
// the head of its line still runs ends canceled without running; the tasks
// behind it are put back and do not run before the head task is final
// (its end must not free the line past the head), then run in order.
func TestChainCancelWhileWaiting(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	chained := make(chan int, 16)
	e := chainSetup(t, ctx, c, time.Second, func(c *workerConfig) {
		c.onChain = func(n int) {
			select {
			case chained <- n:
			default:
			}
		}
	})
	// The chain waits a second before it is put back (the head runs on):
	// cancel within it.
	select {
	case n := <-chained:
		require.Equal(t, 4, n, "the tasks behind the head are chained")
	case <-ctx.Done():
		t.Fatal("no chain")
	}
	require.NoError(t, c.Cancel(ctx, e.after[1].ID))
	waitState(t, ctx, c, e.after[1].ID, StateCanceled)
	// The others went back behind the head, which still runs: nothing on
	// r may start, however long it runs.
	time.Sleep(500 * time.Millisecond)
	e.mu.Lock()
	require.Empty(t, e.starts, "no task on r started while the head runs")
	e.mu.Unlock()
	// Nor was any claimed again: they stay blocked (a task freed past the
	// head would be claimed, and refused by the locker, again and again).
	for _, i := range []int{0, 2, 3} {
		got, err := c.Get(ctx, e.after[i].ID)
		require.NoError(t, err)
		require.Equal(t, StateWaiting, got.State, "task %d", got.ID)
		require.Equal(t, 1, got.Epoch, "task %d was claimed only in the chain", got.ID)
	}
	close(e.release)
	rest := []int64{e.after[0].ID, e.after[2].ID, e.after[3].ID}
	for _, id := range rest {
		waitState(t, ctx, c, id, StateCompleted)
	}
	e.inOrder(t, ctx, c, rest)
}

// TestChainOff: WithClaimAhead(0) claims no chain either: the tasks behind
// the running one stay waiting.
func TestChainOff(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	e := chainSetup(t, ctx, c, time.Minute, WithClaimAhead(0))
	time.Sleep(300 * time.Millisecond) // steps and polls go by
	for _, a := range e.after {
		got, err := c.Get(ctx, a.ID)
		require.NoError(t, err)
		require.Equal(t, StateWaiting, got.State, "task %d", a.ID)
	}
	close(e.release)
	for _, a := range e.after {
		waitState(t, ctx, c, a.ID, StateCompleted)
	}
	e.inOrder(t, ctx, c, ids(e.after))
}
