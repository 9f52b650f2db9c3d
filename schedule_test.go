package tasking_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
)

// TestScheduled: a scheduled task starts at its time, woken without a poll;
// it stands in line at its dispatch position (a later conflicting task
// runs after it), and tasks that conflict with nothing run meanwhile.
func TestScheduled(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c, tasking.WithPollInterval(time.Minute))
	w.Handle("job", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)

	at := time.Now().Add(300 * time.Millisecond)
	later, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("x"), tasking.RunAt(at))
	require.NoError(t, err)
	require.Equal(t, tasking.StateScheduled, later.State)
	behind, err := c.Dispatch(ctx, "job", nil, tasking.Shared("x"))
	require.NoError(t, err)
	free, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("y"))
	require.NoError(t, err)

	f, err := c.Wait(ctx, free.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, f.State)
	got, err := c.Get(ctx, later.ID)
	require.NoError(t, err)
	if time.Now().Before(at.Add(-50 * time.Millisecond)) { // not yet due (allowing for clock skew)
		require.Equal(t, tasking.StateScheduled, got.State)
		b, err := c.Get(ctx, behind.ID)
		require.NoError(t, err)
		require.Equal(t, tasking.StateWaiting, b.State)
	}
	require.WithinDuration(t, at, got.RunAt, time.Millisecond)

	wctx, cancel := context.WithTimeout(ctx, 10*time.Second) // the poll is a minute
	defer cancel()
	done, err := c.Wait(wctx, later.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State)
	require.False(t, done.StartedAt.Before(done.RunAt), "started before its time")
	b, err := c.Wait(wctx, behind.ID)
	require.NoError(t, err)
	require.False(t, b.StartedAt.Before(done.FinishedAt), "the later conflicting task ran after it")
}

// TestScheduledCancelAndPast: canceling a scheduled task ends it at once
// and frees its place; a time in the past is now.
func TestScheduledCancelAndPast(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c)
	w.Handle("job", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)

	week, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("x"), tasking.RunAfter(7*24*time.Hour))
	require.NoError(t, err)
	next, err := c.Dispatch(ctx, "job", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	scheduled, _, err := c.List(ctx, tasking.ListFilter{State: tasking.StateScheduled})
	require.NoError(t, err)
	require.Len(t, scheduled, 1)
	require.NoError(t, c.Cancel(ctx, week.ID))
	got, err := c.Get(ctx, week.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, got.State)
	n, err := c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, n.State)

	past, err := c.Dispatch(ctx, "job", nil, tasking.RunAt(time.Now().Add(-time.Hour)))
	require.NoError(t, err)
	require.Equal(t, tasking.StateWaiting, past.State)
	p, err := c.Wait(ctx, past.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, p.State)
}
