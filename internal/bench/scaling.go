package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ScalingConfig is the scaling table (-scaling): noop and mix backlogs at
// several process counts with both lockers and River, then Pulp's fleet
// (one slot per process, unique names, 300 ms bodies), directly and behind
// PgBouncer; every run repeated, interleaved, medians reported.
type ScalingConfig struct {
	Base   Config // servers, pool, poll, seed, log level, progress
	Procs  []int  // worker processes of the backlog runs
	Slots  int    // handler slots (River workers) in all, for the backlog runs
	Tasks  int    // tasks (jobs) per backlog run
	Repeat int
	River  string // the River program (examples/bench/river) built; "" leaves River out

	FleetProcs   int           // Pulp's fleet: processes with one slot each (0: none)
	FleetBody    time.Duration // handler sleep
	FleetSeconds float64       // tasks = the ideal rate × this
	FleetDrain   time.Duration // stop measuring this long after the workers started

	BouncerProcs int // the fleet behind PgBouncer, Redis locker (0: none)
	BouncerPool  int // PgBouncer's server connections
}

// ScalingReport is every run of a scaling session.
type ScalingReport struct {
	Started time.Time      `json:"started"`
	Config  scalingConfig  `json:"config"`
	Cells   []*scalingCell `json:"cells"`
}

type scalingConfig struct {
	Procs        []int  `json:"procs"`
	Slots        int    `json:"slots"`
	Tasks        int    `json:"tasks"`
	Repeat       int    `json:"repeat"`
	FleetProcs   int    `json:"fleet_procs"`
	FleetBody    string `json:"fleet_body"`
	FleetDrain   string `json:"fleet_max_drain"`
	BouncerProcs int    `json:"pgbouncer_fleet_procs"`
	BouncerPool  int    `json:"pgbouncer_pool"`
	Cores        int    `json:"cores"`
}

// scalingCell is one scenario, system and process count, with its runs.
type scalingCell struct {
	Scenario string       `json:"scenario"` // "noop", "mix", "fleet", "fleet-pgbouncer"
	System   string       `json:"system"`   // "pg", "redis", "river"
	Procs    int          `json:"procs"`
	Slots    int          `json:"slots"`
	Tasks    int          `json:"tasks"`
	Runs     []scalingRun `json:"runs"`
}

// scalingRun is one run of a cell: a tasking trial or a River run.
type scalingRun struct {
	Err      string       `json:"error,omitempty"`
	Tasking  *Result      `json:"tasking,omitempty"`
	River    *riverResult `json:"river,omitempty"`
	Rate     float64      `json:"tasks_per_s"`
	ConnsAll int          `json:"peak_pg_connections_workers"`
	ConnsOne int          `json:"peak_connections_per_worker_process"`
}

// riverResult is the River program's -json line.
type riverResult struct {
	Version       string  `json:"version"`
	Jobs          int64   `json:"jobs"`
	Seconds       float64 `json:"seconds"`
	JobsPerSecond float64 `json:"jobs_per_s"`
	PeakConns     int     `json:"peak_pg_connections"`
	PeakConnsProc int     `json:"peak_pg_connections_per_process"`
}

func (c *scalingCell) ok() []scalingRun {
	var out []scalingRun
	for _, r := range c.Runs {
		if r.Err == "" {
			out = append(out, r)
		}
	}
	return out
}

// median is the successful run with the median rate (the lower middle one
// for an even count).
func (c *scalingCell) median() (scalingRun, bool) {
	ok := c.ok()
	if len(ok) == 0 {
		return scalingRun{}, false
	}
	slices.SortFunc(ok, func(a, b scalingRun) int {
		switch {
		case a.Rate < b.Rate:
			return -1
		case a.Rate > b.Rate:
			return 1
		}
		return 0
	})
	return ok[(len(ok)-1)/2], true
}

