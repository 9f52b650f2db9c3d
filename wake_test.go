package tasking_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// TestWakeupsReachHungryWorkers: a step wakes the other workers only while
// one of them said it is hungry. Two workers, one handling "a" and one "b",
// poll once an hour, so a task starts only through a wake-up. A line of
// tasks on one resource alternates the names: every finish makes ready a
// task that only the other worker can take. Before the line, each worker
// fills its slots with a blocker task, so both go from sated to hungry
// while the line is running; later a third worker joins and must learn who
// is hungry (its "q").
func TestWakeupsReachHungryWorkers(t *testing.T) {
	t.Parallel()
	for _, lc := range lockerCases {
		if lc.name == "memory" {
			continue // its wake-ups are the PostgreSQL bus, covered by "postgres"
		}
		t.Run(lc.name, func(t *testing.T) {
			t.Parallel()
			mk := lc.new(t)
			pool := testdb.Pool(t, 10)
			schema := testdb.Schema(t, pool)
			client := func() *tasking.Client {
				c, err := tasking.New(testdb.Pool(t, 6), tasking.WithSchema(schema),
					tasking.WithLogger(quietLogger()), tasking.WithLocker(mk()))
				require.NoError(t, err)
				return c
			}
			disp := client()
			ctx := ctxT(t, 60*time.Second)
			require.NoError(t, disp.Migrate(ctx))

			release := make(chan struct{})
			var blockers []*tasking.Task
			for _, name := range []string{"a", "b"} {
				w := tasking.NewWorker(client(), tasking.WithSlots(2), tasking.WithPollInterval(time.Hour),
					tasking.WithWorkerName("w"+name))
				w.Handle(name, func(context.Context, *tasking.Task) error { return nil })
				w.Handle(name+"-block", func(ctx context.Context, _ *tasking.Task) error {
					select {
					case <-release:
					case <-ctx.Done():
					}
					return nil
				})
				runWorker(t, w)
				// Two blockers fill the worker's slots: it is sated.
				for range 2 {
					b, err := disp.Dispatch(ctx, name+"-block", nil)
					require.NoError(t, err)
					blockers = append(blockers, b)
				}
			}
			waitRunning(t, ctx, disp, blockers)

			// The line: a1, b2, a3, ... on resource "line". Dispatched while
			// both workers are full, so every task but the first becomes
			// ready through a finish in the other worker.
			var line []*tasking.Task
			for i := range 20 {
				name := []string{"a", "b"}[i%2]
				task, err := disp.Dispatch(ctx, name, nil, tasking.Exclusive("line"))
				require.NoError(t, err)
				line = append(line, task)
			}
			close(release) // both go hungry as their blockers finish
			for _, task := range line {
				done, err := disp.Wait(ctx, task.ID)
				require.NoError(t, err, "task %d never started: a wake-up was lost", task.ID)
				require.Equal(t, tasking.StateCompleted, done.State)
			}

			// A worker that joins now learns that the others are hungry.
			w := tasking.NewWorker(client(), tasking.WithSlots(1), tasking.WithPollInterval(time.Hour),
				tasking.WithWorkerName("wc"))
			w.Handle("c", func(context.Context, *tasking.Task) error { return nil })
			runWorker(t, w)
			var tail []*tasking.Task
			for i := range 10 {
				name := []string{"c", "a", "b"}[i%3]
				task, err := disp.Dispatch(ctx, name, nil, tasking.Exclusive("tail"))
				require.NoError(t, err)
				tail = append(tail, task)
			}
			// Well within the TTL after which hungry workers say so again.
			tctx := ctxT(t, 10*time.Second)
			for _, task := range tail {
				done, err := disp.Wait(tctx, task.ID)
				require.NoError(t, err, "task %d (%s) never started: a wake-up was lost", task.ID, task.Name)
				require.Equal(t, tasking.StateCompleted, done.State)
			}
		})
	}
}

// waitRunning waits until every task is running.
func waitRunning(t *testing.T, ctx context.Context, c *tasking.Client, tasks []*tasking.Task) {
	t.Helper()
	for _, task := range tasks {
		for {
			got, err := c.Get(ctx, task.ID)
			require.NoError(t, err)
			if got.State == tasking.StateRunning {
				break
			}
			require.NoError(t, ctx.Err(), fmt.Sprintf("task %d did not start", task.ID))
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestCloseSendsWakeups: an autocommitted dispatch wakes the workers in the
// background after it returns; Close waits for that wake-up, so a program
// may close its pool right after it.
func TestCloseSendsWakeups(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t, 30*time.Second)
	pool := testdb.Pool(t, 4)
	schema := testdb.Schema(t, pool)
	setup, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()))
	require.NoError(t, err)
	require.NoError(t, setup.Migrate(ctx))

	listener, err := pgx.Connect(ctx, testdb.DatabaseURL())
	require.NoError(t, err)
	defer listener.Close(context.Background())
	_, err = listener.Exec(ctx, "LISTEN "+pgx.Identifier{tasking.NotifyChannel(schema)}.Sanitize())
	require.NoError(t, err)

	for round := range 5 {
		own := testdb.Pool(t, 2)
		c, err := tasking.New(own, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()))
		require.NoError(t, err)
		_, err = c.Dispatch(ctx, "x", nil)
		require.NoError(t, err)
		require.NoError(t, c.Close(ctx))
		own.Close() // the wake-up must be out by now
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = listener.WaitForNotification(wctx)
		cancel()
		require.NoError(t, err, "round %d: no wake-up after Close", round)
		// Later dispatches still work, without wake-ups.
		_, err = c.Dispatch(ctx, "x", nil)
		require.Error(t, err, "the pool is closed")
	}
}
