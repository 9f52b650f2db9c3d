package tasking_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// newImmediate returns a runner closed at the end of the test.
func newImmediate(t testing.TB, c *tasking.Client, opts ...tasking.ImmediateOption) *tasking.Immediate {
	t.Helper()
	im := tasking.NewImmediate(c, opts...)
	t.Cleanup(func() {
		if err := im.Close(context.Background()); err != nil {
			t.Errorf("close immediate runner: %v", err)
		}
	})
	return im
}

// lockerOpts returns the client options for a locker kind.
func lockerOpts(t testing.TB, kind string) []tasking.Option {
	if kind == "redis" {
		return []tasking.Option{tasking.WithLocker(tasking.NewRedisLocker(newRedis(t, testdb.RedisAddr())))}
	}
	return nil
}

// TestImmediateRuns: with nothing ahead, the handler runs in the caller with
// its locks and the task is recorded, final, like any other; its children
// record it as their parent; a handler's failure, panic and timeout end the
// task failed as on a worker.
func TestImmediateRuns(t *testing.T) {
	t.Parallel()
	for _, kind := range []string{"postgres", "redis"} {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			c := newClient(t, lockerOpts(t, kind)...)
			ctx := ctxT(t, 30*time.Second)
			im := newImmediate(t, c)

			var child *tasking.Task
			task, err := im.Run(ctx, "sync", map[string]string{"repo": "a"}, func(ctx context.Context, task *tasking.Task) error {
				if task.Fence <= 0 || tasking.TaskFromContext(ctx) != task {
					return errors.New("no fence or no task in the context")
				}
				if err := task.ReportProgress(tasking.Progress{Name: "files", Done: 1, Total: 2}); err != nil {
					return err
				}
				// The handler runs in the caller (here, the test's goroutine):
				// its reports show while it runs.
				seen := waitProgress(t, c, task.ID, func(got *tasking.Task) bool { return len(got.Progress) == 1 })
				if seen.State != tasking.StateRunning || seen.Progress[0].Done != 1 {
					return fmt.Errorf("while running: %+v", seen)
				}
				if err := task.ReportProgress(tasking.Progress{Name: "files", Done: 2, Total: 2}); err != nil {
					return err
				}
				var err error
				if child, err = c.Dispatch(ctx, "publish", nil); err != nil {
					return err
				}
				return task.SetResult("synced")
			}, tasking.Exclusive("repo:a"))
			require.NoError(t, err)
			require.Equal(t, tasking.StateCompleted, task.State, task.Error)
			require.JSONEq(t, `"synced"`, string(task.Result))
			stored, err := c.Get(ctx, task.ID)
			require.NoError(t, err)
			require.Equal(t, tasking.StateCompleted, stored.State)
			require.Equal(t, "sync", stored.Name)
			require.JSONEq(t, `"synced"`, string(stored.Result))
			require.Zero(t, stored.WorkerID, "run by no worker")
			require.False(t, stored.StartedAt.IsZero())
			require.Equal(t, []tasking.Progress{{Name: "files", Done: 2, Total: 2, State: tasking.ProgressRunning}}, stored.Progress)
			require.Equal(t, task.ID, child.Parent)

			failed, err := im.Run(ctx, "f", nil, func(context.Context, *tasking.Task) error { return errors.New("no") })
			require.NoError(t, err, "a failed task is not an error of Run's")
			require.Equal(t, tasking.StateFailed, failed.State)
			require.Equal(t, "no", failed.Error)
			panicked, err := im.Run(ctx, "p", nil, func(context.Context, *tasking.Task) error { panic("boom") }, tasking.Exclusive("repo:a"))
			require.NoError(t, err)
			require.ErrorIs(t, panicked.Err(), tasking.ErrPanic)
			timedOut, err := im.Run(ctx, "t", nil, func(ctx context.Context, _ *tasking.Task) error {
				<-ctx.Done()
				return context.Cause(ctx)
			}, tasking.Timeout(20*time.Millisecond), tasking.Exclusive("repo:a"))
			require.NoError(t, err)
			require.ErrorIs(t, timedOut.Err(), tasking.ErrTimeout)

			// The resource was handed on each time: a queued task on it runs.
			w := tasking.NewWorker(c)
			w.Handle("publish", func(context.Context, *tasking.Task) error { return nil })
			w.Handle("after", func(context.Context, *tasking.Task) error { return nil })
			runWorker(t, w)
			after, err := c.Dispatch(ctx, "after", nil, tasking.Exclusive("repo:a"))
			require.NoError(t, err)
			done, err := c.Wait(ctx, after.ID)
			require.NoError(t, err)
			require.Equal(t, tasking.StateCompleted, done.State)
		})
	}
}

