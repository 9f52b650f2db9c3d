package tasking_test

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

func TestHandlerOutcomes(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c, tasking.WithSlots(2))
	w.Handle("ok", func(ctx context.Context, task *tasking.Task) error {
		return task.SetResult(map[string]any{"fence": task.Fence > 0, "self": tasking.TaskFromContext(ctx) == task})
	})
	w.Handle("fail", func(context.Context, *tasking.Task) error { return errors.New("disk on fire") })
	w.Handle("panic", func(context.Context, *tasking.Task) error { panic("boom") })
	w.Handle("goexit", func(context.Context, *tasking.Task) error { runtime.Goexit(); return nil })
	w.Handle("badresult", func(_ context.Context, task *tasking.Task) error {
		return task.SetResult("a\u0000b") // jsonb cannot hold it: the handler's error, not a wedged finish
	})
	w.Handle("badargs", func(context.Context, *tasking.Task) error { return nil })
	type args struct{ N int }
	tasking.HandleFunc(w, "typed", func(ctx context.Context, a args) error {
		if a.N != 7 {
			return errors.New("wrong args")
		}
		return nil
	})
	runWorker(t, w)

	wait := func(name string, args any, opts ...tasking.DispatchOption) *tasking.Task {
		task, err := c.Dispatch(ctx, name, args, opts...)
		require.NoError(t, err)
		done, err := c.Wait(ctx, task.ID)
		require.NoError(t, err)
		return done
	}
	ok := wait("ok", nil, tasking.Exclusive("r"))
	require.Equal(t, tasking.StateCompleted, ok.State)
	require.JSONEq(t, `{"fence": true, "self": true}`, string(ok.Result))

	failed := wait("fail", nil)
	require.Equal(t, tasking.StateFailed, failed.State)
	require.Equal(t, "disk on fire", failed.Error)
	require.Error(t, failed.Err())
	for _, reason := range []error{tasking.ErrTimeout, tasking.ErrCanceled, tasking.ErrShutdown, tasking.ErrPanic, tasking.ErrLockLost} {
		require.NotErrorIs(t, failed.Err(), reason, "a handler's own error is none of the library's reasons")
	}

	panicked := wait("panic", nil)
	require.Equal(t, tasking.StateFailed, panicked.State)
	require.Contains(t, panicked.Error, "panic: boom")
	require.Contains(t, panicked.Error, "worker_test.go", "the stack is stored")
	require.ErrorIs(t, panicked.Err(), tasking.ErrPanic)

	// runtime.Goexit (t.FailNow in a helper) fails the task and frees its
	// resource: the next task on it runs.
	goexit := wait("goexit", nil, tasking.Exclusive("g"))
	require.Equal(t, tasking.StateFailed, goexit.State)
	require.Contains(t, goexit.Error, "runtime.Goexit")
	require.Equal(t, tasking.StateCompleted, wait("ok", nil, tasking.Exclusive("g")).State)

	typed := wait("typed", map[string]int{"N": 7})
	require.Equal(t, tasking.StateCompleted, typed.State, typed.Error)
	typedBad := wait("typed", []int{1})
	require.Equal(t, tasking.StateFailed, typedBad.State)
	require.Contains(t, typedBad.Error, "decode args")

	// The worker survived all of that.
	require.Equal(t, tasking.StateCompleted, wait("ok", nil).State)
	require.NoError(t, wait("ok", nil).Err(), "a completed task has no error")

	bad := wait("badresult", nil)
	require.Equal(t, tasking.StateFailed, bad.State)
	require.Contains(t, bad.Error, "invalid result")
	require.ErrorIs(t, bad.SetResult(1), tasking.ErrNotRunning, "a task read back is no live handle")
	require.Equal(t, tasking.StateCompleted, wait("ok", nil).State)
}

