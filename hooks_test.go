package tasking_test

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
)

// TestMiddleware: middleware runs around every handler in the order given,
// sees the task, can change the outcome, and can recover a panic.
func TestMiddleware(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	var mu sync.Mutex
	var trail []string
	note := func(s string) { mu.Lock(); trail = append(trail, s); mu.Unlock() }
	named := func(tag string) tasking.Middleware {
		return func(next tasking.HandlerFunc) tasking.HandlerFunc {
			return func(ctx context.Context, task *tasking.Task) error {
				note(tag + ">" + task.Name)
				err := next(ctx, task)
				note("<" + tag)
				return err
			}
		}
	}
	forgive := func(next tasking.HandlerFunc) tasking.HandlerFunc {
		return func(ctx context.Context, task *tasking.Task) (err error) {
			if task.Name != "forgiven" {
				return next(ctx, task)
			}
			defer func() {
				if v := recover(); v != nil {
					err = nil // this host's panic policy: forgive it
				}
			}()
			return next(ctx, task)
		}
	}
	w := tasking.NewWorker(c, tasking.WithSlots(1),
		tasking.WithMiddleware(named("a"), nil), tasking.WithMiddleware(named("b"), forgive))
	w.Handle("job", func(ctx context.Context, task *tasking.Task) error {
		assert.Same(t, task, tasking.TaskFromContext(ctx), "middleware passes the task on")
		note("run")
		return nil
	})
	w.Handle("forgiven", func(context.Context, *tasking.Task) error { panic("ignored") })
	w.Handle("panics", func(context.Context, *tasking.Task) error { panic("boom") })
	runWorker(t, w)

	run := func(name string) *tasking.Task {
		task, err := c.Dispatch(ctx, name, nil)
		require.NoError(t, err)
		done, err := c.Wait(ctx, task.ID)
		require.NoError(t, err)
		return done
	}
	require.Equal(t, tasking.StateCompleted, run("job").State)
	mu.Lock()
	require.Equal(t, []string{"a>job", "b>job", "run", "<b", "<a"}, trail)
	mu.Unlock()

	require.Equal(t, tasking.StateCompleted, run("forgiven").State, "a middleware's recover decides")
	panicked := run("panics")
	require.Equal(t, tasking.StateFailed, panicked.State, "an unrecovered panic still fails the task")
	require.ErrorIs(t, panicked.Err(), tasking.ErrPanic)
	require.Contains(t, panicked.Error, "panic: boom")
}

