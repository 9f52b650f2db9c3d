package tasking_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// TestRetryKeepsPlace: a task waiting for its retry keeps its place in
// line: a later task that conflicts with it starts only after it is final,
// and a task that conflicts with nothing is not held up. Every failed
// attempt is kept on the task. The worker polls once a minute, so the
// retries run because the worker wakes up when they are due.
func TestRetryKeepsPlace(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	var mu sync.Mutex
	runs := map[string]int{}
	attempts := make(chan int, 10)
	gate := make(chan struct{})
	w := tasking.NewWorker(c, tasking.WithPollInterval(time.Minute))
	w.Handle("flaky", func(ctx context.Context, tk *tasking.Task) error {
		attempts <- tk.Attempt
		if tk.Attempt == 2 {
			<-gate // the test looks at the task while it waits for its second retry
		}
		if tk.Attempt < 3 {
			return fmt.Errorf("attempt %d failed", tk.Attempt)
		}
		return nil
	}, tasking.HandlerRetry(tasking.RetryPolicy{Attempts: 3, Backoff: 100 * time.Millisecond}))
	w.Handle("other", func(ctx context.Context, tk *tasking.Task) error {
		mu.Lock()
		runs[string(tk.Args)]++
		mu.Unlock()
		return nil
	})
	runWorker(t, w)

	flaky, err := c.Dispatch(ctx, "flaky", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	behind, err := c.Dispatch(ctx, "other", `"behind"`, tasking.Shared("x"))
	require.NoError(t, err)
	require.Equal(t, 1, recv(t, attempts, 10*time.Second))
	require.Equal(t, 2, recv(t, attempts, 10*time.Second), "the retry runs when due, not at the next poll")

	// Attempt 2 runs; attempt 1 is logged. A task on another resource runs
	// meanwhile; the one behind it waits.
	free, err := c.Dispatch(ctx, "other", `"free"`, tasking.Exclusive("y"))
	require.NoError(t, err)
	got, err := c.Wait(ctx, free.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
	now, err := c.Get(ctx, flaky.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateRunning, now.State)
	require.Equal(t, 2, now.Attempt)
	require.Len(t, now.Attempts, 1)
	require.Equal(t, "attempt 1 failed", now.Attempts[0].Error)
	b, err := c.Get(ctx, behind.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateWaiting, b.State)
	close(gate)

	// Attempt 2 fails: the task waits for its retry, and still blocks.
	require.Equal(t, 3, recv(t, attempts, 10*time.Second))
	done, err := c.Wait(ctx, flaky.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State)
	require.Equal(t, 3, done.Attempt)
	require.Len(t, done.Attempts, 2)
	for i, a := range done.Attempts {
		require.Equal(t, i+1, a.Attempt)
		require.Equal(t, fmt.Sprintf("attempt %d failed", i+1), a.Error)
		require.False(t, a.StartedAt.IsZero())
		require.False(t, a.FinishedAt.Before(a.StartedAt))
	}
	require.True(t, done.Attempts[1].StartedAt.Sub(done.Attempts[0].FinishedAt) >= 80*time.Millisecond,
		"the retry waited for its backoff (100ms ±20%%)")
	b, err = c.Wait(ctx, behind.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, b.State)
	require.False(t, b.StartedAt.Before(done.FinishedAt), "the task behind started after the retried one was final")
}

// TestRetryWaitingShowsState: while it waits for its retry, the task is in
// state retrying, with its retry time, and a later conflicting task waits.
// Cancel ends it at once and hands its resources on.
func TestRetryWaitingShowsStateAndCancels(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c)
	w.Handle("fail", func(context.Context, *tasking.Task) error { return errors.New("boom") })
	w.Handle("ok", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)

	tk, err := c.Dispatch(ctx, "fail", nil, tasking.Exclusive("x"),
		tasking.Retry(tasking.RetryPolicy{Attempts: 5, Backoff: time.Hour}))
	require.NoError(t, err)
	require.Equal(t, 5, tk.Retry.Attempts)
	next, err := c.Dispatch(ctx, "ok", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	var got *tasking.Task
	require.Eventually(t, func() bool {
		got, err = c.Get(ctx, tk.ID)
		return err == nil && got.State == tasking.StateRetrying
	}, 10*time.Second, 5*time.Millisecond)
	require.Equal(t, "boom", got.Error)
	require.Nil(t, got.Err(), "not failed: it runs again")
	require.WithinDuration(t, time.Now().Add(time.Hour), got.RunAt, 15*time.Minute)
	require.Equal(t, 5, got.Retry.Attempts)
	retrying, _, err := c.List(ctx, tasking.ListFilter{State: tasking.StateRetrying})
	require.NoError(t, err)
	require.Len(t, retrying, 1)
	n, err := c.Get(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateWaiting, n.State, "the conflicting task waits behind the retry")

	require.NoError(t, c.Cancel(ctx, tk.ID))
	got, err = c.Get(ctx, tk.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, got.State)
	n, err = c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, n.State)
}

// TestRetryPolicies: attempts run out; NoRetry fails at once; a task's own
// policy overrides its handler's; panics and timeouts are retried,
// interruptions are not.
func TestRetryPolicies(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	fast := tasking.RetryPolicy{Attempts: 3, Backoff: time.Millisecond}
	w := tasking.NewWorker(c)
	w.Handle("fail", func(context.Context, *tasking.Task) error { return errors.New("boom") },
		tasking.HandlerRetry(fast))
	w.Handle("fatal", func(context.Context, *tasking.Task) error {
		return tasking.NoRetry(errors.New("bad args"))
	}, tasking.HandlerRetry(fast))
	w.Handle("panic", func(context.Context, *tasking.Task) error { panic("oops") }, tasking.HandlerRetry(fast))
	w.Handle("slow", func(ctx context.Context, _ *tasking.Task) error {
		<-ctx.Done()
		return context.Cause(ctx)
	}, tasking.HandlerRetry(fast), tasking.HandlerTimeout(20*time.Millisecond))
	w.Handle("plain", func(context.Context, *tasking.Task) error { return errors.New("boom") })
	runWorker(t, w)

	for _, tc := range []struct {
		name     string
		opts     []tasking.DispatchOption
		attempts int
	}{
		{"fail", nil, 3},
		{"fatal", nil, 1},
		{"panic", nil, 3},
		{"slow", nil, 3},
		{"plain", nil, 1},
		{"fail", []tasking.DispatchOption{tasking.Retry(tasking.RetryPolicy{Attempts: 1})}, 1},
		{"plain", []tasking.DispatchOption{tasking.Retry(tasking.RetryPolicy{Attempts: 2, Backoff: time.Millisecond})}, 2},
	} {
		tk, err := c.Dispatch(ctx, tc.name, nil, tc.opts...)
		require.NoError(t, err)
		got, err := c.Wait(ctx, tk.ID)
		require.NoError(t, err)
		require.Equal(t, tasking.StateFailed, got.State, tc.name)
		require.Equal(t, tc.attempts, got.Attempt, tc.name)
		require.Len(t, got.Attempts, tc.attempts, tc.name)
		require.Equal(t, got.Error, got.Attempts[len(got.Attempts)-1].Error)
		if tc.name == "slow" {
			require.ErrorIs(t, got.Err(), tasking.ErrTimeout)
		}
	}

	// Shutdown interrupts a handler: it fails, it is not retried.
	started := make(chan struct{})
	w2 := tasking.NewWorker(c, tasking.WithShutdownGrace(0))
	w2.Handle("block", func(ctx context.Context, _ *tasking.Task) error {
		close(started)
		<-ctx.Done()
		return errors.New("interrupted")
	}, tasking.HandlerRetry(fast))
	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- w2.Run(runCtx) }()
	tk, err := c.Dispatch(ctx, "block", nil)
	require.NoError(t, err)
	recv(t, started, 10*time.Second)
	stop()
	require.NoError(t, recv(t, ran, 10*time.Second))
	got, err := c.Get(ctx, tk.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateFailed, got.State)
	require.ErrorIs(t, got.Err(), tasking.ErrShutdown)
}

