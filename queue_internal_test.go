package tasking

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking/internal/admit"
	"github.com/tasking-go/tasking/internal/testdb"
)

// TestWindowSkipsExactlyRedundant: the deeper scan's server-side filter
// leaves out exactly the tasks admit.Taken.Redundant would.
func TestWindowSkipsExactlyRedundant(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 4)
	c, err := New(pool, WithSchema(testdb.Schema(t, pool)))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, c.Migrate(ctx))

	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 1))
	name := func() string { return fmt.Sprintf("n %d", rng.IntN(6)) } // a space on purpose
	var specs []TaskSpec
	for i := 0; i < 400; i++ {
		var opts []DispatchOption
		for j := 0; j < rng.IntN(3); j++ {
			opts = append(opts, Exclusive(name()))
		}
		for j := 0; j < 1+rng.IntN(3); j++ {
			opts = append(opts, Shared(name()))
		}
		specs = append(specs, Spec("t", nil, opts...))
	}
	_, err = c.DispatchMany(ctx, specs...)
	require.NoError(t, err)

	all, err := c.readWindow(ctx, 0, 10000, admit.NewTaken(), nil)
	require.NoError(t, err)
	require.Len(t, all, len(specs))
	for iter := 0; iter < 30; iter++ {
		taken := admit.NewTaken()
		for j := 0; j < rng.IntN(4); j++ {
			taken.Add([]string{name()}, []string{name()})
		}
		got, err := c.readWindow(ctx, 0, 10000, taken, nil)
		require.NoError(t, err)
		var want []int64
		for _, e := range all {
			if !taken.Redundant(e) {
				want = append(want, e.ID)
			}
		}
		var gotIDs []int64
		for _, e := range got {
			gotIDs = append(gotIDs, e.ID)
		}
		require.True(t, slices.Equal(want, gotIDs), "seed %d iter %d: server kept %d tasks, Redundant keeps %d", seed, iter, len(gotIDs), len(want))
	}
}