// TestImmediateBlocked: behind an earlier conflicting task that is not
// final, Run reports what it waits behind and records nothing, or, deferred,
// leaves the task to the workers, which run it after the earlier one.
func TestImmediateBlocked(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	im := newImmediate(t, c)
	first, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("a"))
	require.NoError(t, err)
	second, err := c.Dispatch(ctx, "job", nil, tasking.Shared("b"))
	require.NoError(t, err)
	ran := false
	fn := func(context.Context, *tasking.Task) error { ran = true; return nil }

	_, err = im.Run(ctx, "job", nil, fn, tasking.Shared("a"), tasking.Exclusive("b"), tasking.Shared("free"))
	require.ErrorIs(t, err, tasking.ErrBlocked)
	var be *tasking.BlockedError
	require.ErrorAs(t, err, &be)
	require.Equal(t, []int64{first.ID, second.ID}, be.Tasks)
	require.Equal(t, []string{"a", "b"}, be.Resources)
	require.False(t, ran)
	all, _, err := c.List(ctx, tasking.ListFilter{})
	require.NoError(t, err)
	require.Len(t, all, 2, "the blocked task was not recorded")

	// A shared task does not wait behind a shared one.
	shared, err := im.Run(ctx, "job", nil, fn, tasking.Shared("b"))
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, shared.State)
	require.True(t, ran)
	ran = false

	deferred, err := im.Run(ctx, "job", nil, fn, tasking.Exclusive("a"), tasking.DeferIfBlocked())
	require.NoError(t, err)
	require.Equal(t, tasking.StateWaiting, deferred.State)
	require.False(t, ran)
	var order []int64
	var mu sync.Mutex
	w := tasking.NewWorker(c)
	w.Handle("job", func(_ context.Context, task *tasking.Task) error {
		mu.Lock()
		order = append(order, task.ID)
		mu.Unlock()
		return nil
	})
	runWorker(t, w)
	done, err := c.Wait(ctx, deferred.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State)
	require.NotZero(t, done.WorkerID, "a worker ran it")
	mu.Lock()
	require.Less(t, slices.Index(order, first.ID), slices.Index(order, deferred.ID))
	mu.Unlock()
}

// TestImmediateRacesQueued is the corner of immediate tasks racing queued
// conflicting ones, from many goroutines, in both orders, with both
// lockers: tasks on the resource start one at a time in id order, whether
// a worker or a caller runs them, every recorded task ends final, an
// immediate task runs at most once (in the caller, or deferred, on a
// worker), and a blocked one that was not deferred is not recorded.
func TestImmediateRacesQueued(t *testing.T) {
	t.Parallel()
	for _, kind := range []string{"postgres", "redis"} {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			c := newClient(t, lockerOpts(t, kind)...)
			ctx := ctxT(t, 120*time.Second)
			im := newImmediate(t, c)
			seed := testdb.Seed(t)

			var mu sync.Mutex
			var starts []int64
			runs := map[int64]int{}
			holding, overlap := 0, false
			handle := func(_ context.Context, task *tasking.Task) error {
				excl := len(task.Exclusive) > 0
				mu.Lock()
				runs[task.ID]++
				starts = append(starts, task.ID)
				if excl {
					overlap = overlap || holding != 0
					holding = -1
				} else {
					overlap = overlap || holding < 0
					holding++
				}
				mu.Unlock()
				for range 200 { // a little work, so that runs can overlap if allowed to
					_ = rand.N(10)
				}
				mu.Lock()
				if excl {
					holding = 0
				} else {
					holding--
				}
				mu.Unlock()
				return nil
			}
			for i := range 2 {
				w := tasking.NewWorker(c, tasking.WithSlots(4), tasking.WithWorkerName(fmt.Sprintf("w%d", i)))
				w.Handle("job", handle)
				runWorker(t, w)
			}

			// Rounds: in each, every goroutine makes one call at the same
			// moment on an idle line, so immediate and queued tasks race to
			// be first, in both orders; the next round starts once the
			// line is idle again.
			const goroutines, rounds = 8, 25
			type result struct {
				task    *tasking.Task
				err     error
				queued  bool
				deferIt bool
			}
			var recorded []int64
			ranHere, blocked, deferred := 0, 0, 0
			for round := range rounds {
				var wg sync.WaitGroup
				start := make(chan struct{})
				results := make(chan result, goroutines)
				for g := range goroutines {
					wg.Add(1)
					go func() {
						defer wg.Done()
						rng := rand.New(rand.NewPCG(seed, uint64(round*goroutines+g)))
						opts := []tasking.DispatchOption{tasking.Exclusive("r")}
						if rng.IntN(3) == 0 {
							opts = []tasking.DispatchOption{tasking.Shared("r")}
						}
						kind := rng.IntN(3)
						<-start
						switch kind {
						case 0: // queued
							task, err := c.Dispatch(ctx, "job", nil, opts...)
							results <- result{task: task, err: err, queued: true}
						case 1:
							task, err := im.Run(ctx, "job", nil, handle, opts...)
							results <- result{task: task, err: err}
						default:
							task, err := im.Run(ctx, "job", nil, handle, append(opts, tasking.DeferIfBlocked())...)
							results <- result{task: task, err: err, deferIt: true}
						}
					}()
				}
				close(start)
				wg.Wait()
				close(results)
				for r := range results {
					switch {
					case r.err != nil:
						require.ErrorIs(t, r.err, tasking.ErrBlocked)
						require.False(t, r.deferIt || r.queued)
						blocked++
						continue
					case r.queued:
					case r.task.State == tasking.StateWaiting:
						deferred++
					default:
						require.Equal(t, tasking.StateCompleted, r.task.State, r.task.Error)
						ranHere++
					}
					recorded = append(recorded, r.task.ID)
					done, err := c.Wait(ctx, r.task.ID)
					require.NoError(t, err)
					require.Equal(t, tasking.StateCompleted, done.State, done.Error)
				}
			}
			t.Logf("ran in the caller %d, deferred %d, blocked %d, queued %d", ranHere, deferred, blocked, len(recorded)-ranHere-deferred)
			require.Positive(t, ranHere)
			require.Positive(t, deferred)
			require.Positive(t, blocked)
			all, _, err := c.List(ctx, tasking.ListFilter{Limit: 10000})
			require.NoError(t, err)
			require.Len(t, all, len(recorded), "only what Run and Dispatch returned was recorded")
			mu.Lock()
			defer mu.Unlock()
			require.False(t, overlap, "conflicting tasks ran at the same time")
			for _, id := range recorded {
				require.Equal(t, 1, runs[id], "task %d", id)
			}
			// Exclusive tasks start after everything before them, shared ones
			// after every exclusive one before them: with one resource, the
			// starts are in id order except among shared runs.
			byID := map[int64]bool{}
			for _, task := range all {
				byID[task.ID] = len(task.Exclusive) > 0
			}
			for i, id := range starts {
				for _, later := range starts[i+1:] {
					if later < id {
						require.False(t, byID[id] || byID[later],
							"task %d started before task %d, and one of them is exclusive", id, later)
					}
				}
			}
		})
	}
}

