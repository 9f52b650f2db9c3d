package fleet_test

import (
	"context"
	"testing"
	"time"

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
	s := fleet.New(pool, schema, 1, 2)

	const every = 300 * time.Millisecond
	start := time.Now()
	won := 0
	for time.Since(start) < time.Second {
		r, err := s.Cleanup(ctx, every)
		require.NoError(t, err)
		if r.Won {
			won++
		}
		time.Sleep(10 * time.Millisecond)
	}
	elapsed := time.Since(start)
	require.GreaterOrEqual(t, won, 1, "no cleanup ran")
	require.LessOrEqual(t, won, int(elapsed/every)+1, "cleaned up more than once per period")
}
