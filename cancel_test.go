package tasking_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

func TestCancel(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c)
	started := make(chan struct{})
	causes := make(chan error, 1)
	w.Handle("block", func(ctx context.Context, _ *tasking.Task) error {
		close(started)
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return nil // a canceling task ends canceled whatever the handler returns
	})
	w.Handle("never", func(context.Context, *tasking.Task) error {
		t.Error("a canceled waiting task ran")
		return nil
	})
	w.Handle("quick", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)

	running, err := c.Dispatch(ctx, "block", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	recv(t, started, 30*time.Second)
	waiting, err := c.Dispatch(ctx, "never", nil, tasking.Exclusive("x"))
	require.NoError(t, err)

	require.NoError(t, c.Cancel(ctx, waiting.ID))
	got, err := c.Get(ctx, waiting.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, got.State, "a waiting task is canceled at once")
	require.False(t, got.FinishedAt.IsZero())

	require.NoError(t, c.Cancel(ctx, running.ID))
	require.ErrorIs(t, recv(t, causes, 30*time.Second), tasking.ErrCanceled)
	got, err = c.Wait(ctx, running.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, got.State)
	require.Equal(t, "canceled", got.Error)

	// Twice does nothing; a completed task and an unknown id are errors.
	require.NoError(t, c.Cancel(ctx, running.ID))
	require.NoError(t, c.Cancel(ctx, waiting.ID))
	quick, err := c.Dispatch(ctx, "quick", nil)
	require.NoError(t, err)
	_, err = c.Wait(ctx, quick.ID)
	require.NoError(t, err)
	require.ErrorIs(t, c.Cancel(ctx, quick.ID), tasking.ErrTaskFinal)
	require.ErrorIs(t, c.Cancel(ctx, 1<<40), tasking.ErrNotFound)

	// The lock of the canceled task was released: x is usable again.
	next, err := c.Dispatch(ctx, "quick", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	got, err = c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
}

// TestCancelRacesClaim cancels tasks at random moments around their claim:
// every task ends either completed (the handler finished first) or
// canceled, never both, never twice.
func TestCancelRacesClaim(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 60*time.Second)
	runs := make(map[int64]int)
	var mu = make(chan struct{}, 1)
	w := tasking.NewWorker(c, tasking.WithSlots(8))
	w.Handle("t", func(ctx context.Context, task *tasking.Task) error {
		mu <- struct{}{}
		runs[task.ID]++
		<-mu
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(task.ID%3) * time.Millisecond):
		}
		return nil
	})
	runWorker(t, w)
	var ids []int64
	for i := 0; i < 200; i++ {
		task, err := c.Dispatch(ctx, "t", nil, tasking.Exclusive(fmt.Sprintf("r%d", i%5)))
		require.NoError(t, err)
		ids = append(ids, task.ID)
		if i%2 == 0 {
			require.NoError(t, ignoreFinal(c.Cancel(ctx, ids[len(ids)/2])))
		}
	}
	for _, id := range ids {
		got, err := c.Wait(ctx, id)
		require.NoError(t, err)
		require.Contains(t, []tasking.State{tasking.StateCompleted, tasking.StateCanceled}, got.State, "task %d: %s", id, got.Error)
	}
	mu <- struct{}{}
	defer func() { <-mu }()
	for id, n := range runs {
		require.Equal(t, 1, n, "task %d ran %d times", id, n)
	}
}

func ignoreFinal(err error) error {
	if err != nil && !errorsIs(err, tasking.ErrTaskFinal) {
		return err
	}
	return nil
}

func TestTimeouts(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c)
	causes := make(chan error, 2)
	slow := func(ctx context.Context, _ *tasking.Task) error {
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return ctx.Err()
	}
	w.Handle("slow", slow, tasking.HandlerTimeout(50*time.Millisecond))
	w.Handle("slow-no-default", slow)
	runWorker(t, w)

	byHandler, err := c.Dispatch(ctx, "slow", nil)
	require.NoError(t, err)
	byTask, err := c.Dispatch(ctx, "slow-no-default", nil, tasking.Timeout(30*time.Millisecond))
	require.NoError(t, err)
	require.Equal(t, 30*time.Millisecond, byTask.Timeout)
	for _, id := range []int64{byHandler.ID, byTask.ID} {
		got, err := c.Wait(ctx, id)
		require.NoError(t, err)
		require.Equal(t, tasking.StateFailed, got.State)
		require.Equal(t, "timeout", got.Error)
		require.ErrorIs(t, recv(t, causes, 30*time.Second), tasking.ErrTimeout)
	}

	for _, d := range []time.Duration{-time.Second, time.Microsecond} {
		_, err := c.Dispatch(ctx, "slow", nil, tasking.Timeout(d))
		require.ErrorIs(t, err, tasking.ErrInvalidInput, "timeout %v", d)
	}
	require.Panics(t, func() { w.Handle("neg", slow, tasking.HandlerTimeout(-time.Second)) })
}

