package tasking_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// finishTasks dispatches n tasks named name and waits until they are final.
func finishTasks(t testing.TB, c *tasking.Client, name string, n int) []int64 {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	specs := make([]tasking.TaskSpec, n)
	for i := range specs {
		specs[i] = tasking.Spec(name, i, tasking.Exclusive("r"))
	}
	ts, err := c.DispatchMany(ctx, specs...)
	require.NoError(t, err)
	ids := make([]int64, n)
	for i, tk := range ts {
		_, err := c.Wait(ctx, tk.ID)
		require.NoError(t, err)
		ids[i] = tk.ID
	}
	return ids
}

func countTasks(t testing.TB, c *tasking.Client, f tasking.ListFilter) int {
	t.Helper()
	f.Limit = 10000
	ts, _, err := c.List(context.Background(), f)
	require.NoError(t, err)
	return len(ts)
}

// TestPurge deletes final tasks by state and age, in batches, and never a
// task that is not final.
func TestPurge(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 60*time.Second)
	w := tasking.NewWorker(c)
	w.Handle("ok", func(context.Context, *tasking.Task) error { return nil })
	w.Handle("bad", func(context.Context, *tasking.Task) error { return errors.New("no") })
	runWorker(t, w)

	finishTasks(t, c, "ok", 25)
	finishTasks(t, c, "bad", 4)
	cut := time.Now()
	waiting, err := c.Dispatch(ctx, "nobody-handles-this", nil, tasking.Exclusive("q"))
	require.NoError(t, err)
	canceled, err := c.Dispatch(ctx, "nobody-handles-this", nil, tasking.Exclusive("q"))
	require.NoError(t, err)
	require.NoError(t, c.Cancel(ctx, canceled.ID)) // after cut
	late := finishTasks(t, c, "ok", 2)             // after cut

	n, err := c.Purge(ctx, tasking.PurgeFilter{Before: cut.Add(-time.Hour)})
	require.NoError(t, err)
	require.Zero(t, n, "nothing is that old")

	n, err = c.Purge(ctx, tasking.PurgeFilter{Before: cut, States: []tasking.State{tasking.StateCompleted}, BatchSize: 3})
	require.NoError(t, err)
	require.EqualValues(t, 25, n)
	require.Zero(t, countTasks(t, c, tasking.ListFilter{Name: "ok", State: tasking.StateCompleted})-len(late))
	require.Equal(t, 4, countTasks(t, c, tasking.ListFilter{State: tasking.StateFailed}))

	// Everything final up to now: the failed ones, the canceled one, the
	// late ones; the waiting task stays.
	n, err = c.Purge(ctx, tasking.PurgeFilter{Before: time.Now().Add(time.Second)})
	require.NoError(t, err)
	require.EqualValues(t, 4+1+len(late), n)
	got, err := c.Get(ctx, waiting.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateWaiting, got.State)
	_, err = c.Get(ctx, canceled.ID)
	require.ErrorIs(t, err, tasking.ErrNotFound)
	require.Equal(t, 1, countTasks(t, c, tasking.ListFilter{}))

	for _, f := range []tasking.PurgeFilter{
		{},
		{Before: cut, States: []tasking.State{tasking.StateWaiting}},
		{Before: cut, BatchSize: -1},
		{Before: cut, BatchSize: 10001},
	} {
		_, err := c.Purge(ctx, f)
		require.ErrorIs(t, err, tasking.ErrInvalidInput, "%+v", f)
	}
	done, cancel := context.WithCancel(ctx)
	cancel()
	_, err = c.Purge(done, tasking.PurgeFilter{Before: cut})
	require.ErrorIs(t, err, context.Canceled)
}

// TestRetentionOncePerPeriod: several workers with retention on purge once
// per period between them, per state, and again once the period is over.
func TestRetentionOncePerPeriod(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 60*time.Second)
	pool := testdb.Pool(t, 2)
	q := pgx.Identifier{c.Schema()}.Sanitize()
	noop := func(context.Context, *tasking.Task) error { return nil }
	plain := tasking.NewWorker(c)
	plain.Handle("ok", noop)
	plain.Handle("bad", func(context.Context, *tasking.Task) error { return errors.New("no") })
	runWorker(t, plain)
	finishTasks(t, c, "ok", 10)
	failed := finishTasks(t, c, "bad", 3)

	rt := tasking.Retention{Completed: time.Millisecond, Every: time.Hour} // failed tasks are kept
	const ttl = 600 * time.Millisecond
	for range 3 {
		w := tasking.NewWorker(c, tasking.WithRetention(rt), tasking.WithHeartbeatTTL(ttl))
		w.Handle("other", noop)
		runWorker(t, w)
	}
	require.Eventually(t, func() bool {
		return countTasks(t, c, tasking.ListFilter{State: tasking.StateCompleted}) == 0
	}, 20*time.Second, 10*time.Millisecond, "the completed tasks are purged")
	require.Equal(t, len(failed), countTasks(t, c, tasking.ListFilter{State: tasking.StateFailed}))
	var last time.Time
	require.NoError(t, pool.QueryRow(ctx, `SELECT last_run FROM `+q+`.maintenance WHERE job = 'retention'`).Scan(&last))

	// Within the period nothing more is purged, however many cleanups run
	// (one every TTL/3).
	finishTasks(t, c, "ok", 5)
	time.Sleep(3 * ttl) // waiting for something that must not happen
	require.Equal(t, 5, countTasks(t, c, tasking.ListFilter{State: tasking.StateCompleted}))
	var again time.Time
	require.NoError(t, pool.QueryRow(ctx, `SELECT last_run FROM `+q+`.maintenance WHERE job = 'retention'`).Scan(&again))
	require.True(t, last.Equal(again), "the period was claimed again within the hour")

	// The period is over: the next cleanup purges.
	_, err := pool.Exec(ctx, `UPDATE `+q+`.maintenance SET last_run = last_run - interval '2 hours'`)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		return countTasks(t, c, tasking.ListFilter{State: tasking.StateCompleted}) == 0
	}, 20*time.Second, 10*time.Millisecond)
	require.Equal(t, len(failed), countTasks(t, c, tasking.ListFilter{State: tasking.StateFailed}))
}

func TestRetentionBadInput(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	w := tasking.NewWorker(c, tasking.WithRetention(tasking.Retention{Failed: -time.Second}))
	w.Handle("x", func(context.Context, *tasking.Task) error { return nil })
	require.ErrorIs(t, w.Run(ctxT(t, 10*time.Second)), tasking.ErrInvalidInput)
}
