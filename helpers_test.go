package tasking_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// pgxpool's background health check ends shortly after Close.
		goleak.IgnoreTopFunction("github.com/jackc/pgx/v5/pgxpool.(*Pool).backgroundHealthCheck"),
	)
}

// quietLogger drops logs unless TASKING_TEST_LOG is set.
func quietLogger() *slog.Logger {
	if os.Getenv("TASKING_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// logOnFailure returns a logger that keeps the client's and workers' log
// (debug and up) and prints it if the test fails: for tests whose rare
// failures need the worker's view to explain (TASKING_TEST_LOG prints
// every test's log as it happens instead).
func logOnFailure(t testing.TB) *slog.Logger {
	if os.Getenv("TASKING_TEST_LOG") != "" {
		return quietLogger()
	}
	buf := &tasking.SyncBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log of the client and its workers:\n%s", buf.String())
		}
	})
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// newClient returns a migrated client in a fresh schema.
func newClient(t testing.TB, opts ...tasking.Option) *tasking.Client {
	t.Helper()
	pool := testdb.Pool(t, 20)
	schema := testdb.Schema(t, pool)
	opts = append([]tasking.Option{tasking.WithSchema(schema), tasking.WithLogger(quietLogger())}, opts...)
	c, err := tasking.New(pool, opts...)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Migrate(ctx))
	return c
}

// runWorker runs w until the test ends and checks Run's result.
func runWorker(t testing.TB, w *tasking.Worker) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("worker Run: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Errorf("worker did not stop")
		}
	})
}

// recv returns the next value from ch, or fails the test when none arrives
// within d: a lost signal then fails the test instead of hanging CI until
// go test's global timeout.
func recv[T any](t testing.TB, ch <-chan T, d time.Duration) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("nothing received on the channel within %v", d)
		var zero T
		return zero
	}
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }

// ghostWorker adds the row a crashed worker leaves behind: it stopped
// heartbeating an hour ago.
func ghostWorker(t testing.TB, pool *pgxpool.Pool, schema, locker string) int64 {
	t.Helper()
	var id int64
	require.NoError(t, pool.QueryRow(context.Background(), `INSERT INTO `+pgx.Identifier{schema}.Sanitize()+
		`.workers (name, host, pid, locker, heartbeat_at)
		VALUES ('ghost', 'elsewhere', 1, $1, now() - interval '1 hour') RETURNING id`, locker).Scan(&id))
	return id
}

// ownTask puts a task in state, owned by worker, as that worker's claim
// (and a cancel) would have left it.
func ownTask(t testing.TB, pool *pgxpool.Pool, schema string, worker, task int64, state tasking.State) {
	t.Helper()
	_, err := pool.Exec(context.Background(), `UPDATE `+pgx.Identifier{schema}.Sanitize()+
		`.tasks SET state = $1, worker_id = $2, epoch = 1 WHERE id = $3`, string(state), worker, task)
	require.NoError(t, err)
}

// fatalRecorder is a testing.TB whose Fatalf records the failure and ends
// the goroutine, as the real one does.
type fatalRecorder struct {
	testing.TB
	failed bool
}

func (r *fatalRecorder) Helper() {}
func (r *fatalRecorder) Fatalf(string, ...any) {
	r.failed = true
	runtime.Goexit()
}

// TestRecv: recv hands over a value that arrives, and fails, rather than
// blocks, when none does.
func TestRecv(t *testing.T) {
	t.Parallel()
	ch := make(chan int, 1)
	ch <- 7
	require.Equal(t, 7, recv(t, ch, time.Second))

	r := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		recv(r, make(chan int), 10*time.Millisecond)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("recv blocked past its timeout")
	}
	require.True(t, r.failed, "recv returned without failing the test")
}
