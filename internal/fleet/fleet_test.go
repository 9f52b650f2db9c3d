package fleet_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking/internal/fleet"
	"github.com/tasking-go/tasking/internal/migrate"
	"github.com/tasking-go/tasking/internal/testdb"
)

// TestCleanupOncePerPeriod: every worker asks for a cleanup on each of its
// heartbeats, but the fleet cleans up once per period. A fleet of 80 that
// cleaned up on every worker's heartbeat ran 8 cleanups a second, each
// reading every running task.
func TestCleanupOncePerPeriod(t *testing.T) {
	t.Parallel()
	ctx, pool, schema := setup(t, 4, 30*time.Second)
	// Four workers' stores (one each, as in four processes), asking every
	// 10 ms for a second and a half.
	const every = 300 * time.Millisecond
	var won atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for range 4 {
		s := fleet.New(pool, schema, 1, 2)
		wg.Go(func() {
			for time.Since(start) < 1500*time.Millisecond {
				r, err := s.Cleanup(ctx, every)
				if !assert.NoError(t, err) {
					return
				}
				if r.Won {
					won.Add(1)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	// At least twice (the period passes during the run), at most once per
	// period (a slow machine only makes it fewer).
	require.GreaterOrEqual(t, won.Load(), int64(2), "cleanup stopped after its first run")
	require.LessOrEqual(t, won.Load(), int64(elapsed/every)+1, "cleaned up more than once per period")
}

// TestConcurrentRegistrations: of workers that register under one name at
// once from different live processes, exactly one gets it, and of workers
// with different lockers, only those of one kind; the others are refused.
// Each registration's check must see the ones committed before it took the
// registry lock. (Without the lock, this fails within two rounds.)
func TestConcurrentRegistrations(t *testing.T) {
	t.Parallel()
	ctx, pool, schema := setup(t, 8, 60*time.Second)
	q := pgx.Identifier{schema}.Sanitize()
	host, _ := os.Hostname()
	pids := []int{1, os.Getpid(), os.Getppid()} // alive, so none is taken for a crashed instance
	for round := range 20 {
		var ok atomic.Int64
		var wg sync.WaitGroup
		for i := range 6 {
			s := fleet.New(pool, schema, 11, 12)
			w := fleet.Worker{Name: fmt.Sprintf("w%d", round), Host: host, PID: pids[i%len(pids)],
				Locker: []string{"pg", "redis"}[i/3], Handles: []string{"t"}, Slots: 1}
			if i%3 > 0 && i/3 == 0 {
				w.Name = fmt.Sprintf("w%d-%d", round, i) // names of their own, same locker as some others
			}
			wg.Go(func() {
				_, taken, err := s.Register(ctx, w, time.Minute)
				switch {
				case err == nil:
					assert.Empty(t, taken)
					ok.Add(1)
				case errors.Is(err, fleet.ErrNameInUse), errors.Is(err, fleet.ErrKindMismatch):
				default:
					assert.NoError(t, err)
				}
			})
		}
		wg.Wait()
		var kinds, live, dup int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(DISTINCT locker), count(*), count(*) - count(DISTINCT name)
			FROM `+q+`.workers`).Scan(&kinds, &live, &dup))
		require.Equal(t, 1, kinds, "round %d: live workers with two lockers", round)
		require.Zero(t, dup, "round %d: two live workers with one name", round)
		require.Equal(t, int64(live), ok.Load())
		require.Positive(t, live)
		_, err := pool.Exec(ctx, `DELETE FROM `+q+`.workers`)
		require.NoError(t, err)
	}
}

// setup returns a pool of conns connections and a migrated schema of its
// own, with a context that ends after timeout.
func setup(t *testing.T, conns int32, timeout time.Duration) (context.Context, *pgxpool.Pool, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	pool := testdb.Pool(t, conns)
	schema := testdb.Schema(t, pool)
	_, _, err := migrate.Migrate(ctx, pool, schema)
	require.NoError(t, err)
	return ctx, pool, schema
}