// Scaling runs the scaling session. It goes on past a failed run (the
// table shows it), and stops at ctx's end with what it has.
func Scaling(ctx context.Context, sc ScalingConfig, log io.Writer) (*ScalingReport, error) {
	if sc.Repeat < 1 || sc.Tasks < 1 || sc.Slots < 1 || len(sc.Procs) == 0 {
		return nil, errors.New("scaling: need -repeat, -tasks, -slots and procs")
	}
	for _, p := range sc.Procs {
		if p < 1 || p > sc.Slots {
			return nil, fmt.Errorf("scaling: %d processes for %d slots", p, sc.Slots)
		}
	}
	rep := &ScalingReport{Started: time.Now(), Config: scalingConfig{
		Procs: sc.Procs, Slots: sc.Slots, Tasks: sc.Tasks, Repeat: sc.Repeat,
		FleetProcs: sc.FleetProcs, FleetBody: bodyString(sc.FleetBody), FleetDrain: sc.FleetDrain.String(),
		BouncerProcs: sc.BouncerProcs, BouncerPool: sc.BouncerPool, Cores: numCPU(),
	}}
	cells := map[string]*scalingCell{}
	cell := func(scenario, system string, procs, slots, tasks int) *scalingCell {
		k := fmt.Sprintf("%s/%s/%d", scenario, system, procs)
		c := cells[k]
		if c == nil {
			c = &scalingCell{Scenario: scenario, System: system, Procs: procs, Slots: slots, Tasks: tasks}
			cells[k] = c
			rep.Cells = append(rep.Cells, c)
		}
		return c
	}
	type step struct {
		label string
		run   func() error
	}
	var steps []step
	tasking := func(scenario string, cfg Config) step {
		label := fmt.Sprintf("%s, %d procs × %d slots, %s", scenario, cfg.Procs, cfg.Slots/cfg.Procs, strings.Join(cfg.Lockers, " and "))
		return step{label, func() error {
			r, err := Run(ctx, cfg)
			var got []*Result
			if r != nil {
				got = r.Results
			}
			for _, lk := range cfg.Lockers {
				c := cell(scenario, lk, cfg.Procs, cfg.Slots, cfg.Tasks)
				i := slices.IndexFunc(got, func(x *Result) bool { return x.Locker == lk })
				if i < 0 {
					msg := "not run"
					if err != nil {
						msg = err.Error()
					}
					c.Runs = append(c.Runs, scalingRun{Err: msg})
					continue
				}
				x := got[i]
				c.Runs = append(c.Runs, scalingRun{Tasking: x, Rate: x.All.Rate, ConnsAll: x.PeakConnsWork, ConnsOne: x.PeakConnsProc})
			}
			return err
		}}
	}
	base := sc.Base
	base.Repeat, base.StopAfter, base.MaxDrain, base.PgBouncer, base.Rate = 1, 0, 0, 0, 0
	base.Mode, base.Body, base.Dispatchers, base.Batch = "backlog", 0, 4, 5000
	for range sc.Repeat {
		for _, p := range sc.Procs {
			for _, w := range []string{"noop", "mix"} {
				cfg := base
				cfg.Lockers, cfg.Workload, cfg.Procs, cfg.Slots, cfg.Tasks = []string{"pg", "redis"}, w, p, sc.Slots, sc.Tasks
				steps = append(steps, tasking(w, cfg))
				if w == "noop" && sc.River != "" {
					p := p
					steps = append(steps, step{fmt.Sprintf("noop, %d procs × %d workers, River", p, sc.Slots/p), func() error {
						c := cell("noop", "river", p, sc.Slots, sc.Tasks)
						rr, err := runRiver(ctx, sc.River, sc.Base.DSN, sc.Tasks, sc.Slots, p)
						if err != nil {
							c.Runs = append(c.Runs, scalingRun{Err: err.Error()})
							return err
						}
						c.Runs = append(c.Runs, scalingRun{River: rr, Rate: rr.JobsPerSecond, ConnsAll: rr.PeakConns, ConnsOne: rr.PeakConnsProc})
						return nil
					}})
				}
			}
		}
		fleet := func(scenario string, procs, pool int, lockers []string) step {
			cfg := base
			cfg.Lockers, cfg.Workload, cfg.Procs, cfg.Slots, cfg.Body = lockers, "unique", procs, procs, sc.FleetBody
			// Enough tasks for FleetSeconds at the ideal rate; the drain is
			// capped, since a fleet may run far below it.
			cfg.Tasks = max(100, int(float64(procs)/sc.FleetBody.Seconds()*sc.FleetSeconds))
			cfg.MaxDrain, cfg.PgBouncer = sc.FleetDrain, pool
			// Few names a batch: a dispatch takes one lock per name.
			cfg.Batch, cfg.Dispatchers = 500, 2
			return tasking(scenario, cfg)
		}
		if sc.FleetProcs > 0 {
			steps = append(steps, fleet("fleet", sc.FleetProcs, 0, []string{"pg", "redis"}))
		}
		if sc.BouncerProcs > 0 {
			steps = append(steps, fleet("fleet-pgbouncer", sc.BouncerProcs, sc.BouncerPool, []string{"redis"}))
		}
	}
	for i, s := range steps {
		if ctx.Err() != nil {
			return rep, ctx.Err()
		}
		t0 := time.Now()
		fmt.Fprintf(log, "scaling [%d/%d] %s\n", i+1, len(steps), s.label)
		if err := s.run(); err != nil {
			fmt.Fprintf(log, "scaling [%d/%d] failed after %.0fs: %v\n", i+1, len(steps), time.Since(t0).Seconds(), err)
			continue
		}
	}
	return rep, ctx.Err()
}