// TestCleanupOfDeadWorker: a worker that stopped heartbeating (here a row
// aged by hand, owning a running and a canceling task) is removed within a
// TTL plus a heartbeat by a live worker; its running task fails "worker
// lost" and its canceling task ends canceled.
func TestCleanupOfDeadWorker(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	pool := testdb.Pool(t, 2)
	ctx := ctxT(t, 30*time.Second)
	q := pgx.Identifier{c.Schema()}.Sanitize()
	dead := ghostWorker(t, pool, c.Schema(), "postgres")
	a, err := c.Dispatch(ctx, "t", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	b, err := c.Dispatch(ctx, "t", nil)
	require.NoError(t, err)
	ownTask(t, pool, c.Schema(), dead, a.ID, tasking.StateRunning)
	ownTask(t, pool, c.Schema(), dead, b.ID, tasking.StateCanceling)
	next, err := c.Dispatch(ctx, "t", nil, tasking.Exclusive("x"))
	require.NoError(t, err)

	w := tasking.NewWorker(c, tasking.WithHeartbeatTTL(300*time.Millisecond))
	w.Handle("t", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)

	got, err := c.Wait(ctx, a.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateFailed, got.State)
	require.Equal(t, "worker lost", got.Error)
	got, err = c.Wait(ctx, b.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, got.State)
	got, err = c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State, "the task behind the dead one runs")
	var rows int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM `+q+`.workers WHERE id = $1`, dead).Scan(&rows))
	require.Zero(t, rows)
}

func TestWorkerNameInUse(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	noop := func(context.Context, *tasking.Task) error { return nil }

	w1 := tasking.NewWorker(c, tasking.WithWorkerName("same"))
	w1.Handle("t", noop)
	runWorker(t, w1)
	require.Eventually(t, func() bool { return w1.ID() != 0 }, 10*time.Second, 5*time.Millisecond)

	// Another live process elsewhere has the name: refused.
	pool := testdb.Pool(t, 2)
	q := pgx.Identifier{c.Schema()}.Sanitize()
	_, err := pool.Exec(ctx, `INSERT INTO `+q+`.workers (name, host, pid, locker) VALUES ('other', 'far-away', 1, 'postgres')`)
	require.NoError(t, err)
	w2 := tasking.NewWorker(c, tasking.WithWorkerName("other"))
	w2.Handle("t", noop)
	require.ErrorIs(t, w2.Run(ctx), tasking.ErrWorkerNameInUse)

	// A crashed instance of this very process (same host, same pid, as
	// after a container restart) is taken over, and its running task fails.
	var crashed int64
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO `+q+`.workers (name, host, pid, locker)
		SELECT 'again', host, pid, locker FROM `+q+`.workers WHERE id = $1 RETURNING id`, w1.ID()).Scan(&crashed))
	orphan, err := c.Dispatch(ctx, "t", nil)
	require.NoError(t, err)
	ownTask(t, pool, c.Schema(), crashed, orphan.ID, tasking.StateRunning)
	w3 := tasking.NewWorker(c, tasking.WithWorkerName("again"))
	w3.Handle("t", noop)
	runWorker(t, w3)
	got, err := c.Wait(ctx, orphan.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateFailed, got.State)
	require.Equal(t, "worker lost", got.Error)
}

// TestStopHard: Stop with a done context cancels running handlers at once;
// their tasks fail with the shutdown reason and Run returns.
func TestStopHard(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c, tasking.WithShutdownGrace(time.Hour))
	started := make(chan struct{})
	w.Handle("block", func(ctx context.Context, _ *tasking.Task) error {
		close(started)
		<-ctx.Done()
		return context.Cause(ctx)
	})
	done := make(chan error, 1)
	go func() { done <- w.Run(context.Background()) }()
	task, err := c.Dispatch(ctx, "block", nil)
	require.NoError(t, err)
	recv(t, started, 30*time.Second)
	hard, cancel := context.WithCancel(ctx)
	cancel()
	require.NoError(t, w.Stop(hard))
	require.NoError(t, recv(t, done, 30*time.Second))
	got, err := c.Get(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateFailed, got.State)
	// The handler returned context.Cause(ctx): the reason says so once.
	require.Equal(t, tasking.ErrShutdown.Error(), got.Error)
	require.ErrorIs(t, got.Err(), tasking.ErrShutdown)
	require.NoError(t, w.Stop(ctx), "stopping a stopped worker does nothing")
}

