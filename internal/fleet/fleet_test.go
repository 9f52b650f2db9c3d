package fleet_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool := testdb.Pool(t, 4)
	schema := testdb.Schema(t, pool)
	_, _, err := migrate.Migrate(ctx, pool, schema)
	require.NoError(t, err)
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
