package tasking_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
)

// waitProgress reads the task until check accepts it.
func waitProgress(t *testing.T, c *tasking.Client, id int64, check func(*tasking.Task) bool) *tasking.Task {
	t.Helper()
	ctx := ctxT(t, 20*time.Second)
	for {
		got, err := c.Get(ctx, id)
		require.NoError(t, err)
		if check(got) {
			return got
		}
		select {
		case <-ctx.Done():
			t.Fatalf("task %d: progress never matched; last read %+v", id, got.Progress)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// TestProgressVisibleWhileRunning: reports show through Get and List while
// the handler runs, in the order their names were first used, and the last
// report, made just before the handler returns, is stored with the final
// state.
func TestProgressVisibleWhileRunning(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	release := make(chan struct{})
	var handled *tasking.Task
	w := tasking.NewWorker(c)
	w.Handle("import", func(ctx context.Context, task *tasking.Task) error {
		handled = task
		require.NoError(t, task.ReportProgress(tasking.Progress{Name: "download", Message: "Downloading", Done: 3, Total: 10}))
		require.NoError(t, task.ReportProgress(tasking.Progress{Name: "parse", State: tasking.ProgressWaiting}))
		select {
		case <-release:
		case <-ctx.Done():
			return ctx.Err()
		}
		require.NoError(t, task.ReportProgress(tasking.Progress{Name: "download", Done: 10, Total: 10, State: tasking.ProgressCompleted}))
		// The last report: the flusher has just written, so only the final
		// write can carry it.
		return task.ReportProgress(tasking.Progress{Name: "parse", Done: 7, Total: 7, State: tasking.ProgressCompleted})
	})
	runWorker(t, w)
	task, err := c.Dispatch(ctx, "import", nil, tasking.Exclusive("repo:a"))
	require.NoError(t, err)

	running := waitProgress(t, c, task.ID, func(got *tasking.Task) bool { return len(got.Progress) == 2 })
	require.Equal(t, tasking.StateRunning, running.State)
	require.Equal(t, []tasking.Progress{
		{Name: "download", Message: "Downloading", Done: 3, Total: 10, State: tasking.ProgressRunning},
		{Name: "parse", State: tasking.ProgressWaiting},
	}, running.Progress)
	listed, _, err := c.List(ctx, tasking.ListFilter{State: tasking.StateRunning})
	require.NoError(t, err)
	require.Len(t, listed, 1)
	require.Equal(t, running.Progress, listed[0].Progress)

	close(release)
	done, err := c.Wait(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State, done.Error)
	require.Equal(t, []tasking.Progress{
		{Name: "download", Done: 10, Total: 10, State: tasking.ProgressCompleted},
		{Name: "parse", Done: 7, Total: 7, State: tasking.ProgressCompleted},
	}, done.Progress)

	// After the handler returned, and on a task read from the database,
	// there is nothing to report to.
	require.ErrorIs(t, handled.ReportProgress(tasking.Progress{Name: "late"}), tasking.ErrNotRunning)
	require.ErrorIs(t, done.ReportProgress(tasking.Progress{Name: "x"}), tasking.ErrNotRunning)
	got, err := c.Get(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, done.Progress, got.Progress)
}

// TestProgressCoalesced counts, with a trigger, the writes that change a
// task's progress while its handler reports in a tight loop: at most one per
// 250 ms per task (plus the first and the final one), however many calls,
// and several tasks of one worker share them.
func TestProgressCoalesced(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 60*time.Second)
	s := pgx.Identifier{e.schema}.Sanitize()
	_, err := e.pool.Exec(ctx, `CREATE TABLE `+s+`.progress_writes (task bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
		CREATE FUNCTION `+s+`.count_progress() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN INSERT INTO `+s+`.progress_writes (task) VALUES (NEW.id); RETURN NULL; END $$;
		CREATE TRIGGER count_progress AFTER UPDATE ON `+s+`.tasks FOR EACH ROW
		WHEN (OLD.progress IS DISTINCT FROM NEW.progress) EXECUTE FUNCTION `+s+`.count_progress();`)
	require.NoError(t, err)

	const tasks = 3
	calls := make(chan int, tasks)
	elapsed := make(chan time.Duration, tasks)
	w := tasking.NewWorker(e.c, tasking.WithSlots(tasks))
	w.Handle("loop", func(ctx context.Context, task *tasking.Task) error {
		start := time.Now()
		n := 0
		// A tight loop for a second: tens of thousands of reports.
		for time.Since(start) < time.Second {
			n++
			if err := task.ReportProgress(tasking.Progress{Name: "items", Done: int64(n)}); err != nil {
				return err
			}
		}
		calls <- n
		elapsed <- time.Since(start)
		return task.SetResult(n)
	})
	runWorker(t, w)
	var ids []int64
	for range tasks {
		task, err := e.c.Dispatch(ctx, "loop", nil)
		require.NoError(t, err)
		ids = append(ids, task.ID)
	}
	for _, id := range ids {
		done, err := e.c.Wait(ctx, id)
		require.NoError(t, err)
		require.Equal(t, tasking.StateCompleted, done.State, done.Error)
		require.Len(t, done.Progress, 1)
		require.Equal(t, string(done.Result), fmt.Sprint(done.Progress[0].Done), "the last report is the final one")
	}
	var longest time.Duration
	for range tasks {
		n := recv(t, calls, time.Second)
		require.Greater(t, n, 1000, "a tight loop")
		longest = max(longest, recv(t, elapsed, time.Second))
	}
	// One at once, one per 250 ms after, the final write, and one for a
	// flush that lands between the handler's last clock reading and its
	// return.
	limit := int(longest/(250*time.Millisecond)) + 3
	rows, err := e.pool.Query(ctx, `SELECT task, count(*) FROM `+s+`.progress_writes GROUP BY task ORDER BY task`)
	require.NoError(t, err)
	counts, err := pgx.CollectRows(rows, pgx.RowToStructByPos[struct {
		Task   int64
		Writes int
	}])
	require.NoError(t, err)
	require.Len(t, counts, tasks)
	for _, c := range counts {
		t.Logf("task %d: %d progress writes in %v", c.Task, c.Writes, longest)
		require.LessOrEqual(t, c.Writes, limit, "task %d", c.Task)
		require.GreaterOrEqual(t, c.Writes, 3, "task %d: written while running, not only at the end", c.Task)
	}
}

// TestProgressLostClaimWritesNothing: once the task is no longer this
// worker's claim (another epoch), neither the coalesced writes nor the
// final write touch it.
func TestProgressLostClaimWritesNothing(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)
	stolen := make(chan struct{})
	returned := make(chan struct{})
	w := tasking.NewWorker(e.c)
	w.Handle("job", func(ctx context.Context, task *tasking.Task) error {
		defer close(returned)
		require.NoError(t, task.ReportProgress(tasking.Progress{Name: "p", Done: 1}))
		select {
		case <-stolen:
		case <-ctx.Done():
			return ctx.Err()
		}
		return task.ReportProgress(tasking.Progress{Name: "p", Done: 2})
	})
	runWorker(t, w)
	task, err := e.c.Dispatch(ctx, "job", nil)
	require.NoError(t, err)
	waitProgress(t, e.c, task.ID, func(got *tasking.Task) bool { return len(got.Progress) == 1 })
	// As if the claim had been lost and the task claimed again elsewhere.
	_, err = e.pool.Exec(ctx, `UPDATE `+pgx.Identifier{e.schema}.Sanitize()+`.tasks SET epoch = epoch + 1 WHERE id = $1`, task.ID)
	require.NoError(t, err)
	close(stolen)
	recv(t, returned, 10*time.Second)
	// Stop returns once the worker has tried every final write: the old
	// claim wrote nothing.
	require.NoError(t, w.Stop(ctx))
	got, err := e.c.Get(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateRunning, got.State, "the stale final write was refused")
	require.Equal(t, []tasking.Progress{{Name: "p", Done: 1, State: tasking.ProgressRunning}}, got.Progress)
}

func TestProgressInvalid(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	errs := make(chan []error, 1)
	w := tasking.NewWorker(c)
	w.Handle("bad", func(ctx context.Context, task *tasking.Task) error {
		var got []error
		for _, p := range []tasking.Progress{
			{},
			{Name: "a\x00b"},
			{Name: "a", Done: -1},
			{Name: "a", Total: -1},
			{Name: "a", State: "sleeping"},
			{Name: "a", Message: string([]byte{0xff})},
		} {
			got = append(got, task.ReportProgress(p))
		}
		for i := range tasking.MaxProgressReports {
			if err := task.ReportProgress(tasking.Progress{Name: fmt.Sprint(i)}); err != nil {
				return err
			}
		}
		got = append(got, task.ReportProgress(tasking.Progress{Name: "one too many"}))
		errs <- got
		return nil
	})
	runWorker(t, w)
	task, err := c.Dispatch(ctx, "bad", nil)
	require.NoError(t, err)
	for _, err := range recv(t, errs, 20*time.Second) {
		require.ErrorIs(t, err, tasking.ErrInvalidInput)
	}
	done, err := c.Wait(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State, done.Error)
	require.Len(t, done.Progress, tasking.MaxProgressReports)
}