// TestCancelLockOrder: a cancel takes a waiting task's line entries before
// its row, the order in which a worker's step hands a line on (it unblocks
// the entry, then updates the task). Here a transaction plays the step: it
// locks the entry, the cancel queues behind it, and the transaction then
// updates the task's row. In the other order the two would deadlock (this
// session's deadlock_timeout is 10 ms so that PostgreSQL reports it here
// rather than abort the cancel).
func TestCancelLockOrder(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	pool := testdb.Pool(t, 2)
	q := pgx.Identifier{c.Schema()}.Sanitize()
	_, err := c.Dispatch(ctx, "a", nil, tasking.Exclusive("r"))
	require.NoError(t, err)
	b, err := c.Dispatch(ctx, "b", nil, tasking.Exclusive("r"))
	require.NoError(t, err)

	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctx) }()
	_, err = tx.Exec(ctx, "SET LOCAL deadlock_timeout = '10ms'")
	require.NoError(t, err)
	tag, err := tx.Exec(ctx, "UPDATE "+q+".lines SET blocked = false WHERE resource = 'r' AND task = $1", b.ID)
	require.NoError(t, err)
	require.EqualValues(t, 1, tag.RowsAffected())

	canceled := make(chan error, 1)
	go func() { canceled <- c.Cancel(ctx, b.ID) }()
	// Wait until the cancel waits for a lock held by the transaction.
	require.Eventually(t, func() bool {
		var n int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
			WHERE NOT l.granted AND a.query LIKE '%cancel(%' AND a.datname = current_database()`).Scan(&n)
		return err == nil && n > 0
	}, 10*time.Second, 5*time.Millisecond)
	_, err = tx.Exec(ctx, "UPDATE "+q+".tasks SET blockers = blockers WHERE id = $1", b.ID)
	require.NoError(t, err, "the step's order met the cancel's and deadlocked")
	require.NoError(t, tx.Rollback(ctx))

	require.NoError(t, recv(t, canceled, 10*time.Second))
	got, err := c.Get(ctx, b.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, got.State)
}

// TestCancelBehindRunningHead: canceling a waiting task in the middle of a
// line must not free the task behind it while the head still runs. A
// hand-off after a task that ran scans its lines from that task's id on
// (schema version 8); a canceled waiting task gives no such bound, since
// live entries may be ahead of it.
func TestCancelBehindRunningHead(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c)
	started := make(chan struct{})
	finish := make(chan struct{})
	var headDone atomic.Bool
	w.Handle("head", func(context.Context, *tasking.Task) error {
		close(started)
		<-finish
		headDone.Store(true)
		return nil
	})
	w.Handle("never", func(context.Context, *tasking.Task) error {
		t.Error("a canceled waiting task ran")
		return nil
	})
	w.Handle("next", func(context.Context, *tasking.Task) error {
		if !headDone.Load() {
			t.Error("the task behind a canceled one ran while the head of the line still ran")
		}
		return nil
	})
	runWorker(t, w)

	head, err := c.Dispatch(ctx, "head", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	recv(t, started, 30*time.Second)
	middle, err := c.Dispatch(ctx, "never", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	next, err := c.Dispatch(ctx, "next", nil, tasking.Shared("x"))
	require.NoError(t, err)
	require.NoError(t, c.Cancel(ctx, middle.ID))
	// The locker would refuse a wrongly freed task (the head holds x), so
	// look at its entry on the line itself: it must still be blocked.
	why, err := c.WhyWaiting(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateWaiting, why.Task.State)
	require.False(t, why.Ready, "the task behind a canceled one is ready while the head of the line runs")
	require.Len(t, why.Resources, 1)
	require.True(t, why.Resources[0].Blocked)
	require.Equal(t, head.ID, why.Resources[0].Ahead[0].ID)

	close(finish)
	got, err := c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
	got, err = c.Get(ctx, head.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State)
}