// TestShutdownGrace: a handler that outlives the grace is canceled with
// ErrShutdown and its task ends failed with a reason saying so; one that
// finishes within the grace completes.
func TestShutdownGrace(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c, tasking.WithSlots(2), tasking.WithShutdownGrace(200*time.Millisecond))
	started := make(chan struct{}, 2)
	causes := make(chan error, 1)
	w.Handle("stubborn", func(ctx context.Context, _ *tasking.Task) error {
		started <- struct{}{}
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return ctx.Err()
	})
	w.Handle("polite", func(ctx context.Context, _ *tasking.Task) error {
		started <- struct{}{}
		time.Sleep(50 * time.Millisecond)
		return nil
	})
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx) }()

	stubborn, err := c.Dispatch(ctx, "stubborn", nil, tasking.Exclusive("a"))
	require.NoError(t, err)
	polite, err := c.Dispatch(ctx, "polite", nil, tasking.Exclusive("b"))
	require.NoError(t, err)
	recv(t, started, 30*time.Second)
	recv(t, started, 30*time.Second)
	stop()
	require.NoError(t, recv(t, done, 30*time.Second))
	require.ErrorIs(t, recv(t, causes, 30*time.Second), tasking.ErrShutdown)

	got, err := c.Get(ctx, stubborn.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateFailed, got.State)
	require.Contains(t, got.Error, tasking.ErrShutdown.Error())
	require.ErrorIs(t, got.Err(), tasking.ErrShutdown)
	got, err = c.Get(ctx, polite.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)

	// Its locks were released: another worker runs a task on "a".
	w2 := tasking.NewWorker(c)
	w2.Handle("stubborn", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w2)
	next, err := c.Dispatch(ctx, "stubborn", nil, tasking.Exclusive("a"))
	require.NoError(t, err)
	got, err = c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
}

