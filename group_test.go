package tasking_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// TestGroupLifecycle: a group filled over time is not done, however final
// its tasks, until it is marked all dispatched; WaitGroup is bounded by its
// context; a group dispatched in one call is done when its tasks are.
func TestGroupLifecycle(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c)
	w.Handle("ok", func(context.Context, *tasking.Task) error { return nil })
	w.Handle("fail", func(context.Context, *tasking.Task) error { return fmt.Errorf("no") })
	runWorker(t, w)

	g, err := c.CreateGroup(ctx)
	require.NoError(t, err)
	require.False(t, g.AllDispatched)
	var ids []int64
	for _, name := range []string{"ok", "fail"} {
		task, err := c.Dispatch(ctx, name, nil, tasking.InGroup(g.ID), tasking.Exclusive("r"))
		require.NoError(t, err)
		require.Equal(t, g.ID, task.Group)
		ids = append(ids, task.ID)
	}
	for _, id := range ids {
		_, err := c.Wait(ctx, id)
		require.NoError(t, err)
	}
	got, err := c.GetGroup(ctx, g.ID)
	require.NoError(t, err)
	require.False(t, got.Done, "not marked all dispatched yet")
	require.Equal(t, map[tasking.State]int{tasking.StateCompleted: 1, tasking.StateFailed: 1}, got.Counts)
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err = c.WaitGroup(short, g.ID)
	require.ErrorIs(t, err, context.DeadlineExceeded)

	// More tasks join over time, until the mark.
	third, err := c.Dispatch(ctx, "ok", nil, tasking.InGroup(g.ID))
	require.NoError(t, err)
	require.NoError(t, c.MarkAllDispatched(ctx, g.ID))
	require.NoError(t, c.MarkAllDispatched(ctx, g.ID), "marking again does nothing")
	_, err = c.Dispatch(ctx, "ok", nil, tasking.InGroup(g.ID))
	require.ErrorIs(t, err, tasking.ErrGroupClosed)
	done, err := c.WaitGroup(ctx, g.ID)
	require.NoError(t, err)
	require.True(t, done.Done)
	require.True(t, done.AllDispatched)
	require.False(t, done.Canceled)
	require.Equal(t, 3, done.Total())
	require.Equal(t, map[tasking.State]int{tasking.StateCompleted: 2, tasking.StateFailed: 1}, done.Counts)
	final, err := c.Get(ctx, third.ID)
	require.NoError(t, err)
	require.True(t, final.State.Final(), "WaitGroup returned before a task of the group was final")

	// In one call: created, filled and marked in one transaction.
	g2, tasks, err := c.DispatchGroup(ctx,
		tasking.Spec("ok", nil, tasking.Exclusive("r")),
		tasking.Spec("ok", nil, tasking.Shared("r")),
		tasking.Spec("ok", nil, tasking.InGroup(g.ID))) // a spec's group is the new one
	require.NoError(t, err)
	require.True(t, g2.AllDispatched)
	require.Len(t, tasks, 3)
	for _, task := range tasks {
		require.Equal(t, g2.ID, task.Group)
	}
	done2, err := c.WaitGroup(ctx, g2.ID)
	require.NoError(t, err)
	require.Equal(t, map[tasking.State]int{tasking.StateCompleted: 3}, done2.Counts)
	require.True(t, done2.Done)

	// An empty group marked all dispatched is done.
	empty, err := c.CreateGroup(ctx)
	require.NoError(t, err)
	require.NoError(t, c.MarkAllDispatched(ctx, empty.ID))
	e, err := c.WaitGroup(ctx, empty.ID)
	require.NoError(t, err)
	require.True(t, e.Done)
	require.Zero(t, e.Total())
}

// TestCancelGroup: waiting tasks of the group are canceled at once, running
// ones as Cancel does (their handler's context is canceled, they end
// canceled), final ones stay, later tasks outside the group on the same
// resource run, and the group takes no more tasks.
func TestCancelGroup(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	started := make(chan int64, 4)
	causes := make(chan error, 4)
	w := tasking.NewWorker(c, tasking.WithSlots(4))
	w.Handle("ok", func(context.Context, *tasking.Task) error { return nil })
	w.Handle("block", func(ctx context.Context, task *tasking.Task) error {
		started <- task.ID
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return nil
	})
	runWorker(t, w)

	g, err := c.CreateGroup(ctx)
	require.NoError(t, err)
	first, err := c.Dispatch(ctx, "ok", nil, tasking.InGroup(g.ID), tasking.Exclusive("r"))
	require.NoError(t, err)
	_, err = c.Wait(ctx, first.ID)
	require.NoError(t, err)
	running, err := c.Dispatch(ctx, "block", nil, tasking.InGroup(g.ID), tasking.Exclusive("r"))
	require.NoError(t, err)
	require.Equal(t, running.ID, recv(t, started, 10*time.Second))
	waiting, err := c.Dispatch(ctx, "ok", nil, tasking.InGroup(g.ID), tasking.Exclusive("r"))
	require.NoError(t, err)
	outsider, err := c.Dispatch(ctx, "ok", nil, tasking.Exclusive("r"))
	require.NoError(t, err)

	require.NoError(t, c.CancelGroup(ctx, g.ID))
	w8, err := c.Get(ctx, waiting.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, w8.State, "a waiting task is canceled at once")
	require.ErrorIs(t, recv(t, causes, 10*time.Second), tasking.ErrCanceled)

	done, err := c.WaitGroup(ctx, g.ID)
	require.NoError(t, err)
	require.True(t, done.Done)
	require.True(t, done.Canceled)
	require.Equal(t, map[tasking.State]int{tasking.StateCompleted: 1, tasking.StateCanceled: 2}, done.Counts)
	out, err := c.Wait(ctx, outsider.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, out.State, "the next task in line, outside the group, runs")

	_, err = c.Dispatch(ctx, "ok", nil, tasking.InGroup(g.ID))
	require.ErrorIs(t, err, tasking.ErrGroupCanceled)
	require.NoError(t, c.CancelGroup(ctx, g.ID), "canceling again does nothing")
}