// runRiver runs the River program once, in a schema of its own that it
// drops at the end.
func runRiver(ctx context.Context, bin, dsn string, jobs, workers, procs int) (*riverResult, error) {
	var id [4]byte
	_, _ = rand.Read(id[:])
	cmd := exec.CommandContext(ctx, bin, "-json", "-drop", "-dsn", dsn,
		"-schema", "tasking_bench_"+hex.EncodeToString(id[:])+"_river",
		"-n", strconv.Itoa(jobs), "-workers", strconv.Itoa(workers), "-procs", strconv.Itoa(procs))
	// SIGINT lets it stop its children and drop its schema.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 30 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, os.Stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("river: %w", err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	var r riverResult
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &r); err != nil {
		return nil, fmt.Errorf("river: unexpected output %q: %w", out.String(), err)
	}
	return &r, nil
}

// Markdown writes the scaling tables.
func (rep *ScalingReport) Markdown(w io.Writer) {
	c := rep.Config
	fmt.Fprintf(w, "## Scaling: %s-task backlogs, %d slots in all, %d cores; median of %d (range)\n\n",
		num(float64(c.Tasks)), c.Slots, c.Cores, c.Repeat)
	type rowKey struct{ scenario, system string }
	var rows []rowKey
	for _, cl := range rep.Cells {
		k := rowKey{cl.Scenario, cl.System}
		if (cl.Scenario == "noop" || cl.Scenario == "mix") && !slices.Contains(rows, k) {
			rows = append(rows, k)
		}
	}
	slices.SortStableFunc(rows, func(a, b rowKey) int {
		if a.scenario != b.scenario {
			return strings.Compare(b.scenario, a.scenario) // noop first
		}
		return strings.Compare(a.system, b.system)
	})
	find := func(scenario, system string, procs int) *scalingCell {
		for _, cl := range rep.Cells {
			if cl.Scenario == scenario && cl.System == system && cl.Procs == procs {
				return cl
			}
		}
		return nil
	}
	var notes []string
	noted := map[*scalingCell]int{}
	note := func(cl *scalingCell) string {
		failed := len(cl.Runs) - len(cl.ok())
		if failed == 0 {
			return ""
		}
		if _, ok := noted[cl]; !ok {
			for _, r := range cl.Runs {
				if r.Err != "" {
					notes = append(notes, fmt.Sprintf("%s, %s, %d procs: %s", cl.Scenario, rep.systemName(cl.System), cl.Procs, shorten(r.Err, 300)))
					noted[cl] = len(notes)
					break
				}
			}
		}
		return fmt.Sprintf(" (%d of %d failed [%d])", failed, len(cl.Runs), noted[cl])
	}
	table := func(title string, value func(cl *scalingCell, m scalingRun) string) {
		fmt.Fprintf(w, "%s\n\n| workload | system |", title)
		for _, p := range c.Procs {
			fmt.Fprintf(w, " %d × %d |", p, c.Slots/p)
		}
		fmt.Fprint(w, "\n|---|---|")
		for range c.Procs {
			fmt.Fprint(w, "---:|")
		}
		fmt.Fprintln(w)
		for _, k := range rows {
			fmt.Fprintf(w, "| %s | %s |", k.scenario, rep.systemName(k.system))
			for _, p := range c.Procs {
				cl := find(k.scenario, k.system, p)
				if cl == nil {
					fmt.Fprint(w, " – |")
					continue
				}
				m, ok := cl.median()
				if !ok {
					fmt.Fprintf(w, " failed%s |", note(cl))
					continue
				}
				fmt.Fprintf(w, " %s |", value(cl, m))
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w)
	}
	table("tasks/s (worker processes × slots each)", func(cl *scalingCell, m scalingRun) string {
		return rateRange(cl, m) + note(cl)
	})
	table("PostgreSQL statements / task (median run)", func(cl *scalingCell, m scalingRun) string {
		if m.Tasking == nil {
			return "–"
		}
		return fmt.Sprintf("%.3f", m.Tasking.StmtPerTask)
	})
	table("peak PostgreSQL connections of the workers: per worker process / in all (median run)", func(cl *scalingCell, m scalingRun) string {
		return fmt.Sprintf("%d / %d", m.ConnsOne, m.ConnsAll)
	})

	var fleets []*scalingCell
	for _, cl := range rep.Cells {
		if strings.HasPrefix(cl.Scenario, "fleet") {
			fleets = append(fleets, cl)
		}
	}
	if len(fleets) > 0 {
		fmt.Fprintf(w, "## Pulp's fleet: one slot per process, each task exclusive on a name of its own, %s bodies; drain capped at %s; median of %d\n\n",
			c.FleetBody, c.FleetDrain, c.Repeat)
		fmt.Fprintln(w, "| fleet | locker | tasks/s | of the ideal | once every process ran: tasks/s (from) | completed | PG statements / task | connection errors: workers / dispatch | peak PG connections per worker process | peak PG connections of the workers | worker processes ended early |")
		fmt.Fprintln(w, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, cl := range fleets {
			ideal := 0.0
			if d, err := time.ParseDuration(c.FleetBody); err == nil && d > 0 {
				ideal = float64(cl.Procs) / d.Seconds()
			}
			how := "direct"
			if cl.Scenario == "fleet-pgbouncer" {
				how = fmt.Sprintf("PgBouncer, %d server conns", c.BouncerPool)
			}
			fmt.Fprintf(w, "| %d procs × 1, %s | %s |", cl.Procs, how, rep.systemName(cl.System))
			m, ok := cl.median()
			if !ok {
				fmt.Fprintf(w, " failed%s | | | | | | | | |\n", note(cl))
				continue
			}
			x := m.Tasking
			conns := fmt.Sprint(m.ConnsOne)
			all := fmt.Sprint(m.ConnsAll)
			if cl.Scenario == "fleet-pgbouncer" {
				conns = fmt.Sprintf("– (%d to PgBouncer)", m.ConnsOne)
				all = fmt.Sprintf("%d (PgBouncer's)", m.ConnsAll)
			}
			steady := "–"
			if x.SteadyRate > 0 {
				steady = fmt.Sprintf("%s, %.0f%% (%.1f s)", num(x.SteadyRate), 100*x.SteadyRate/ideal, x.SteadyFrom)
			}
			fmt.Fprintf(w, " %s%s | %.0f%% of %s | %s | %d / %d | %.2f | %d / %d | %s | %s | %d |\n",
				rateRange(cl, m), note(cl), 100*m.Rate/ideal, num(ideal), steady, x.All.Completed, x.All.Tasks, x.StmtPerTask,
				x.ConnErrors, x.DispatchConnEr, conns, all, len(x.LostProcs))
		}
		fmt.Fprintln(w)
	}
	if len(notes) > 0 {
		fmt.Fprintln(w, "Failures (the first of each cell):")
		fmt.Fprintln(w)
		for i, n := range notes {
			fmt.Fprintf(w, "%d. %s\n", i+1, n)
		}
		fmt.Fprintln(w)
	}
}

func (rep *ScalingReport) systemName(system string) string {
	switch system {
	case "pg":
		return "tasking, PostgreSQL locker"
	case "redis":
		return "tasking, Redis locker"
	case "river":
		for _, cl := range rep.Cells {
			for _, r := range cl.Runs {
				if r.River != nil {
					return "River " + r.River.Version
				}
			}
		}
		return "River"
	}
	return system
}

// rateRange is the median rate, bold, with the range of the runs.
func rateRange(cl *scalingCell, m scalingRun) string {
	ok := cl.ok()
	if len(ok) == 1 {
		return "**" + num(m.Rate) + "**"
	}
	lo, hi := ok[0].Rate, ok[0].Rate
	for _, r := range ok {
		lo, hi = min(lo, r.Rate), max(hi, r.Rate)
	}
	return fmt.Sprintf("**%s** (%s–%s)", num(m.Rate), num(lo), num(hi))
}

// WriteJSON writes the report to path.
func (rep *ScalingReport) WriteJSON(path string) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