// TestPostgresLockLost: when the worker's lock connection dies, the server
// drops its advisory locks; the handlers holding them are canceled with
// ErrLockLost and their tasks fail with "lock lost".
func TestPostgresLockLost(t *testing.T) {
	t.Parallel()
	c := newClient(t, tasking.WithLocker(tasking.NewPostgresLocker(tasking.WithPostgresLockCheckInterval(20*time.Millisecond))))
	ctx := ctxT(t, 30*time.Second)
	pool := testdb.Pool(t, 2)
	w := tasking.NewWorker(c)
	started := make(chan struct{})
	causes := make(chan error, 1)
	w.Handle("hold", func(ctx context.Context, _ *tasking.Task) error {
		close(started)
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return nil // even a nil return cannot complete a task whose locks are gone
	})
	w.Handle("next", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)
	task, err := c.Dispatch(ctx, "hold", nil, tasking.Exclusive("lost-"+testdb.Name("r")))
	require.NoError(t, err)
	recv(t, started, 30*time.Second)

	// Kill the worker's lock connection, which holds the task's lock.
	var killed bool
	// Worker ids repeat across schemas (parallel tests): match the whole
	// name, which carries the schema too.
	err = pool.QueryRow(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE application_name = $1`, tasking.WorkerAppName(c.Schema(), w.ID())).Scan(&killed)
	require.NoError(t, err)
	require.True(t, killed)

	require.ErrorIs(t, recv(t, causes, 30*time.Second), tasking.ErrLockLost)
	got, err := c.Wait(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateFailed, got.State)
	require.Contains(t, got.Error, "lock lost")

	// The worker reconnects and goes on.
	next, err := c.Dispatch(ctx, "next", nil, tasking.Exclusive("other"))
	require.NoError(t, err)
	got, err = c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
}

// TestLockerMismatch: a worker refuses to start while live workers of the
// same schema use another kind of locker, and starts once they are gone.
func TestLockerMismatch(t *testing.T) {
	t.Parallel()
	pg := newClient(t)
	mem, err := tasking.New(testdb.Pool(t, 4), tasking.WithSchema(pg.Schema()), tasking.WithLogger(quietLogger()),
		tasking.WithLocker(tasking.NewMemoryLocker()))
	require.NoError(t, err)
	ctx := ctxT(t, 30*time.Second)
	noop := func(context.Context, *tasking.Task) error { return nil }

	w1 := tasking.NewWorker(pg)
	w1.Handle("t", noop)
	done := make(chan error, 1)
	runCtx, stop := context.WithCancel(ctx)
	go func() { done <- w1.Run(runCtx) }()
	require.Eventually(t, func() bool { return w1.ID() != 0 }, 10*time.Second, 5*time.Millisecond)

	w2 := tasking.NewWorker(mem)
	w2.Handle("t", noop)
	err = w2.Run(ctx)
	require.ErrorIs(t, err, tasking.ErrLockerMismatch)
	require.Contains(t, err.Error(), `"postgres"`)

	stop()
	require.NoError(t, recv(t, done, 30*time.Second))
	runWorker(t, w2) // the postgres worker retired: the memory one may start
	task, err := mem.Dispatch(ctx, "t", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	got, err := mem.Wait(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
}

// TestStopAbandons: Stop returns by its deadline even when a handler ignores
// its canceled context; the error names the abandoned task, whose stored
// reason says it was abandoned at shutdown, and its resource is free for
// the next worker at once. A Stop without a deadline applies the
// configured shutdown grace.
func TestStopAbandons(t *testing.T) {
	t.Parallel()
	// Once in about five full runs "no deadline" took 3 s instead of
	// 750 ms; the log says what the worker did meanwhile.
	c := newClient(t, tasking.WithLogger(logOnFailure(t)))
	ctx := ctxT(t, 30*time.Second)
	release := make(chan struct{})
	defer close(release)
	for _, tc := range []struct {
		name  string
		grace time.Duration
		stop  func() (context.Context, context.CancelFunc)
		bound time.Duration
	}{
		{"deadline", time.Hour, func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(ctx, 500*time.Millisecond)
		}, 500 * time.Millisecond},
		{"no deadline", 500 * time.Millisecond, func() (context.Context, context.CancelFunc) {
			return context.Background(), func() {}
		}, 500 * time.Millisecond},
	} {
		w := tasking.NewWorker(c, tasking.WithShutdownGrace(tc.grace))
		started := make(chan struct{}, 1)
		w.Handle("stubborn", func(context.Context, *tasking.Task) error {
			started <- struct{}{}
			<-release // ignores its context
			return nil
		})
		done := make(chan error, 1)
		go func() { done <- w.Run(context.Background()) }()
		task, err := c.Dispatch(ctx, "stubborn", nil, tasking.Exclusive("x"))
		require.NoError(t, err)
		recv(t, started, 30*time.Second)

		stopCtx, cancel := tc.stop()
		t0 := time.Now()
		err = w.Stop(stopCtx)
		took := time.Since(t0)
		cancel()
		require.ErrorIs(t, err, tasking.ErrHandlersAbandoned, tc.name)
		require.Contains(t, err.Error(), fmt.Sprint(task.ID), tc.name)
		require.Less(t, took, tc.bound+250*time.Millisecond, "%s: Stop overran its deadline", tc.name)
		require.ErrorIs(t, recv(t, done, 5*time.Second), tasking.ErrHandlersAbandoned)

		got, err := c.Get(ctx, task.ID)
		require.NoError(t, err)
		require.Equal(t, tasking.StateFailed, got.State, tc.name)
		require.Contains(t, got.Error, "abandoned at shutdown", tc.name)
		require.ErrorIs(t, got.Err(), tasking.ErrShutdown)
		require.ErrorIs(t, got.Err(), tasking.ErrHandlersAbandoned)
	}

	// The resource is free: another worker runs the next task on it.
	w := tasking.NewWorker(c)
	w.Handle("ok", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)
	next, err := c.Dispatch(ctx, "ok", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	got, err := c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
}

// TestCleanupUsesEachWorkersTTL: a worker is declared lost after its own
// TTL, not after the TTL of the worker that happens to run the cleanup. A
// fleet may mix TTLs (a rolling change of the setting, or workers tuned
// differently); a worker with a 300 ms TTL cleaned up one with 30 s whose
// last heartbeat was a second old, and its tasks failed "worker lost".
func TestCleanupUsesEachWorkersTTL(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	pool := testdb.Pool(t, 2)
	q := pgx.Identifier{c.Schema()}.Sanitize()
	id := ghostWorker(t, pool, c.Schema(), "postgres")
	_, err := pool.Exec(ctx, `UPDATE `+q+`.workers SET ttl_ms = 30000, heartbeat_at = now() - interval '2 seconds' WHERE id = $1`, id)
	require.NoError(t, err)

	w := tasking.NewWorker(c, tasking.WithHeartbeatTTL(300*time.Millisecond))
	w.Handle("x", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)
	exists := func() bool {
		var n int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM `+q+`.workers WHERE id = $1`, id).Scan(&n))
		return n == 1
	}
	// Many cleanups of the short-TTL worker (one every 100 ms) pass.
	time.Sleep(1500 * time.Millisecond) // waiting for something that must not happen
	require.True(t, exists(), "a worker within its own TTL was cleaned up")

	// Past its own TTL it goes.
	_, err = pool.Exec(ctx, `UPDATE `+q+`.workers SET heartbeat_at = now() - interval '31 seconds' WHERE id = $1`, id)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return !exists() }, 10*time.Second, 20*time.Millisecond)
}
