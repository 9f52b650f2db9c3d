package tasking_test

// The judgement of a fault scenario (fault_test.go) from the stored tasks
// and the handler runs the workers recorded, and a test of the judge.

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
)

// faultReport is the judgement of one scenario.
type faultReport struct {
	tasks, faults        int
	lost, duplicates     int
	violations           int
	workerLost, lockLost int
	excused              []string
	problems             []string
	stuck                bool

	// The longest a task waited to be claimed after it became runnable
	// (dispatched, and every earlier conflicting task final).
	maxDelay     time.Duration
	maxDelayTask string
}

func (r *faultReport) failed() bool {
	return r.lost+r.duplicates+r.violations > 0 || r.stuck
}

func (r *faultReport) add(counter *int, format string, a ...any) {
	*counter++
	if len(r.problems) < 40 {
		r.problems = append(r.problems, fmt.Sprintf(format, a...))
	}
}

func (r *faultReport) violation(format string, a ...any) { r.add(&r.violations, format, a...) }

// checkFaultRun judges a scenario from the tasks as stored and the handler
// runs the processes recorded. want is the number of tasks dispatched
// (args "i" 0..want-1); outages are spans of time P6 does not count.
func checkFaultRun(tasks []*tasking.Task, want int, procs []*faultProc, outages [][2]time.Time) faultReport {
	rep := faultReport{tasks: want}
	tasks = slices.Clone(tasks)
	slices.SortFunc(tasks, func(a, b *tasking.Task) int { return cmp.Compare(a.ID, b.ID) })

	// Stored once each.
	seen := make(map[int]int64, len(tasks))
	for _, task := range tasks {
		i := taskIndex(task)
		if i < 0 || i >= want {
			rep.violation("task %d has unexpected args %s", task.ID, task.Args)
			continue
		}
		if other, dup := seen[i]; dup {
			rep.add(&rep.duplicates, "dispatch %d stored twice: tasks %d and %d", i, other, task.ID)
		}
		seen[i] = task.ID
	}
	for i := 0; i < want; i++ {
		if _, ok := seen[i]; !ok {
			rep.add(&rep.lost, "dispatch %d was acknowledged but is not stored", i)
		}
	}

	// Handler runs by task; ends of runs cut off by a kill.
	runs := make(map[int64][]*handlerRun)
	for _, p := range procs {
		for _, r := range p.runs {
			runs[r.task] = append(runs[r.task], r)
		}
	}
	end := func(r *handlerRun) int64 {
		if r.end != 0 {
			return r.end
		}
		if r.proc.killedAt != 0 {
			return max(r.proc.killedAt, r.start)
		}
		return 1<<63 - 1 // never ended: overlaps everything after it
	}

	for _, task := range tasks {
		rs := runs[task.ID]
		if len(rs) > 1 {
			rep.add(&rep.duplicates, "task %d: handler started %d times (processes %s)", task.ID, len(rs), procNames(rs))
		}
		hasNames := len(task.Exclusive)+len(task.Shared) > 0
		for _, r := range rs {
			if hasNames != (r.fence > 0) {
				rep.violation("task %d (resources %v/%v) ran with fence %d", task.ID, task.Exclusive, task.Shared, r.fence)
			}
			if r.end == 0 && r.proc.killedAt == 0 {
				rep.violation("task %d: handler in %s never ended, and its process was not killed", task.ID, r.proc.name)
			}
		}
		switch {
		case !task.State.Final():
			who := "no worker"
			for _, p := range procs {
				if p.workerID != 0 && p.workerID == task.WorkerID {
					who = fmt.Sprintf("worker %d (%s, pid %d, killed %v, paused %d times)", p.workerID, p.name, p.pid, p.killedAt != 0, len(p.stops))
				}
			}
			rep.add(&rep.lost, "task %d is still %s (epoch %d, %s, handler runs %d)", task.ID, task.State, task.Epoch, who, len(rs))
		case task.State == tasking.StateCompleted:
			if len(rs) == 0 || rs[0].end == 0 {
				rep.add(&rep.lost, "task %d completed without a whole handler run", task.ID)
			}
		case task.State == tasking.StateFailed && strings.Contains(task.Error, tasking.ErrWorkerLost.Error()):
			rep.workerLost++
		case task.State == tasking.StateFailed && strings.Contains(task.Error, tasking.ErrLockLost.Error()):
			rep.lockLost++
		default:
			rep.violation("task %d ended %s with %q, which no fault explains", task.ID, task.State, task.Error)
		}
	}

	// P6: a runnable task is claimed promptly. It became runnable when it
	// was dispatched and every earlier conflicting task was final; time in
	// outages does not count.
	for i, b := range tasks {
		if b.StartedAt.IsZero() {
			continue
		}
		ready, by := b.CreatedAt, "its dispatch"
		for _, a := range tasks[:i] {
			if conflicts(a, b) && a.FinishedAt.After(ready) {
				ready, by = a.FinishedAt, fmt.Sprintf("task %d ended %s %q", a.ID, a.State, a.Error)
			}
		}
		d := b.StartedAt.Sub(ready)
		for _, o := range outages {
			if from, to := max(o[0].UnixNano(), ready.UnixNano()), min(o[1].UnixNano(), b.StartedAt.UnixNano()); to > from {
				d -= time.Duration(to - from)
			}
		}
		if d > rep.maxDelay {
			rep.maxDelay = d
			rep.maxDelayTask = fmt.Sprintf("task %d, claimed %v after %s", b.ID, d.Round(time.Millisecond), by)
		}
		if d > faultStartBound {
			rep.violation("P6: task %d %v/%v was runnable from %s (%s) but claimed only %v later (outages not counted)",
				b.ID, b.Exclusive, b.Shared, ready.Format("15:04:05.000"), by, d.Round(time.Millisecond))
		}
	}

	// Pairs of conflicting tasks, a dispatched before b.
	for i, a := range tasks {
		for _, b := range tasks[i+1:] {
			if !conflicts(a, b) {
				continue
			}
			// Order in the database: b was claimed only after a was final.
			if !b.StartedAt.IsZero() && (a.FinishedAt.IsZero() || b.StartedAt.Before(a.FinishedAt)) {
				rep.violation("P2: task %d was claimed at %s, before the earlier conflicting task %d was final (%s, finished %s)",
					b.ID, b.StartedAt.Format("15:04:05.000000"), a.ID, a.State, a.FinishedAt.Format("15:04:05.000000"))
			}
			for _, ra := range runs[a.ID] {
				for _, rb := range runs[b.ID] {
					// Fencing tokens grow with every grant.
					if ra.fence != 0 && rb.fence != 0 && rb.fence <= ra.fence {
						rep.violation("fence: task %d got fence %d, not above earlier conflicting task %d's %d", b.ID, rb.fence, a.ID, ra.fence)
					}
					if a.State == tasking.StateCompleted && b.State == tasking.StateCompleted && rb.start < end(ra) {
						rep.violation("P2: handler of task %d started before the handler of earlier conflicting task %d ended", b.ID, a.ID)
					}
					if ra.start >= end(rb) || rb.start >= end(ra) {
						continue // no overlap
					}
					// They overlapped. Excused only if the one that started
					// first was paused or killed and its task was already
					// final when the other started.
					first, firstTask, second, secondTask := ra, a, rb, b
					if rb.start < ra.start {
						first, firstTask, second, secondTask = rb, b, ra, a
					}
					desc := fmt.Sprintf("tasks %d %v/%v (%s, %s) and %d %v/%v (%s, %s)",
						a.ID, a.Exclusive, a.Shared, ra.proc.name, a.State, b.ID, b.Exclusive, b.Shared, rb.proc.name, b.State)
					if first.proc.stoppedDuring(first.start, first.end) && !firstTask.FinishedAt.IsZero() &&
						firstTask.FinishedAt.UnixNano() <= second.start {
						rep.excused = append(rep.excused, fmt.Sprintf("%s: task %d's process was paused/killed and the task final (%q) before task %d started",
							desc, firstTask.ID, firstTask.Error, secondTask.ID))
						continue
					}
					rep.violation("P1: conflicting handlers overlapped: %s", desc)
				}
			}
		}
	}
	return rep
}

