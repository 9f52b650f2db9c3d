package tasking

import (
	"context"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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
