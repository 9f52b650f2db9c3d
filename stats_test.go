package tasking_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// TestStats: counts by state and name, the oldest waiting task's age, names
// no live worker handles, and the workers with their busy slots.
func TestStats(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 10)
	schema := testdb.Schema(t, pool)
	c, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()))
	require.NoError(t, err)
	ctx := ctxT(t, 30*time.Second)
	require.NoError(t, c.Migrate(ctx))

	empty, err := c.Stats(ctx)
	require.NoError(t, err)
	require.Empty(t, empty.States)
	require.Empty(t, empty.Names)
	require.Empty(t, empty.Workers)

	// Three "report" tasks that no worker handles, the oldest an hour old.
	var reports []int64
	for range 3 {
		task, err := c.Dispatch(ctx, "report", nil)
		require.NoError(t, err)
		reports = append(reports, task.ID)
	}
	_, err = pool.Exec(ctx, `UPDATE `+pgx.Identifier{schema}.Sanitize()+
		`.tasks SET created_at = now() - interval '1 hour' WHERE id = $1`, reports[0])
	require.NoError(t, err)

	started := make(chan int64, 4)
	release := make(chan struct{})
	w := tasking.NewWorker(c, tasking.WithSlots(3), tasking.WithWorkerName("stats-w"))
	w.Handle("sync", func(ctx context.Context, task *tasking.Task) error {
		started <- task.ID
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	})
	w.Handle("ping", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)
	t.Cleanup(func() { close(release) })

	ping, err := c.Dispatch(ctx, "ping", nil)
	require.NoError(t, err)
	_, err = c.Wait(ctx, ping.ID)
	require.NoError(t, err)
	for range 2 {
		_, err := c.Dispatch(ctx, "sync", nil, tasking.Shared("repo"))
		require.NoError(t, err)
	}
	// The third waits behind the two running shared holders of "repo".
	_, err = c.Dispatch(ctx, "sync", nil, tasking.Exclusive("repo"))
	require.NoError(t, err)
	recv(t, started, 10*time.Second)
	recv(t, started, 10*time.Second)
	ghost := ghostWorker(t, pool, schema, "postgres")

	st, err := c.Stats(ctx)
	require.NoError(t, err)
	require.WithinDuration(t, time.Now(), st.At, time.Minute)
	require.Equal(t, map[tasking.State]int64{
		tasking.StateWaiting: 4, tasking.StateRunning: 2, tasking.StateCompleted: 1,
	}, st.States)

	require.Len(t, st.Names, 3)
	require.Equal(t, "ping", st.Names[0].Name)
	require.Equal(t, map[tasking.State]int64{tasking.StateCompleted: 1}, st.Names[0].States)
	require.Zero(t, st.Names[0].OldestWaiting)

	report := st.Names[1]
	require.Equal(t, "report", report.Name)
	require.Equal(t, map[tasking.State]int64{tasking.StateWaiting: 3}, report.States)
	require.InDelta(t, time.Hour.Seconds(), report.OldestWaiting.Seconds(), 60, "the oldest waiting task's age")
	require.True(t, report.Unhandled, "no live worker handles report")

	syncs := st.Names[2]
	require.Equal(t, map[tasking.State]int64{tasking.StateWaiting: 1, tasking.StateRunning: 2}, syncs.States)
	require.Greater(t, syncs.OldestWaiting, time.Duration(0))
	require.Less(t, syncs.OldestWaiting, time.Minute)
	require.False(t, syncs.Unhandled)

	require.Len(t, st.Workers, 2)
	var live, dead tasking.WorkerInfo
	for _, wi := range st.Workers {
		if wi.ID == ghost {
			dead = wi
		} else {
			live = wi
		}
	}
	host, _ := os.Hostname()
	require.Equal(t, w.ID(), live.ID)
	require.Equal(t, "stats-w", live.Name)
	require.Equal(t, host, live.Host)
	require.Equal(t, os.Getpid(), live.PID)
	require.Equal(t, "postgres", live.Locker)
	require.Equal(t, []string{"ping", "sync"}, live.Handles)
	require.Equal(t, 3, live.Slots)
	require.Equal(t, 2, live.Busy)
	require.Equal(t, 30*time.Second, live.TTL)
	require.True(t, live.Live)
	require.WithinDuration(t, st.At, live.HeartbeatAt, 30*time.Second)

	require.Equal(t, "ghost", dead.Name)
	require.False(t, dead.Live, "an hour without a heartbeat")
	require.Zero(t, dead.Busy)

	ws, err := c.Workers(ctx)
	require.NoError(t, err)
	require.Len(t, ws, 2)
}