func procNames(rs []*handlerRun) string {
	names := make([]string, len(rs))
	for i, r := range rs {
		names[i] = fmt.Sprintf("%s/pid %d", r.proc.name, r.proc.pid)
	}
	return strings.Join(names, ", ")
}

// TestFaultChecker feeds checkFaultRun made-up runs: each kind of breach
// must be found, and the allowed cases must pass.
func TestFaultChecker(t *testing.T) {
	at := func(ms int) time.Time { return time.Unix(1000, 0).Add(time.Duration(ms) * time.Millisecond) }
	ns := func(ms int) int64 { return at(ms).UnixNano() }
	task := func(id int64, i int, state tasking.State, errText string, started, finished int, excl, shared []string) *tasking.Task {
		return &tasking.Task{
			ID: id, Args: json.RawMessage(fmt.Sprintf(`{"ms": 10, "i": %d}`, i)), State: state, Error: errText,
			Exclusive: excl, Shared: shared, CreatedAt: at(0), StartedAt: at(started), FinishedAt: at(finished),
		}
	}
	x := []string{"r"}
	type run struct {
		task              int64
		fence             int64
		start, end        int // ms; end -1: none
		proc              int
		killedAt, stopped int // ms, 0: never
	}
	checkAll := func(tasks []*tasking.Task, want int, runs []run, outages [][2]time.Time) faultReport {
		procs := map[int]*faultProc{}
		var list []*faultProc
		for _, r := range runs {
			p := procs[r.proc]
			if p == nil {
				p = &faultProc{name: fmt.Sprintf("p%d", r.proc)}
				procs[r.proc] = p
				list = append(list, p)
			}
			if r.killedAt != 0 {
				p.killedAt = ns(r.killedAt)
			}
			if r.stopped != 0 {
				p.stops = [][2]int64{{ns(r.stopped), ns(r.stopped + 2000)}}
			}
			hr := &handlerRun{proc: p, task: r.task, fence: r.fence, start: ns(r.start)}
			if r.end >= 0 {
				hr.end = ns(r.end)
			}
			p.runs = append(p.runs, hr)
		}
		return checkFaultRun(tasks, want, list, outages)
	}
	check := func(tasks []*tasking.Task, runs []run) faultReport { return checkAll(tasks, len(tasks), runs, nil) }

	t.Run("clean", func(t *testing.T) {
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateCompleted, "", 0, 20, x, nil),
			task(2, 1, tasking.StateCompleted, "", 21, 40, x, nil),
		}, []run{{1, 1, 1, 19, 0, 0, 0}, {2, 2, 22, 39, 1, 0, 0}})
		require.False(t, rep.failed(), rep.problems)
	})
	t.Run("overlap", func(t *testing.T) {
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateCompleted, "", 0, 20, x, nil),
			task(2, 1, tasking.StateCompleted, "", 21, 40, nil, x),
		}, []run{{1, 1, 1, 30, 0, 0, 0}, {2, 2, 22, 39, 1, 0, 0}})
		require.True(t, rep.failed())
		require.Contains(t, strings.Join(rep.problems, "\n"), "P1")
	})
	t.Run("order", func(t *testing.T) {
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateCompleted, "", 30, 50, x, nil),
			task(2, 1, tasking.StateCompleted, "", 0, 20, x, nil),
		}, []run{{1, 2, 31, 49, 0, 0, 0}, {2, 1, 1, 19, 1, 0, 0}})
		require.Contains(t, strings.Join(rep.problems, "\n"), "P2")
		require.Contains(t, strings.Join(rep.problems, "\n"), "fence")
	})
	t.Run("twice", func(t *testing.T) {
		rep := check([]*tasking.Task{task(1, 0, tasking.StateCompleted, "", 0, 20, x, nil)},
			[]run{{1, 1, 1, 5, 0, 0, 0}, {1, 2, 6, 19, 1, 0, 0}})
		require.Equal(t, 1, rep.duplicates)
	})
	t.Run("lost", func(t *testing.T) {
		rep := checkAll([]*tasking.Task{
			task(1, 0, tasking.StateRunning, "", 0, 0, x, nil),
			task(3, 2, tasking.StateCompleted, "", 0, 10, nil, nil),
		}, 3, []run{{1, 1, 1, -1, 0, 0, 0}}, nil)
		require.Equal(t, 3, rep.lost, rep.problems)       // still running, dispatch 1 missing, completed without a run
		require.Equal(t, 1, rep.violations, rep.problems) // a handler that never ended in a live process
	})
	t.Run("killed_then_next", func(t *testing.T) {
		// Task 1's process is killed at 10 ms; cleanup fails it at 1000 ms;
		// task 2 runs after that: fine.
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateFailed, "worker lost", 0, 1000, x, nil),
			task(2, 1, tasking.StateCompleted, "", 1001, 1020, x, nil),
		}, []run{{1, 1, 1, -1, 0, 10, 0}, {2, 2, 1002, 1019, 1, 0, 0}})
		require.False(t, rep.failed(), rep.problems)
		require.Equal(t, 1, rep.workerLost)
	})
	t.Run("paused_overlap_excused", func(t *testing.T) {
		// Task 1's process is paused from 5 ms to 2005 ms; cleanup fails the
		// task at 1500 ms and task 2 runs from 1600 ms while task 1's
		// handler, resumed, ends at 2010 ms.
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateFailed, "worker lost", 0, 1500, x, nil),
			task(2, 1, tasking.StateCompleted, "", 1550, 1700, x, nil),
		}, []run{{1, 1, 1, 2010, 0, 0, 5}, {2, 2, 1600, 1690, 1, 0, 0}})
		require.False(t, rep.failed(), rep.problems)
		require.Len(t, rep.excused, 1)
	})
	t.Run("stall", func(t *testing.T) {
		// Task 2 is runnable from 20 ms (task 1 final) but claimed 5 s later.
		tasks := []*tasking.Task{
			task(1, 0, tasking.StateCompleted, "", 0, 20, x, nil),
			task(2, 1, tasking.StateCompleted, "", 5020, 5040, x, nil),
		}
		runs := []run{{1, 1, 1, 19, 0, 0, 0}, {2, 2, 5021, 5039, 1, 0, 0}}
		rep := check(tasks, runs)
		require.Equal(t, 1, rep.violations, rep.problems)
		require.Contains(t, rep.problems[0], "P6")
		// Not when the database was down for most of that time.
		rep = checkAll(tasks, 2, runs, [][2]time.Time{{at(100), at(4500)}})
		require.False(t, rep.failed(), rep.problems)
	})
	t.Run("unexplained_failure", func(t *testing.T) {
		rep := check([]*tasking.Task{task(1, 0, tasking.StateFailed, "boom", 0, 10, nil, nil)},
			[]run{{1, 0, 1, 9, 0, 0, 0}})
		require.Equal(t, 1, rep.violations, rep.problems)
	})
}
