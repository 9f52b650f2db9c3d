package tasking_test

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// statementTracer records every statement a pool sends, batched or not.
type statementTracer struct {
	mu   sync.Mutex
	stmt []string
}

func (s *statementTracer) add(sql string) {
	s.mu.Lock()
	s.stmt = append(s.stmt, sql)
	s.mu.Unlock()
}

func (s *statementTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	s.add(d.SQL)
	return ctx
}

func (s *statementTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (s *statementTracer) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	return ctx
}

func (s *statementTracer) TraceBatchQuery(_ context.Context, _ *pgx.Conn, d pgx.TraceBatchQueryData) {
	s.add(d.SQL)
}

func (s *statementTracer) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

// signalling lists what the worker must not send to PostgreSQL with the
// Redis locker: LISTEN/NOTIFY and session-level advisory locks. The
// transaction-scoped locks inside dispatch and registration are fine.
var signalling = []string{"listen", "notify", "pg_advisory_lock", "pg_try_advisory_lock", "pg_advisory_unlock", "lock_batch"}

// TestRedisLockerSendsNoPostgresSignals runs a batch of tasks with resources
// under each locker and records every statement the worker's and the
// dispatcher's pools send. With the Redis locker none is LISTEN, NOTIFY or a
// session-level advisory lock; the PostgreSQL locker, run the same way,
// shows the tracer would catch them.
func TestRedisLockerSendsNoPostgresSignals(t *testing.T) {
	t.Parallel()
	for _, locker := range []string{"redis", "postgres"} {
		t.Run(locker, func(t *testing.T) {
			t.Parallel()
			const n = 300
			setup := testdb.Pool(t, 4)
			schema := testdb.Schema(t, setup)
			mc, err := tasking.New(setup, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()))
			require.NoError(t, err)
			require.NoError(t, mc.Migrate(ctxT(t, 30*time.Second)))

			tracer := &statementTracer{}
			cfg, err := pgxpool.ParseConfig(testdb.DatabaseURL())
			require.NoError(t, err)
			cfg.ConnConfig.Tracer = tracer
			cfg.MaxConns = 8
			pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
			require.NoError(t, err)
			t.Cleanup(pool.Close)
			l := tasking.NewPostgresLocker()
			if locker == "redis" {
				l = tasking.NewRedisLocker(newRedis(t, testdb.RedisAddr()))
			}
			c, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()), tasking.WithLocker(l))
			require.NoError(t, err)

			ctx := ctxT(t, time.Minute)
			w := tasking.NewWorker(c, tasking.WithSlots(8))
			w.Handle("t", func(context.Context, *tasking.Task) error { return nil })
			wctx, stop := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- w.Run(wctx) }()

			var specs []tasking.TaskSpec
			for i := 0; i < n; i++ {
				specs = append(specs, tasking.Spec("t", nil,
					tasking.Exclusive(fmt.Sprintf("e%d", i%50)), tasking.Shared(fmt.Sprintf("s%d", i%5))))
			}
			var tasks []*tasking.Task
			for i := 0; i < n; i += 10 { // batches of 10, as a service would send them
				ts, err := c.DispatchMany(ctx, specs[i:i+10]...)
				require.NoError(t, err)
				tasks = append(tasks, ts...)
			}
			for _, task := range tasks { // waiting through the untraced client
				got, err := mc.Wait(ctx, task.ID)
				require.NoError(t, err)
				require.Equal(t, tasking.StateCompleted, got.State)
			}
			stop()
			require.NoError(t, recv(t, done, time.Minute))

			tracer.mu.Lock()
			defer tracer.mu.Unlock()
			kinds := make(map[string]int)
			var bad []string
			for _, sql := range tracer.stmt {
				lower := strings.ToLower(sql)
				for _, s := range signalling {
					if strings.Contains(lower, s) {
						bad = append(bad, sql)
						break
					}
				}
				short := strings.Join(strings.Fields(sql), " ")
				kinds[short[:min(60, len(short))]]++
			}
			var lines []string
			for k, v := range kinds {
				lines = append(lines, fmt.Sprintf("%6d  %s", v, k))
			}
			sort.Sort(sort.Reverse(sort.StringSlice(lines)))
			t.Logf("%s locker: %d statements for %d tasks (%.2f per task):\n%s", locker,
				len(tracer.stmt), n, float64(len(tracer.stmt))/n, strings.Join(lines, "\n"))
			if locker == "redis" {
				require.Empty(t, bad, "the Redis locker's worker must not signal through PostgreSQL")
			} else {
				require.NotEmpty(t, bad, "the tracer should see the PostgreSQL locker's LISTEN and locks")
			}
		})
	}
}
