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
		`SELECT req, fence FROM "s".lock_batch($1, $2, $3, $4, $5)`:     3,
		`SELECT count(*) FROM "s".lock_batch($1, $2, '{}', '{}', '{}')`: 2,
		`SELECT pg_notify($1, 'r')`:                                     2,
		`LISTEN "tasking:s"`:                                            1,
		`SELECT pg_try_advisory_xact_lock($1)`:                          5,
		`SELECT id, created_at FROM "s".dispatch(…)`:                    7,
	}, Notifies: 7}
	listen, notify, session := c.wakeupCalls()
	if listen != 1 || notify != 9 || session != 5 {
		t.Errorf("listen, notify, session = %d, %d, %d; want 1, 9, 5", listen, notify, session)
	}
	kinds := map[string]int64{}
	for _, k := range c.byKind() {
		kinds[k.Kind] = k.N
	}
	if kinds["lock"] != 3 || kinds["unlock"] != 2 || kinds["notify"] != 2 || kinds["dispatch"] != 7 || kinds["listen"] != 1 {
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

func TestScalingMarkdown(t *testing.T) {
	run := func(rate float64, stmts float64, one, all int) scalingRun {
		return scalingRun{Rate: rate, ConnsOne: one, ConnsAll: all,
			Tasking: &Result{StmtPerTask: stmts, All: groupStats{Completed: 100, Tasks: 200}}}
	}
	steady := func(r scalingRun, rate, from float64) scalingRun {
		r.Tasking.SteadyRate, r.Tasking.SteadyFrom = rate, from
		return r
	}
	rep := &ScalingReport{Config: scalingConfig{Procs: []int{1, 4}, Slots: 80, Tasks: 30000, Repeat: 3,
		FleetBody: "300ms", FleetDrain: "1m0s", BouncerPool: 20, Cores: 2}}
	rep.Cells = []*scalingCell{
		{Scenario: "noop", System: "pg", Procs: 1, Runs: []scalingRun{run(900, 0.3, 6, 6), run(1000, 0.2, 5, 5), run(1100, 0.1, 4, 4)}},
		{Scenario: "noop", System: "pg", Procs: 4, Runs: []scalingRun{run(700, 0.5, 4, 15), {Err: "worker process 3 did not start"}}},
		{Scenario: "noop", System: "river", Procs: 1, Runs: []scalingRun{{Rate: 5000, ConnsOne: 4, ConnsAll: 4,
			River: &riverResult{Version: "v0.51.2"}}}},
		{Scenario: "fleet", System: "redis", Procs: 80, Runs: []scalingRun{steady(run(133.5, 4.8, 2, 160), 200, 5.24)}},
		{Scenario: "fleet-pgbouncer", System: "redis", Procs: 200, Runs: []scalingRun{{Err: "every worker process ended"}}},
	}
	var b strings.Builder
	rep.Markdown(&b)
	md := b.String()
	for _, want := range []string{
		"| noop | tasking, PostgreSQL locker | **1,000** (900–1,100) | **700** (1 of 2 failed [1]) |",
		"| noop | River v0.51.2 | **5,000** | – |",
		"| noop | tasking, PostgreSQL locker | 0.200 | 0.500 |",
		"| noop | tasking, PostgreSQL locker | 5 / 5 | 4 / 15 |",
		"| 80 procs × 1, direct | tasking, Redis locker | **134** | 50% of 267 | 200, 75% (5.2 s) | 100 / 200 | 4.80 |",
		"| 200 procs × 1, PgBouncer, 20 server conns | tasking, Redis locker | failed (1 of 1 failed [2]) |",
		"1. noop, tasking, PostgreSQL locker, 4 procs: worker process 3 did not start",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("scaling table lacks %q:\n%s", want, md)
		}
	}
}
