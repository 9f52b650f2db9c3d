package tasking_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// holdWorker runs a worker with one slot whose "hold" handler runs until
// release is closed (or its context ends); started receives the ids it
// starts.
func holdWorker(t *testing.T, c *tasking.Client) (started chan int64, release chan struct{}) {
	t.Helper()
	started, release = make(chan int64, 16), make(chan struct{})
	w := tasking.NewWorker(c, tasking.WithSlots(1))
	w.Handle("hold", func(ctx context.Context, task *tasking.Task) error {
		started <- task.ID
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	})
	runWorker(t, w)
	return started, release
}

func blockerIDs(bs []tasking.Blocker) []int64 {
	var ids []int64
	for _, b := range bs {
		ids = append(ids, b.ID)
	}
	return ids
}

// TestWhyWaiting: resource by resource, the earlier conflicting tasks a
// waiting task waits for, running holders and waiting tasks ahead, with
// shared tasks ahead of a shared one not counted; ready and unhandled
// tasks say so.
func TestWhyWaiting(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	started, release := holdWorker(t, c)
	t.Cleanup(func() { close(release) })

	dispatch := func(name string, opts ...tasking.DispatchOption) int64 {
		task, err := c.Dispatch(ctx, name, nil, opts...)
		require.NoError(t, err)
		return task.ID
	}
	t1 := dispatch("hold", tasking.Exclusive("r1"))
	require.Equal(t, t1, recv(t, started, 10*time.Second))
	t2 := dispatch("nobody", tasking.Shared("r2"))                        // ready, but no worker handles it
	t3 := dispatch("hold", tasking.Shared("r1"))                          // behind t1
	t4 := dispatch("hold", tasking.Exclusive("r1", "r2"))                 // behind t1, t3 on r1 and t2 on r2
	t5 := dispatch("hold", tasking.Shared("r1", "r3"))                    // behind t1 and t4 (t3 shares r1 with it)
	t6 := dispatch("hold", tasking.Exclusive("r4"), tasking.Shared("r2")) // free on r4; on r2 behind t4 only

	rep, err := c.WhyWaiting(ctx, t5)
	require.NoError(t, err)
	require.Equal(t, tasking.StateWaiting, rep.Task.State)
	require.False(t, rep.Ready)
	require.False(t, rep.Unhandled)
	require.Equal(t, 1, rep.LiveWorkers)
	require.Len(t, rep.Resources, 2)
	r1 := rep.Resources[0]
	require.Equal(t, "r1", r1.Resource)
	require.False(t, r1.Exclusive)
	require.True(t, r1.Blocked)
	require.Equal(t, []int64{t1, t4}, blockerIDs(r1.Ahead), "a shared task waits for the exclusive ones ahead, not for t3")
	require.Equal(t, 2, r1.Total)
	require.Equal(t, tasking.StateRunning, r1.Ahead[0].State)
	require.NotZero(t, r1.Ahead[0].WorkerID)
	require.False(t, r1.Ahead[0].StartedAt.IsZero())
	require.True(t, r1.Ahead[0].Exclusive)
	require.Equal(t, tasking.StateWaiting, r1.Ahead[1].State)
	require.Zero(t, r1.Ahead[1].WorkerID)
	r3 := rep.Resources[1]
	require.Equal(t, "r3", r3.Resource)
	require.False(t, r3.Blocked)
	require.Empty(t, r3.Ahead)
	require.False(t, r3.HandoffPending())

	rep, err = c.WhyWaiting(ctx, t4)
	require.NoError(t, err)
	require.Len(t, rep.Resources, 2)
	require.Equal(t, "r1", rep.Resources[0].Resource)
	require.True(t, rep.Resources[0].Exclusive)
	require.Equal(t, []int64{t1, t3}, blockerIDs(rep.Resources[0].Ahead), "an exclusive task waits for everything ahead")
	require.Equal(t, "r2", rep.Resources[1].Resource)
	require.Equal(t, []int64{t2}, blockerIDs(rep.Resources[1].Ahead))
	require.Equal(t, "nobody", rep.Resources[1].Ahead[0].Name)

	rep, err = c.WhyWaiting(ctx, t6)
	require.NoError(t, err)
	require.Equal(t, "r4", rep.Resources[0].Resource)
	require.False(t, rep.Resources[0].Blocked)
	require.Equal(t, "r2", rep.Resources[1].Resource)
	require.Equal(t, []int64{t4}, blockerIDs(rep.Resources[1].Ahead), "t2 is shared, like t6 on r2")

	rep, err = c.WhyWaiting(ctx, t2)
	require.NoError(t, err)
	require.True(t, rep.Ready, "nothing ahead of it")
	require.True(t, rep.Unhandled, "no live worker handles its name")

	rep, err = c.WhyWaiting(ctx, t1)
	require.NoError(t, err)
	require.Equal(t, tasking.StateRunning, rep.Task.State)
	require.Empty(t, rep.Resources)
	require.False(t, rep.Unhandled)

	_, err = c.WhyWaiting(ctx, t6+1000)
	require.ErrorIs(t, err, tasking.ErrNotFound)
}

// TestWhyWaitingHandoffPending: a task whose blockers finished while an
// open DispatchTx held their line shows a blocked entry with nothing ahead:
// the hand-off is pending, and happens once the transaction ends.
func TestWhyWaitingHandoffPending(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 10)
	c, err := tasking.New(pool, tasking.WithSchema(testdb.Schema(t, pool)), tasking.WithLogger(quietLogger()))
	require.NoError(t, err)
	ctx := ctxT(t, 30*time.Second)
	require.NoError(t, c.Migrate(ctx))
	started, release := holdWorker(t, c)

	first, err := c.Dispatch(ctx, "hold", nil, tasking.Exclusive("r"))
	require.NoError(t, err)
	require.Equal(t, first.ID, recv(t, started, 10*time.Second))
	next, err := c.Dispatch(ctx, "hold", nil, tasking.Shared("r"))
	require.NoError(t, err)

	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	_, err = c.DispatchTx(ctx, tx, "hold", nil, tasking.Shared("r"))
	require.NoError(t, err)

	close(release) // first finishes while the transaction holds r's line
	done, err := c.Wait(ctx, first.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State)

	rep, err := c.WhyWaiting(ctx, next.ID)
	require.NoError(t, err)
	require.Len(t, rep.Resources, 1)
	require.True(t, rep.Resources[0].Blocked)
	require.Empty(t, rep.Resources[0].Ahead)
	require.True(t, rep.Resources[0].HandoffPending())
	require.False(t, rep.Ready)

	require.NoError(t, tx.Commit(ctx))
	done, err = c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State)
}
