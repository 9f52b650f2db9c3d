package admit

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// TestRedundantKeepsWalk: dropping the entries that are Redundant at the
// point the walk reaches them never changes the candidates, and with them
// gone the taken sets decide every later entry the same way.
func TestRedundantKeepsWalk(t *testing.T) {
	seed := uint64(rand.Int64())
	rng := rand.New(rand.NewPCG(seed, 7))
	name := func() string { return fmt.Sprintf("n%d", rng.IntN(5)) }
	for iter := 0; iter < 3000; iter++ {
		var entries []Entry
		for i := 0; i < 1+rng.IntN(15); i++ {
			e := Entry{ID: int64(i + 1), Name: "t"}
			used := map[string]bool{}
			for j := 0; j < rng.IntN(3); j++ {
				if n := name(); !used[n] {
					used[n] = true
					e.Exclusive = append(e.Exclusive, n)
				}
			}
			for j := 0; j < rng.IntN(3); j++ {
				if n := name(); !used[n] {
					used[n] = true
					e.Shared = append(e.Shared, n)
				}
			}
			entries = append(entries, e)
		}
		seedTaken := func() *Taken {
			tk := NewTaken()
			r := rand.New(rand.NewPCG(seed, uint64(iter)))
			for j := 0; j < r.IntN(3); j++ {
				tk.Add([]string{fmt.Sprintf("n%d", r.IntN(5))}, []string{fmt.Sprintf("n%d", r.IntN(5))})
			}
			return tk
		}
		all := func(string) bool { return true }
		full, _ := Walk(entries, seedTaken(), all, len(entries), nil)

		ids := func(es []Entry) []int64 {
			var out []int64
			for _, e := range es {
				out = append(out, e.ID)
			}
			return out
		}
		// Skip redundant entries judged against the sets as they stand
		// when the walk reaches them, and, as the server does, against the
		// sets as they stood at the start of the page (a subset).
		for _, moving := range []bool{true, false} {
			tk, start := seedTaken(), seedTaken()
			var kept []Entry
			for _, e := range entries {
				judge := start
				if moving {
					judge = tk
				}
				if judge.Redundant(e) {
					continue
				}
				kept = append(kept, e)
				tk.Add(e.Exclusive, e.Shared)
			}
			skipped, _ := Walk(kept, seedTaken(), all, len(entries), nil)
			if !slices.Equal(ids(full), ids(skipped)) {
				t.Fatalf("seed %d iter %d (moving %v): candidates %v without skipping, %v with",
					seed, iter, moving, ids(full), ids(skipped))
			}
		}
	}
}
