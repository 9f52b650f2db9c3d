package tasking

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
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

	failFirst atomic.Bool // the blocking task's first attempt fails (it retries)

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
	var once sync.Once
	w.Handle("block", func(ctx context.Context, task *Task) error {
		enter()
		defer leave()
		once.Do(func() { close(started) })
		select {
		case <-e.release:
		case <-ctx.Done():
		}
		if e.failFirst.Load() && task.Attempt == 1 {
			return errors.New("first attempt fails")
		}
		return nil
	})
	e.stop = runWorker(t, ctx, w)
	primeQuick(t, ctx, c)
	specs := []TaskSpec{Spec("block", nil, Exclusive("r"), Retry(RetryPolicy{Attempts: 2, Backoff: 200 * time.Millisecond}))}
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
	allIn(t, ctx, c, e.after, "the tasks behind the blocking one are claimed in its chain", func(got *Task) bool {
		return got.State == StateRunning && got.WorkerID == e.w.ID()
	})
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
	putBackAtShutdown(t, ctx, c, e.stop, e.release, e.after)
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

// TestChainHeadRetries: when the task at the head of a chain fails and is
// to run again, the chained tasks do not start: they go back to waiting
// behind it, and run, in order, after its second attempt is final.
func TestChainHeadRetries(t *testing.T) {
	t.Parallel()
	c, ctx := aheadClient(t)
	e := chainSetup(t, ctx, c, time.Minute)
	e.chained(t, ctx, c)
	e.failFirst.Store(true)
	close(e.release)
	got := waitState(t, ctx, c, e.block.ID, StateCompleted)
	require.Equal(t, 2, got.Attempt, "the head ran twice")
	for _, a := range e.after {
		waitState(t, ctx, c, a.ID, StateCompleted)
	}
	e.inOrder(t, ctx, c, ids(e.after))
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

// TestChainsMatchModel drives the schema's functions (dispatch, step with
// chains, pass, unclaim, cancel) through a seeded random history on few
// names, as a worker would use them: a chained task starts only by pass
// from the task before it, is put back with the tasks behind it, and ends
// canceled through a step when canceled while it waits. After every action
// the ready tasks are exactly those the definition says, and every chained
// task was, when claimed, blocked by the tasks before it in its chain and
// by nothing else. Replay a failure with TASKING_SEED.
func TestChainsMatchModel(t *testing.T) {
	t.Parallel()
	rig := newModelRig(t)
	ctx, c, conn, worker, seed, rng := rig.ctx, rig.c, rig.conn, rig.worker, rig.seed, rig.rng
	name := func() string { return fmt.Sprintf("r%d", rng.IntN(3)) }
	var model []modelTask
	byID := map[int64]int{}
	started := map[int64]*Task{} // running here and started (claimed, or passed to)
	waiting := map[int64]*Task{} // chained, not started
	next := map[int64]int64{}    // a task -> the chained task behind it
	var chains, passes, backs, canceledWaiting int
	defer func() {
		t.Logf("seed %d: %d chained, %d passes, %d put back, %d canceled while chained", seed, chains, passes, backs, canceledWaiting)
	}()
	check := func(step int, what string) {
		t.Helper()
		rig.check(t, model, step, what)
	}
	// putBack puts id and the chained tasks behind it back, as giveBack
	// does; those canceled meanwhile end canceled through a step.
	putBack := func(step int, id int64) {
		var ts []*Task
		for x := id; x != 0; x = next[x] {
			if tk := waiting[x]; tk != nil {
				ts = append(ts, tk)
			}
		}
		for _, tk := range ts {
			for p, n := range next {
				if n == tk.ID {
					delete(next, p)
				}
			}
			delete(next, tk.ID)
			delete(waiting, tk.ID)
		}
		put, err := (&run{c: c, id: worker}).unclaimed(ctx, conn, ts)
		require.NoError(t, err)
		var outs []outcome
		for _, tk := range ts {
			m := &model[byID[tk.ID]]
			if put[tk.ID] {
				m.state = StateWaiting
				backs++
				continue
			}
			require.Equal(t, StateCanceling, m.state, "seed %d: task %d not put back", seed, tk.ID)
			outs = append(outs, outcome{task: tk, state: StateCanceled, err: ErrCanceled.Error()})
			m.state = StateCanceled
			canceledWaiting++
		}
		if len(outs) > 0 {
			_, err := c.step(ctx, conn, worker, outs, []string{"t"}, "{}", 0, 0, time.Hour, true)
			require.NoError(t, err)
		}
		check(step, "put back")
	}
	for step := 0; step < 500; step++ {
		switch k := rng.IntN(12); {
		case k < 3: // dispatch a few, most naming one resource exclusively
			var specs []TaskSpec
			for range 1 + rng.IntN(4) {
				opts := []DispatchOption{Exclusive(name())}
				if rng.IntN(4) == 0 {
					opts = append(opts, Shared(name()))
				}
				specs = append(specs, Spec("t", nil, opts...))
			}
			ts, err := c.DispatchMany(ctx, specs...)
			require.NoError(t, err)
			for _, tk := range ts {
				byID[tk.ID] = len(model)
				model = append(model, modelTask{id: tk.ID, excl: tk.Exclusive, shr: tk.Shared, state: StateWaiting})
			}
			check(step, "dispatch")
		case k < 6: // finish some started tasks with no chained task behind them, claim and chain
			var outs []outcome
			for id, tk := range started {
				if next[id] == 0 && rng.IntN(2) == 0 {
					st := []State{StateCompleted, StateFailed}[rng.IntN(2)]
					outs = append(outs, outcome{task: tk, state: st})
					m := &model[byID[id]]
					if m.state == StateCanceling {
						st = StateCanceled
					}
					m.state = st
					delete(started, id)
				}
			}
			res, err := c.step(ctx, conn, worker, outs, []string{"t"}, "{}", rng.IntN(3), rng.IntN(4), time.Hour, true)
			require.NoError(t, err)
			require.Len(t, res.done, len(outs))
			for _, tk := range res.claimed {
				require.Contains(t, modelReady(model), tk.ID, "seed %d: claimed a task that is not ready", seed)
			}
			for _, tk := range res.claimed {
				model[byID[tk.ID]].state = StateRunning
				started[tk.ID] = tk
			}
			after, orphans := chainLinks(res.claimed, res.chained)
			require.Empty(t, orphans, "seed %d: chained behind no claimed task", seed)
			for _, tk := range res.chained {
				m := model[byID[tk.ID]]
				require.Equal(t, StateWaiting, m.state, "seed %d: chained task %d", seed, tk.ID)
				require.True(t, len(m.excl) == 1 && len(m.shr) == 0, "seed %d: chained task %d names %v %v", seed, tk.ID, m.excl, m.shr)
				// Blocked by the chain before it, and by nothing else.
				var chain []int64
				for p := after[tk.ID]; p != 0; {
					chain = append(chain, p)
					prev := int64(0)
					for x, n := range after {
						if x == p {
							prev = n
						}
					}
					p = prev
				}
				var blockers []int64
				for _, u := range model[:byID[tk.ID]] {
					if !u.state.Final() && u.conflicts(m) {
						blockers = append(blockers, u.id)
					}
				}
				require.ElementsMatch(t, chain, blockers, "seed %d: chained task %d", seed, tk.ID)
				model[byID[tk.ID]].state = StateRunning
				waiting[tk.ID] = tk
				next[after[tk.ID]] = tk.ID
				chains++
			}
			check(step, "step")
		case k < 9: // a started task with a chained one behind it hands its line on
			var heads []int64
			for id := range started {
				if next[id] != 0 {
					heads = append(heads, id)
				}
			}
			if len(heads) == 0 {
				continue
			}
			slices.Sort(heads)
			h := started[heads[rng.IntN(len(heads))]]
			nx := waiting[next[h.ID]]
			st := []State{StateCompleted, StateFailed}[rng.IntN(2)]
			var got *string
			require.NoError(t, conn.use(ctx, func(cn *pgx.Conn) error {
				return cn.QueryRow(ctx, c.q.pass, worker, h.ID, int32(h.Epoch), string(st), "", nil, nil, nx.ID, int32(nx.Epoch)).Scan(&got)
			}))
			require.NotNil(t, got, "seed %d: pass from %d", seed, h.ID)
			m := &model[byID[h.ID]]
			if m.state == StateCanceling {
				st = StateCanceled
			}
			m.state = st
			require.Equal(t, string(model[byID[nx.ID]].state), *got, "seed %d: state of %d after pass", seed, nx.ID)
			delete(started, h.ID)
			delete(next, h.ID)
			delete(waiting, nx.ID)
			started[nx.ID] = nx
			passes++
			check(step, "pass")
		case k < 10: // a chained task waited too long: back with those behind it
			var ids []int64
			for id := range waiting {
				ids = append(ids, id)
			}
			if len(ids) == 0 {
				continue
			}
			slices.Sort(ids)
			putBack(step, ids[rng.IntN(len(ids))])
		default: // cancel a task that is not final
			var open []int64
			for _, m := range model {
				if m.state == StateWaiting || m.state == StateRunning {
					open = append(open, m.id)
				}
			}
			if len(open) == 0 {
				continue
			}
			id := open[rng.IntN(len(open))]
			if len(waiting) > 0 && rng.IntN(2) == 0 { // often a chained one
				var ids []int64
				for x := range waiting {
					ids = append(ids, x)
				}
				slices.Sort(ids)
				id = ids[rng.IntN(len(ids))]
			}
			require.NoError(t, c.Cancel(ctx, id))
			m := &model[byID[id]]
			if m.state == StateWaiting {
				m.state = StateCanceled
			} else {
				m.state = StateCanceling
			}
			check(step, "cancel")
		}
	}
}

// A slow first hand-off (a cold start) must not switch chains off for good:
// only hand-offs update their average, so an estimate that left no room for
// a chain would never be corrected. A step bounds a hand-off's cost.
func TestChainRoomAfterSlowFirstPass(t *testing.T) {
	r := &run{w: &Worker{cfg: workerConfig{ahead: 31, aheadWait: aheadWait}}}
	r.handlerAvg = 10 * time.Microsecond
	r.stepAvg = 1200 * time.Microsecond
	before := r.chainRoom()
	require.Positive(t, before)
	r.passTook(38 * time.Millisecond) // seen in the benchmark: the first pass of a 16-process run
	require.Equal(t, before, r.chainRoom(), "a hand-off slower than a step left less room than a step")
	for range 50 {
		r.passTook(500 * time.Microsecond)
	}
	require.Greater(t, r.chainRoom(), before, "quick hand-offs make room for longer chains")
}
