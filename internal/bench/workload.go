package bench

import (
	"fmt"
	"math/rand/v2"
	"strconv"

	"github.com/tasking-go/tasking"
)

// Workloads the program knows.
var Workloads = []string{"noop", "unique", "mix", "contend", "hot"}

// Task names. Every workload names its tasks "bench", except hot: its head is
// "head" and the tasks behind it "tail", so the two drain rates can be told
// apart in the tasks table.
const (
	nameBench = "bench"
	nameHead  = "head"
	nameTail  = "tail"
)

// taskNames are the names every worker handles.
var taskNames = []string{nameBench, nameHead, nameTail}

// group is a run of tasks dispatched in order; a backlog dispatches a group
// completely before the next one starts, so the head of hot really is ahead.
type group struct {
	specs []tasking.TaskSpec
}

// generate builds the tasks of workload w: n tasks in all (hot: head tasks
// on one name, then n-head tasks on names of their own; noHead leaves the
// head out, for the baseline). Names are fresh per call (prefix), so runs
// never share a name; the choice of names is seeded, so every locker gets
// the same sequence.
func generate(w string, n, head int, noHead bool, seed uint64, prefix string) ([]group, error) {
	rng := rand.New(rand.NewPCG(seed, 0x7461736b696e67))
	one := func(name string, opts ...tasking.DispatchOption) tasking.TaskSpec {
		return tasking.Spec(name, nil, opts...)
	}
	specs := make([]tasking.TaskSpec, 0, n)
	switch w {
	case "noop":
		for range n {
			specs = append(specs, one(nameBench))
		}
	case "unique":
		// Pulp's generator: every task exclusive on a name of its own.
		for i := range n {
			specs = append(specs, one(nameBench, tasking.Exclusive(prefix+"u:"+strconv.Itoa(i))))
		}
	case "mix":
		for range n {
			specs = append(specs, one(nameBench,
				tasking.Exclusive(prefix+"e:"+strconv.Itoa(rng.IntN(1000))),
				tasking.Shared(prefix+"s:"+strconv.Itoa(rng.IntN(10)))))
		}
	case "contend":
		for range n {
			specs = append(specs, one(nameBench, tasking.Exclusive(prefix+"c:"+strconv.Itoa(rng.IntN(3)))))
		}
	case "hot":
		if head >= n {
			return nil, fmt.Errorf("hot: -head %d must be less than -tasks %d", head, n)
		}
		var gs []group
		if !noHead {
			hs := make([]tasking.TaskSpec, 0, head)
			for range head {
				hs = append(hs, one(nameHead, tasking.Exclusive(prefix+"hot")))
			}
			gs = append(gs, group{hs})
		}
		for i := range n - head {
			specs = append(specs, one(nameTail, tasking.Exclusive(prefix+"t:"+strconv.Itoa(i))))
		}
		return append(gs, group{specs}), nil
	default:
		return nil, fmt.Errorf("unknown workload %q (want one of %v)", w, Workloads)
	}
	return []group{{specs}}, nil
}

func count(gs []group) int {
	n := 0
	for _, g := range gs {
		n += len(g.specs)
	}
	return n
}