func TestRetryBadPolicy(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 10*time.Second)
	for _, p := range []tasking.RetryPolicy{{Attempts: -1}, {Attempts: 2, Backoff: -time.Second}, {Attempts: 2, Backoff: time.Microsecond}} {
		_, err := c.Dispatch(ctx, "x", nil, tasking.Retry(p))
		require.ErrorIs(t, err, tasking.ErrInvalidInput, "%+v", p)
	}
	w := tasking.NewWorker(c)
	require.Panics(t, func() {
		w.Handle("x", func(context.Context, *tasking.Task) error { return nil },
			tasking.HandlerRetry(tasking.RetryPolicy{Attempts: -1}))
	})
}

// TestRetryInterruptedShutdown: with Interrupted, a task whose worker shuts
// down under it goes back to its place in line (a later conflicting task
// still waits behind it) and runs again on the next worker.
func TestRetryInterruptedShutdown(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	policy := tasking.HandlerRetry(tasking.RetryPolicy{Attempts: 1, Interrupted: true})
	started := make(chan struct{})
	w1 := tasking.NewWorker(c, tasking.WithShutdownGrace(0))
	w1.Handle("job", func(ctx context.Context, _ *tasking.Task) error {
		close(started)
		<-ctx.Done()
		return context.Cause(ctx)
	}, policy)
	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- w1.Run(runCtx) }()
	tk, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	behind, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	recv(t, started, 10*time.Second)
	stop()
	require.NoError(t, recv(t, ran, 10*time.Second))
	got, err := c.Get(ctx, tk.ID)
	require.NoError(t, err)
	require.Contains(t, []tasking.State{tasking.StateWaiting, tasking.StateRetrying}, got.State, "not failed: back in line")
	require.Len(t, got.Attempts, 1)
	require.Equal(t, tasking.ErrShutdown.Error(), got.Attempts[0].Error)

	order := make(chan int64, 2)
	w2 := tasking.NewWorker(c)
	w2.Handle("job", func(_ context.Context, t *tasking.Task) error {
		order <- t.ID
		return nil
	}, policy)
	runWorker(t, w2)
	require.Equal(t, tk.ID, recv(t, order, 10*time.Second), "the interrupted task kept its place")
	require.Equal(t, behind.ID, recv(t, order, 10*time.Second))
	got, err = c.Wait(ctx, tk.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
	require.Equal(t, 2, got.Attempt)
}

// TestRetryInterruptedWorkerLost: with Interrupted, the fleet's cleanup puts
// a lost worker's task back in line instead of failing it; without, it
// fails "worker lost".
func TestRetryInterruptedWorkerLost(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	pool := testdb.Pool(t, 2)
	ghost := ghostWorker(t, pool, c.Schema(), "postgres")
	again, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("x"),
		tasking.Retry(tasking.RetryPolicy{Attempts: 1, Interrupted: true}))
	require.NoError(t, err)
	lost, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("y"))
	require.NoError(t, err)
	ownTask(t, pool, c.Schema(), ghost, again.ID, tasking.StateRunning)
	ownTask(t, pool, c.Schema(), ghost, lost.ID, tasking.StateRunning)

	w := tasking.NewWorker(c, tasking.WithHeartbeatTTL(300*time.Millisecond))
	w.Handle("job", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)
	got, err := c.Wait(ctx, again.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
	require.Len(t, got.Attempts, 1)
	require.Equal(t, "worker lost", got.Attempts[0].Error)
	got, err = c.Wait(ctx, lost.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateFailed, got.State)
	require.Equal(t, "worker lost", got.Error)
}
