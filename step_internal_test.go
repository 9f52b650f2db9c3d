package tasking

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking/internal/testdb"
)

// TestPausedClaimNotStarted: a worker paused between a step's claim and the
// start of its tasks for longer than a third of the TTL (the margin the
// claim's heartbeat check leaves) may have been declared lost meanwhile, so
// it must not start those tasks; they go back to waiting and run later.
func TestPausedClaimNotStarted(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 4)
	var logs syncBuffer
	c, err := New(pool, WithSchema(testdb.Schema(t, pool)), WithLocker(NewPostgresLocker()),
		WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Migrate(ctx))

	const ttl = 900 * time.Millisecond
	w := NewWorker(c, WithHeartbeatTTL(ttl), WithSlots(1))
	var pauses atomic.Int32
	w.cfg.afterClaim = func() {
		if pauses.Add(1) == 1 {
			time.Sleep(ttl/3 + 100*time.Millisecond) // the first claim only
		}
	}
	var runs atomic.Int32
	w.Handle("t", func(context.Context, *Task) error { runs.Add(1); return nil })
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(rctx) }()
	defer func() { stop(); require.NoError(t, <-done) }()

	task, err := c.Dispatch(ctx, "t", nil, Exclusive("r"))
	require.NoError(t, err)
	got, err := c.Wait(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, StateCompleted, got.State)
	require.Equal(t, int32(1), runs.Load(), "the handler runs once, after the second claim")
	require.GreaterOrEqual(t, pauses.Load(), int32(2), "claimed twice")
	require.Equal(t, 2, got.Epoch, "the first claim was put back")
	require.True(t, strings.Contains(logs.String(), "paused between claim and start"), logs.String())
}

// TestStepsKeepWorkerAlive: a worker whose heartbeats do not get through (a
// loaded machine, its connection busy) but whose steps do is not declared
// lost: steps refresh the heartbeat. Another worker runs the cleanup that
// would declare it lost.
func TestStepsKeepWorkerAlive(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 6)
	c, err := New(pool, WithSchema(testdb.Schema(t, pool)), WithLocker(NewPostgresLocker()),
		WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Migrate(ctx))

	// Steps refresh the heartbeat between a third and two thirds of the TTL
	// old; a loaded machine (the suite under -race) can stall a step for a
	// few hundred milliseconds, which a shorter TTL did not survive.
	const ttl = 1200 * time.Millisecond
	run := func(w *Worker) {
		rctx, stop := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- w.Run(rctx) }()
		t.Cleanup(func() { stop(); <-done })
	}
	mute := NewWorker(c, WithHeartbeatTTL(ttl), WithSlots(2), WithWorkerName("mute"))
	mute.cfg.skipBeat = func() bool { return true } // only the first beat, at start
	mute.Handle("t", func(context.Context, *Task) error { time.Sleep(10 * time.Millisecond); return nil })
	run(mute)
	cleaner := NewWorker(c, WithHeartbeatTTL(ttl), WithSlots(1), WithWorkerName("cleaner"))
	cleaner.Handle("other", func(context.Context, *Task) error { return nil })
	run(cleaner)

	// Tasks for 4 TTLs, one after the other: the mute worker steps all along.
	deadline := time.Now().Add(4 * ttl)
	n := 0
	for time.Now().Before(deadline) {
		task, err := c.Dispatch(ctx, "t", nil, Exclusive("r"))
		require.NoError(t, err)
		wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
		got, err := c.Wait(wctx, task.ID)
		wcancel()
		require.NoError(t, err, "task %d not final: its worker was declared lost?", task.ID)
		require.Equal(t, StateCompleted, got.State, "task %d: %s", task.ID, got.Error)
		n++
	}
	var alive bool
	require.NoError(t, pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+pgIdent(c.Schema())+`.workers WHERE name = 'mute')`).Scan(&alive))
	require.True(t, alive, "the stepping worker was declared lost (after %d tasks)", n)
}

// TestSiblingsFinishTogether: the handlers one step started return at
// different moments (0 to 3 ms apart here); the step that writes their
// outcomes waits for the others (up to the sibling wait, lengthened for the
// test), so one step writes all four instead of a step each.
func TestSiblingsFinishTogether(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 4)
	c, err := New(pool, WithSchema(testdb.Schema(t, pool)), WithLocker(NewMemoryLocker()),
		WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Migrate(ctx))

	w := NewWorker(c, WithSlots(4))
	w.cfg.siblingWait = 2 * time.Second
	var mu sync.Mutex
	var steps []int
	w.cfg.onStep = func(n int) { mu.Lock(); steps = append(steps, n); mu.Unlock() }
	w.Handle("t", func(_ context.Context, task *Task) error {
		var d time.Duration
		require.NoError(t, json.Unmarshal(task.Args, &d))
		time.Sleep(d)
		return nil
	})
	// Stored before the worker starts, so its first step claims all four.
	var specs []TaskSpec
	for i := range 4 {
		specs = append(specs, Spec("t", time.Duration(i)*time.Millisecond))
	}
	tasks, err := c.DispatchMany(ctx, specs...)
	require.NoError(t, err)
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(rctx) }()
	defer func() { stop(); require.NoError(t, <-done) }()
	for _, task := range tasks {
		waitState(t, ctx, c, task.ID, StateCompleted)
	}
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []int{4}, steps, "outcomes written per step")
}

func TestRetryConflict(t *testing.T) {
	ctx := context.Background()
	calls := 0
	err := retryConflict(ctx, func() error {
		calls++
		if calls < 3 {
			return &pgconn.PgError{Code: "40P01"}
		}
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, 3, calls, "a deadlock is run again")

	calls = 0
	other := &pgconn.PgError{Code: "23505"}
	require.ErrorIs(t, retryConflict(ctx, func() error { calls++; return other }), other)
	require.Equal(t, 1, calls, "other errors are not")

	calls = 0
	err = retryConflict(ctx, func() error { calls++; return &pgconn.PgError{Code: "40001"} })
	require.Error(t, err)
	require.Equal(t, 6, calls, "it gives up after five more tries")
}
