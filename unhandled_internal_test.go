package tasking

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking/internal/testdb"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestWarnUnhandledName: a task whose name no live worker handles (a typo
// in a dispatch) blocks its resource; the fleet says so, once per period,
// naming it.
func TestWarnUnhandledName(t *testing.T) {
	old := unhandledAfter
	unhandledAfter = 0
	t.Cleanup(func() { unhandledAfter = old })

	pool := testdb.Pool(t, 4)
	var logs syncBuffer
	c, err := New(pool, WithSchema(testdb.Schema(t, pool)), WithLocker(NewMemoryLocker()),
		WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Migrate(ctx))
	_, err = c.Dispatch(ctx, "snyc", nil, Exclusive("repo:a")) // meant "sync"
	require.NoError(t, err)

	w := NewWorker(c, WithHeartbeatTTL(300*time.Millisecond))
	w.Handle("sync", func(context.Context, *Task) error { return nil })
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(rctx) }()
	defer func() { stop(); <-done }()

	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "name=snyc") },
		10*time.Second, 20*time.Millisecond, "no warning about the unhandled name")
	time.Sleep(500 * time.Millisecond) // several more cleanups
	require.Equal(t, 1, strings.Count(logs.String(), "name=snyc"), "reported once per period:\n%s", logs.String())
	require.NotContains(t, logs.String(), "name=sync ")
}