// TestImmediateCallerLost: an immediate task whose caller died (running, no
// worker, lease run out) is failed by the fleet's cleanup, and the tasks
// behind it run.
func TestImmediateCallerLost(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)
	orphan, err := e.c.Dispatch(ctx, "job", nil, tasking.Exclusive("r"))
	require.NoError(t, err)
	// What dispatch_immediate leaves for a caller that then crashed.
	_, err = e.pool.Exec(ctx, `UPDATE `+pgx.Identifier{e.schema}.Sanitize()+`.tasks
		SET state = 'running', worker_id = NULL, epoch = epoch + 1, started_at = now(),
		    lease_until = now() + interval '200 ms' WHERE id = $1`, orphan.ID)
	require.NoError(t, err)
	next, err := e.c.Dispatch(ctx, "job", nil, tasking.Exclusive("r"))
	require.NoError(t, err)
	w := tasking.NewWorker(e.c, tasking.WithHeartbeatTTL(300*time.Millisecond))
	w.Handle("job", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)
	done, err := e.c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State)
	lost, err := e.c.Get(ctx, orphan.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateFailed, lost.State)
	require.ErrorIs(t, lost.Err(), tasking.ErrWorkerLost)
	require.True(t, lost.FinishedAt.Before(done.StartedAt) || lost.FinishedAt.Equal(done.StartedAt))
}

func TestImmediateInvalid(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	im := tasking.NewImmediate(c)
	_, err := im.Run(ctx, "x", nil, nil)
	require.ErrorIs(t, err, tasking.ErrInvalidInput)
	_, err = im.Run(ctx, "", nil, func(context.Context, *tasking.Task) error { return nil })
	require.ErrorIs(t, err, tasking.ErrInvalidInput)
	_, err = tasking.NewImmediate(c, tasking.WithImmediateTTL(0)).Run(ctx, "x", nil, func(context.Context, *tasking.Task) error { return nil })
	require.ErrorIs(t, err, tasking.ErrInvalidInput)
	require.NoError(t, im.Close(ctx))
	_, err = im.Run(ctx, "x", nil, func(context.Context, *tasking.Task) error { return nil })
	require.ErrorIs(t, err, tasking.ErrImmediateClosed)
}

// TestImmediateCanceled: a Cancel of a running immediate task, from
// anywhere, reaches its handler in the caller, and the task ends canceled.
func TestImmediateCanceled(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	im := newImmediate(t, c)
	ids := make(chan int64, 1)
	canceled := make(chan error, 1)
	go func() {
		id := recv(t, ids, 10*time.Second)
		canceled <- c.Cancel(ctx, id)
	}()
	task, err := im.Run(ctx, "long", nil, func(ctx context.Context, task *tasking.Task) error {
		ids <- task.ID
		<-ctx.Done()
		if !errors.Is(context.Cause(ctx), tasking.ErrCanceled) {
			return fmt.Errorf("cause %v", context.Cause(ctx))
		}
		return nil
	}, tasking.Exclusive("r"))
	require.NoError(t, err)
	require.NoError(t, recv(t, canceled, time.Second))
	require.Equal(t, tasking.StateCanceled, task.State, task.Error)
	require.ErrorIs(t, task.Err(), tasking.ErrCanceled)
	stored, err := c.Get(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, stored.State)
}