// TestErrorHandler: the error handler hears of every failure, with the
// task and the error, before the final state is written; not of
// completions or cancels.
func TestErrorHandler(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	type call struct {
		task *tasking.Task
		err  error
	}
	calls := make(chan call, 16)
	errDisk := errors.New("disk on fire")
	started := make(chan int64, 1)
	w := tasking.NewWorker(c, tasking.WithSlots(2),
		tasking.WithErrorHandler(func(ctx context.Context, task *tasking.Task, err error) {
			assert.NoError(t, ctx.Err(), "the error handler's context is not canceled")
			assert.Same(t, task, tasking.TaskFromContext(ctx))
			// The final state is not written yet.
			if got, err := c.Get(ctx, task.ID); assert.NoError(t, err) {
				assert.False(t, got.State.Final(), "called before the final state is written")
			}
			calls <- call{task, err}
		}))
	w.Handle("ok", func(context.Context, *tasking.Task) error { return nil })
	w.Handle("fail", func(context.Context, *tasking.Task) error { return errDisk })
	w.Handle("panic", func(context.Context, *tasking.Task) error { panic(errDisk) })
	w.Handle("goexit", func(context.Context, *tasking.Task) error { runtime.Goexit(); return nil })
	w.Handle("slow", func(ctx context.Context, task *tasking.Task) error {
		started <- task.ID
		<-ctx.Done()
		return context.Cause(ctx)
	})
	runWorker(t, w)

	run := func(name string, opts ...tasking.DispatchOption) *tasking.Task {
		task, err := c.Dispatch(ctx, name, nil, opts...)
		require.NoError(t, err)
		done, err := c.Wait(ctx, task.ID)
		require.NoError(t, err)
		return done
	}
	expect := func(id int64) call {
		got := recv(t, calls, 10*time.Second)
		require.Equal(t, id, got.task.ID)
		return got
	}

	require.Equal(t, tasking.StateCompleted, run("ok").State)

	failed := run("fail")
	require.ErrorIs(t, expect(failed.ID).err, errDisk, "the handler's own error, not its text")

	panicked := run("panic")
	got := expect(panicked.ID)
	var pe *tasking.PanicError
	require.ErrorAs(t, got.err, &pe)
	require.Equal(t, errDisk, pe.Value)
	require.ErrorIs(t, got.err, tasking.ErrPanic)
	require.ErrorIs(t, got.err, errDisk, "a panic with an error unwraps to it")
	require.Contains(t, string(pe.Stack), "hooks_test.go")
	require.Equal(t, pe.Error(), panicked.Error, "the stored reason is the panic error's text")

	goexit := run("goexit")
	require.Contains(t, expect(goexit.ID).err.Error(), "runtime.Goexit")

	timedOut := run("slow", tasking.Timeout(50*time.Millisecond))
	recv(t, started, time.Second)
	require.ErrorIs(t, expect(timedOut.ID).err, tasking.ErrTimeout)

	// A canceled task is not a failure.
	task, err := c.Dispatch(ctx, "slow", nil)
	require.NoError(t, err)
	require.Equal(t, task.ID, recv(t, started, 10*time.Second))
	require.NoError(t, c.Cancel(ctx, task.ID))
	canceled, err := c.Wait(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, canceled.State)
	// One more failure: had the cancel or the completion been reported, it
	// would arrive first.
	again := run("fail")
	require.Equal(t, again.ID, expect(again.ID).task.ID)
	require.Empty(t, calls)
}

// TestErrorHandlerShutdown: tasks cut off by shutdown reach the error
// handler too: one whose handler returned the cause (ErrShutdown), and one
// whose handler ignored it and was abandoned (ErrHandlersAbandoned).
func TestErrorHandlerShutdown(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	got := make(chan error, 4)
	started := make(chan struct{}, 2)
	stubborn := make(chan struct{})
	w := tasking.NewWorker(c, tasking.WithSlots(2), tasking.WithErrorHandler(func(_ context.Context, task *tasking.Task, err error) {
		got <- err
	}))
	w.Handle("obedient", func(ctx context.Context, task *tasking.Task) error {
		started <- struct{}{}
		<-ctx.Done()
		return context.Cause(ctx)
	})
	w.Handle("stubborn", func(ctx context.Context, task *tasking.Task) error {
		started <- struct{}{}
		<-stubborn // ignores its context
		return nil
	})
	ran := make(chan error, 1)
	go func() { ran <- w.Run(context.Background()) }()
	for _, name := range []string{"obedient", "stubborn"} {
		_, err := c.Dispatch(ctx, name, nil)
		require.NoError(t, err)
	}
	recv(t, started, 10*time.Second)
	recv(t, started, 10*time.Second)

	stopCtx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	err := w.Stop(stopCtx)
	require.ErrorIs(t, err, tasking.ErrHandlersAbandoned)
	require.ErrorIs(t, recv(t, ran, 10*time.Second), tasking.ErrHandlersAbandoned)
	close(stubborn) // let the abandoned goroutine end before goleak looks

	var errs []error
	errs = append(errs, recv(t, got, time.Second), recv(t, got, time.Second))
	var shutdown, abandoned int
	for _, e := range errs {
		switch {
		case errors.Is(e, tasking.ErrHandlersAbandoned):
			abandoned++
		case errors.Is(e, tasking.ErrShutdown):
			shutdown++
		}
	}
	require.Equal(t, 1, shutdown, "%v", errs)
	require.Equal(t, 1, abandoned, "%v", errs)
}
