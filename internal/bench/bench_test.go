package bench

import (
	"encoding/xml"
	"strings"
	"testing"
	"time"

	"github.com/tasking-go/tasking"
)

func TestGenerate(t *testing.T) {
	names := func(s tasking.TaskSpec) string {
		return strings.Join(s.Exclusive, ",") + "|" + strings.Join(s.Shared, ",")
	}
	for _, w := range Workloads {
		gs, err := generate(w, 10000, 1000, false, 1, "p/")
		if err != nil {
			t.Fatalf("%s: %v", w, err)
		}
		if n := count(gs); n != 10000 {
			t.Fatalf("%s: %d tasks, want 10000", w, n)
		}
		again, _ := generate(w, 10000, 1000, false, 1, "p/")
		for i := range gs {
			for j := range gs[i].specs {
				if names(gs[i].specs[j]) != names(again[i].specs[j]) {
					t.Fatalf("%s: task %d differs between two generations with one seed", w, j)
				}
			}
		}
		distinct := map[string]bool{}
		for _, g := range gs {
			for _, s := range g.specs {
				for _, n := range append(append([]string{}, s.Exclusive...), s.Shared...) {
					if !strings.HasPrefix(n, "p/") {
						t.Fatalf("%s: name %q lacks the run's prefix", w, n)
					}
					distinct[n] = true
				}
			}
		}
		want := map[string]int{"noop": 0, "unique": 10000, "mix": 1010, "contend": 3, "hot": 9001}[w]
		if len(distinct) != want {
			t.Errorf("%s: %d distinct names, want %d", w, len(distinct), want)
		}
	}
	gs, _ := generate("hot", 10000, 1000, true, 1, "p/")
	if len(gs) != 1 || len(gs[0].specs) != 9000 || gs[0].specs[0].Name != nameTail {
		t.Errorf("hot without head: %d groups, want the 9000 tail tasks alone", len(gs))
	}
	if _, err := generate("hot", 10, 10, false, 1, "p/"); err == nil {
		t.Error("hot with a head as long as the run: no error")
	}
}

func TestStmtKindAndWakeups(t *testing.T) {
	c := stmtCounts{BySQL: map[string]int64{
		`SELECT req, fence FROM "s".lock_batch($1, $2, $3, $4, $5)`:                                        3,
		`SELECT pg_notify($3, 'r') FROM (SELECT count(*) FROM "s".lock_batch($1, $2, '{}', '{}', '{}')) x`: 2,
		`LISTEN "tasking:s"`:                         1,
		`SELECT pg_try_advisory_xact_lock($1)`:       5,
		`SELECT id, created_at FROM "s".dispatch(…)`: 7,
	}, Notifies: 7}
	listen, notify, session := c.wakeupCalls()
	if listen != 1 || notify != 9 || session != 5 {
		t.Errorf("listen, notify, session = %d, %d, %d; want 1, 9, 5", listen, notify, session)
	}
	kinds := map[string]int64{}
	for _, k := range c.byKind() {
		kinds[k.Kind] = k.N
	}
	if kinds["lock"] != 3 || kinds["unlock+notify"] != 2 || kinds["dispatch"] != 7 || kinds["listen"] != 1 {
		t.Errorf("kinds = %v", kinds)
	}
}

func TestSVGIsWellFormed(t *testing.T) {
	rep := &Report{Config: reportConfig{Workload: "mix", Mode: "backlog", Tasks: 3, Slots: 80, Body: "noop"}}
	for _, lk := range []string{"pg", "redis"} {
		rep.Results = append(rep.Results, &Result{Locker: lk, Buckets: []int{10, 300, 0, 42},
			All: groupStats{Completed: 352, Rate: 1234, Seconds: time.Second.Seconds()}})
	}
	d := xml.NewDecoder(strings.NewReader(rep.svg()))
	for {
		_, err := d.Token()
		if err != nil {
			if err.Error() != "EOF" {
				t.Fatalf("svg does not parse: %v", err)
			}
			break
		}
	}
	var md strings.Builder
	rep.Markdown(&md)
	if !strings.Contains(md.String(), "| tasks/s | **1,234** | **1,234** |") {
		t.Errorf("markdown lacks the rate row:\n%s", md.String())
	}
}
