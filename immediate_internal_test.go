package tasking

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking/internal/testdb"
)

// TestImmediateLocksRefused: an immediate task that is ready but whose
// lock is still held elsewhere (as by a holder that was declared lost) is
// not run: without DeferIfBlocked it ends canceled with the reason and Run
// says so; with it, it goes back to waiting, keeps its place, and a worker
// runs it once the lock is free.
func TestImmediateLocksRefused(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 8)
	c, err := New(pool, WithSchema(testdb.Schema(t, pool)), WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	require.NoError(t, c.Migrate(ctx))
	im := NewImmediate(c)
	defer im.Close(ctx)

	// The PostgreSQL locker's run-time lock on "r", held by another session.
	holder, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer holder.Release()
	_, err = holder.Exec(ctx, "SELECT pg_advisory_lock($1)", runKey(c.schema, "r"))
	require.NoError(t, err)

	ran := false
	fn := func(context.Context, *Task) error { ran = true; return nil }
	_, err = im.Run(ctx, "job", nil, fn, Exclusive("r"))
	require.ErrorIs(t, err, ErrBlocked)
	var be *BlockedError
	require.ErrorAs(t, err, &be)
	require.Contains(t, be.Reason, "locks refused")
	require.Equal(t, []string{"r"}, be.Resources)
	require.False(t, ran)
	all, _, err := c.List(ctx, ListFilter{})
	require.NoError(t, err)
	require.Len(t, all, 1)
	require.Equal(t, StateCanceled, all[0].State, "recorded, and final: it had its place in line")

	deferred, err := im.Run(ctx, "job", nil, fn, Exclusive("r"), DeferIfBlocked())
	require.NoError(t, err)
	require.Equal(t, StateWaiting, deferred.State)
	require.False(t, ran)
	_, err = holder.Exec(ctx, "SELECT pg_advisory_unlock($1)", runKey(c.schema, "r"))
	require.NoError(t, err)
	w := NewWorker(c)
	w.Handle("job", func(context.Context, *Task) error { return nil })
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(wctx) }()
	final, err := c.Wait(ctx, deferred.ID)
	require.NoError(t, err)
	require.Equal(t, StateCompleted, final.State, final.Error)
	require.NotZero(t, final.WorkerID)
	stop()
	require.NoError(t, <-done)
}