// TestCancelGroupWhileClaiming is the corner of a group canceled while
// workers are claiming its tasks: at every moment of the claiming (at once,
// after the first starts, later), nothing runs twice, every task ends final
// (a task that started ends completed or canceled, one that did not ends
// canceled), tasks on one exclusive resource start in id order one at a
// time, and a task outside the group queued behind them runs after them.
func TestCancelGroupWhileClaiming(t *testing.T) {
	t.Parallel()
	for _, lk := range []string{"postgres", "redis"} {
		t.Run(lk, func(t *testing.T) {
			t.Parallel()
			var opts []tasking.Option
			if lk == "redis" {
				opts = append(opts, tasking.WithLocker(tasking.NewRedisLocker(newRedis(t, testdb.RedisAddr()))))
			}
			c := newClient(t, opts...)
			ctx := ctxT(t, 90*time.Second)

			var mu sync.Mutex
			runs := map[int64]int{}
			var chain []int64 // starts on the exclusive resource, in order
			holding := 0
			overlap := false
			starts := make(chan int64, 1024)
			handle := func(ctx context.Context, task *tasking.Task) error {
				onChain := slices.Contains(task.Exclusive, "chain")
				mu.Lock()
				runs[task.ID]++
				if onChain {
					chain = append(chain, task.ID)
					holding++
					overlap = overlap || holding > 1
				}
				mu.Unlock()
				starts <- task.ID
				if string(task.Args) == `"hold"` {
					<-ctx.Done() // held until the cancel reaches it
				}
				mu.Lock()
				if onChain {
					holding--
				}
				mu.Unlock()
				return nil
			}
			for i := range 2 {
				w := tasking.NewWorker(c, tasking.WithSlots(3), tasking.WithWorkerName(fmt.Sprintf("w%d", i)))
				w.Handle("job", handle)
				runWorker(t, w)
			}

			for round, after := range []int{0, 0, 1, 3, 6} {
				const n = 24
				specs := make([]tasking.TaskSpec, n)
				for i := range specs {
					args := any(nil)
					if i%2 == 0 {
						args = "hold"
					}
					switch i % 3 {
					case 0:
						specs[i] = tasking.Spec("job", args, tasking.Exclusive("chain"))
					case 1:
						specs[i] = tasking.Spec("job", args, tasking.Shared(fmt.Sprintf("s%d", i%4)))
					default:
						specs[i] = tasking.Spec("job", args)
					}
				}
				g, tasks, err := c.DispatchGroup(ctx, specs...)
				require.NoError(t, err)
				outsider, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("chain"))
				require.NoError(t, err)
				for range after {
					recv(t, starts, 20*time.Second)
				}
				require.NoError(t, c.CancelGroup(ctx, g.ID))

				done, err := c.WaitGroup(ctx, g.ID)
				require.NoError(t, err, "round %d", round)
				require.True(t, done.Done)
				t.Logf("round %d, canceled after %d starts: %v", round, after, done.Counts)
				require.Equal(t, n, done.Counts[tasking.StateCompleted]+done.Counts[tasking.StateCanceled],
					"round %d: every task completed or canceled: %v", round, done.Counts)
				out, err := c.Wait(ctx, outsider.ID)
				require.NoError(t, err)
				require.Equal(t, tasking.StateCompleted, out.State, out.Error)

				mu.Lock()
				for _, task := range tasks {
					got, err := c.Get(ctx, task.ID)
					require.NoError(t, err)
					require.LessOrEqual(t, runs[task.ID], 1, "task %d ran twice", task.ID)
					if runs[task.ID] == 0 {
						require.Equal(t, tasking.StateCanceled, got.State, "task %d never ran", task.ID)
					}
				}
				require.Equal(t, 1, runs[outsider.ID])
				require.False(t, overlap, "tasks on one exclusive resource overlapped")
				require.True(t, slices.IsSorted(chain), "round %d: exclusive tasks started out of order: %v", round, chain)
				require.Equal(t, outsider.ID, chain[len(chain)-1], "the outsider starts after the group's tasks")
				mu.Unlock()
				for len(starts) > 0 {
					<-starts
				}
			}
		})
	}
}
