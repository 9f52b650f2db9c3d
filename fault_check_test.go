package tasking_test

// The judgement of a fault scenario (fault_test.go) from the stored tasks
// and the handler runs the workers recorded, and a test of the judge.

import (
	"cmp"
	"encoding/json"
	"errors"
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

	cancels *cancelReport // with cancels only
}

// cancelReport sums up the cancels of a run.
type cancelReport struct {
	asked, canceled, final [len(cancelPhases)]int // by phase: Cancel calls, tasks ended canceled, already final
	neverClaimed           int                    // ended canceled before any worker claimed them
	beforeStart            int                    // claimed, and canceled before the handler started: it saw ctx done at once
	beforeStartMax         time.Duration          // the longest such a handler ran before it saw ctx done
	claimedNoRun           int                    // claimed, canceled, no handler run (the claim's reply was lost)
	endedBefore            int                    // the handler had ended when Cancel was called (finishing)
	raced                  int                    // the handler's work ended as the cancel arrived
	dead                   int                    // the handler's process was killed
	paused                 int                    // the handler's process was paused: it ended after it went on
	// latency: from the Cancel call to the handler seeing ctx done, for
	// handlers running when Cancel was called.
	latency []time.Duration
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

// cancelSummary is the cancel part of the summary line, "" without cancels.
func (r *faultReport) cancelSummary() string {
	c := r.cancels
	if c == nil {
		return ""
	}
	var phases []string
	for i := 1; i < len(cancelPhases); i++ {
		phases = append(phases, fmt.Sprintf("%s %d/%d/%d", cancelPhases[i], c.asked[i], c.canceled[i], c.final[i]))
	}
	lat := "none measured"
	if n := len(c.latency); n > 0 {
		l := slices.Clone(c.latency)
		slices.Sort(l)
		pct := func(p int) time.Duration { return l[min(n-1, (n*p+99)/100-1)] }
		lat = fmt.Sprintf("p50 %v, p99 %v, max %v over %d handlers (target p99 <= 50ms)",
			pct(50).Round(10*time.Microsecond), pct(99).Round(10*time.Microsecond), l[n-1].Round(10*time.Microsecond), n)
	}
	return fmt.Sprintf("; cancels asked/canceled/already final by phase: %s; never claimed %d, canceled before the handler started %d "+
		"(it saw ctx.Done after %v at most), claimed but never run %d, handler had ended %d, handler's work ended as the cancel came %d, "+
		"on a killed worker %d, on a paused worker %d; cancel to ctx.Done: %s",
		strings.Join(phases, ", "), c.neverClaimed, c.beforeStart, c.beforeStartMax.Round(10*time.Microsecond), c.claimedNoRun,
		c.endedBefore, c.raced, c.dead, c.paused, lat)
}

// faultFacts is what the test knows of a run besides the tasks and events.
type faultFacts struct {
	outages  [][2]time.Time        // spans of time P6 does not count
	lockLoss [][2]int64            // spans (unix ns) in which Redis lost its grants
	cancels  map[int64]*cancelCall // the cancels the test made, by task; nil: none
}

// checkFaultRun judges a scenario from the tasks as stored and the handler
// runs the processes recorded. want is the number of tasks dispatched
// (args "i" 0..want-1).
func checkFaultRun(tasks []*tasking.Task, want int, procs []*faultProc, facts faultFacts) faultReport {
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
	if facts.cancels != nil {
		rep.cancels = &cancelReport{}
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
			// Where Redis lost the grant of a running handler, its worker
			// must find out (at its next renewal, or when the lease it
			// could not renew runs out), cancel it and fail the task.
			if lockLost := task.State == tasking.StateFailed && strings.Contains(task.Error, tasking.ErrLockLost.Error()); r.fence > 0 && !lockLost {
				for _, l := range facts.lockLoss {
					if r.start < l[0] && end(r) > l[0]+int64(faultLease+faultLease/4) {
						rep.violation("task %d: Redis lost its grant at %s, yet its handler in %s ran on until %s and the task ended %s %q",
							task.ID, time.Unix(0, l[0]).Format("15:04:05.000"), r.proc.name, time.Unix(0, end(r)).Format("15:04:05.000"), task.State, task.Error)
						break
					}
				}
			}
			// A process paused between the claim and the handler's start
			// may start it late; nothing else may.
			if task.State.Final() && r.start > task.FinishedAt.UnixNano() &&
				!r.proc.stoppedDuring(task.StartedAt.UnixNano(), r.start) {
				rep.violation("task %d: handler started in %s at %s, after the task was final (%s at %s)",
					task.ID, r.proc.name, time.Unix(0, r.start).Format("15:04:05.000000"), task.State, task.FinishedAt.Format("15:04:05.000000"))
			}
		}
		call := facts.cancels[task.ID]
		asked := call != nil && call.err == nil // Cancel said canceled or canceling
		if call != nil {
			checkCancel(&rep, task, call, rs, end)
		}
		for _, r := range rs {
			if r.canceled != 0 && !asked {
				rep.violation("task %d: handler in %s saw a cancel, but the test canceled no such task", task.ID, r.proc.name)
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
			// Where Redis lost grants, only a task holding one then (or
			// granted just before and claimed just after) may lose it.
			if len(facts.lockLoss) > 0 && !slices.ContainsFunc(rs, func(r *handlerRun) bool {
				return slices.ContainsFunc(facts.lockLoss, func(l [2]int64) bool {
					return r.start <= l[1]+int64(faultLease) && end(r) >= l[0]
				})
			}) {
				rep.violation("task %d failed %q, but its handler did not run while Redis lost grants", task.ID, task.Error)
			}
		case task.State == tasking.StateCanceled && asked:
		default:
			rep.violation("task %d ended %s with %q, which no fault explains", task.ID, task.State, task.Error)
		}
	}

	// P6: a runnable task is claimed promptly. It became runnable when it
	// was dispatched and every earlier conflicting task was final; time in
	// outages does not count.
	outages := facts.outages
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
					// final when the other started, or if Redis lost its
					// grant before the other started and its task failed
					// "lock lost"; either way its fencing token must be the
					// smaller, or a fenced side effect could not tell them
					// apart.
					first, firstTask, second, secondTask := ra, a, rb, b
					if rb.start < ra.start {
						first, firstTask, second, secondTask = rb, b, ra, a
					}
					desc := fmt.Sprintf("tasks %d %v/%v (%s, %s, fence %d) and %d %v/%v (%s, %s, fence %d)",
						a.ID, a.Exclusive, a.Shared, ra.proc.name, a.State, ra.fence, b.ID, b.Exclusive, b.Shared, rb.proc.name, b.State, rb.fence)
					var why string
					switch {
					case first.proc.stoppedDuring(first.start, first.end) && !firstTask.FinishedAt.IsZero() &&
						firstTask.FinishedAt.UnixNano() <= second.start:
						why = fmt.Sprintf("task %d's process was paused/killed and the task final (%q) before task %d started",
							firstTask.ID, firstTask.Error, secondTask.ID)
					case firstTask.State == tasking.StateFailed && strings.Contains(firstTask.Error, tasking.ErrLockLost.Error()) &&
						slices.ContainsFunc(facts.lockLoss, func(l [2]int64) bool { return l[0] <= second.start && l[1] >= first.start }):
						why = fmt.Sprintf("Redis lost task %d's grant before task %d started, and it failed %q",
							firstTask.ID, secondTask.ID, firstTask.Error)
					default:
						rep.violation("P1: conflicting handlers overlapped: %s", desc)
						continue
					}
					if first.fence >= second.fence {
						rep.violation("P1: conflicting handlers overlapped, and the earlier one's fencing token is not the smaller: %s (%s)", desc, why)
						continue
					}
					rep.excused = append(rep.excused, desc+": "+why)
				}
			}
		}
	}
	return rep
}

// checkCancel judges a task the test called Cancel on: the call's result,
// the task's final state, and whether its handler saw the cancel.
func checkCancel(rep *faultReport, task *tasking.Task, call *cancelCall, rs []*handlerRun, end func(*handlerRun) int64) {
	c := rep.cancels
	c.asked[call.phase]++
	calledAt := time.Unix(0, call.at).Format("15:04:05.000000")
	switch {
	case call.err == nil && task.State == tasking.StateCanceled:
		c.canceled[call.phase]++
	case call.err == nil:
		if task.State.Final() { // not final is reported as lost
			rep.violation("task %d: Cancel (%s, at %s) returned nil, but the task ended %s %q",
				task.ID, cancelPhases[call.phase], calledAt, task.State, task.Error)
		}
		return
	case errors.Is(call.err, tasking.ErrTaskFinal) && task.State != tasking.StateCanceled:
		c.final[call.phase]++
		return
	default:
		rep.violation("task %d: Cancel (%s, at %s): %v; the task ended %s", task.ID, cancelPhases[call.phase], calledAt, call.err, task.State)
		return
	}
	// The task ended canceled.
	switch {
	case task.StartedAt.IsZero() && len(rs) > 0:
		rep.violation("task %d was canceled before any worker claimed it, yet its handler ran in %s", task.ID, procNames(rs))
	case task.StartedAt.IsZero():
		c.neverClaimed++
	case len(rs) == 0:
		c.claimedNoRun++
	}
	for _, r := range rs {
		resumed := r.proc.resumedAfter(call.at, end(r))
		switch {
		case r.end == 0 && r.proc.killedAt != 0:
			c.dead++
		case resumed != 0:
			// Paused: once it goes on, the handler must stop soon (the
			// cancel, or the worker finding itself declared lost).
			if r.end-resumed > int64(faultCancelBound) {
				rep.violation("task %d was canceled at %s while %s was paused, but its handler ran on for %v after it went on",
					task.ID, calledAt, r.proc.name, time.Duration(r.end-resumed).Round(time.Millisecond))
			}
			c.paused++
		case r.canceled != 0 && r.start >= call.at:
			c.beforeStart++
			c.beforeStartMax = max(c.beforeStartMax, time.Duration(r.canceled-r.start))
		case r.canceled != 0:
			c.latency = append(c.latency, time.Duration(r.canceled-call.at))
		case r.end != 0 && r.end <= call.at:
			c.endedBefore++
		case end(r)-call.at <= int64(faultCancelBound):
			c.raced++
		default:
			rep.violation("task %d was canceled at %s (%s), but its handler in %s ran on for %v without seeing it",
				task.ID, calledAt, cancelPhases[call.phase], r.proc.name, time.Duration(end(r)-call.at).Round(time.Millisecond))
		}
	}
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
		canceled          int // ms, 0: the handler saw no cancel
	}
	checkAll := func(tasks []*tasking.Task, want int, runs []run, facts faultFacts) faultReport {
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
			if r.canceled != 0 {
				hr.canceled = ns(r.canceled)
			}
			p.runs = append(p.runs, hr)
		}
		return checkFaultRun(tasks, want, list, facts)
	}
	check := func(tasks []*tasking.Task, runs []run) faultReport {
		return checkAll(tasks, len(tasks), runs, faultFacts{})
	}

	t.Run("clean", func(t *testing.T) {
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateCompleted, "", 0, 20, x, nil),
			task(2, 1, tasking.StateCompleted, "", 21, 40, x, nil),
		}, []run{{1, 1, 1, 19, 0, 0, 0, 0}, {2, 2, 22, 39, 1, 0, 0, 0}})
		require.False(t, rep.failed(), rep.problems)
	})
	t.Run("overlap", func(t *testing.T) {
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateCompleted, "", 0, 20, x, nil),
			task(2, 1, tasking.StateCompleted, "", 21, 40, nil, x),
		}, []run{{1, 1, 1, 30, 0, 0, 0, 0}, {2, 2, 22, 39, 1, 0, 0, 0}})
		require.True(t, rep.failed())
		require.Contains(t, strings.Join(rep.problems, "\n"), "P1")
	})
	t.Run("order", func(t *testing.T) {
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateCompleted, "", 30, 50, x, nil),
			task(2, 1, tasking.StateCompleted, "", 0, 20, x, nil),
		}, []run{{1, 2, 31, 49, 0, 0, 0, 0}, {2, 1, 1, 19, 1, 0, 0, 0}})
		require.Contains(t, strings.Join(rep.problems, "\n"), "P2")
		require.Contains(t, strings.Join(rep.problems, "\n"), "fence")
	})
	t.Run("twice", func(t *testing.T) {
		rep := check([]*tasking.Task{task(1, 0, tasking.StateCompleted, "", 0, 20, x, nil)},
			[]run{{1, 1, 1, 5, 0, 0, 0, 0}, {1, 2, 6, 19, 1, 0, 0, 0}})
		require.Equal(t, 1, rep.duplicates)
	})
	t.Run("lost", func(t *testing.T) {
		rep := checkAll([]*tasking.Task{
			task(1, 0, tasking.StateRunning, "", 0, 0, x, nil),
			task(3, 2, tasking.StateCompleted, "", 0, 10, nil, nil),
		}, 3, []run{{1, 1, 1, -1, 0, 0, 0, 0}}, faultFacts{})
		require.Equal(t, 3, rep.lost, rep.problems)       // still running, dispatch 1 missing, completed without a run
		require.Equal(t, 1, rep.violations, rep.problems) // a handler that never ended in a live process
	})
	t.Run("killed_then_next", func(t *testing.T) {
		// Task 1's process is killed at 10 ms; cleanup fails it at 1000 ms;
		// task 2 runs after that: fine.
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateFailed, "worker lost", 0, 1000, x, nil),
			task(2, 1, tasking.StateCompleted, "", 1001, 1020, x, nil),
		}, []run{{1, 1, 1, -1, 0, 10, 0, 0}, {2, 2, 1002, 1019, 1, 0, 0, 0}})
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
		}, []run{{1, 1, 1, 2010, 0, 0, 5, 0}, {2, 2, 1600, 1690, 1, 0, 0, 0}})
		require.False(t, rep.failed(), rep.problems)
		require.Len(t, rep.excused, 1)
	})
	t.Run("stall", func(t *testing.T) {
		// Task 2 is runnable from 20 ms (task 1 final) but claimed 5 s later.
		tasks := []*tasking.Task{
			task(1, 0, tasking.StateCompleted, "", 0, 20, x, nil),
			task(2, 1, tasking.StateCompleted, "", 5020, 5040, x, nil),
		}
		runs := []run{{1, 1, 1, 19, 0, 0, 0, 0}, {2, 2, 5021, 5039, 1, 0, 0, 0}}
		rep := check(tasks, runs)
		require.Equal(t, 1, rep.violations, rep.problems)
		require.Contains(t, rep.problems[0], "P6")
		// Not when the database was down for most of that time.
		rep = checkAll(tasks, 2, runs, faultFacts{outages: [][2]time.Time{{at(100), at(4500)}}})
		require.False(t, rep.failed(), rep.problems)
	})
	t.Run("unexplained_failure", func(t *testing.T) {
		rep := check([]*tasking.Task{task(1, 0, tasking.StateFailed, "boom", 0, 10, nil, nil)},
			[]run{{1, 0, 1, 9, 0, 0, 0, 0}})
		require.Equal(t, 1, rep.violations, rep.problems)
	})
	t.Run("paused_overlap_fences_reversed", func(t *testing.T) {
		// As paused_overlap_excused, but the later handler got the smaller
		// fencing token: a fenced side effect could not refuse the earlier.
		rep := check([]*tasking.Task{
			task(1, 0, tasking.StateFailed, "worker lost", 0, 1500, x, nil),
			task(2, 1, tasking.StateCompleted, "", 1550, 1700, x, nil),
		}, []run{{1, 5, 1, 2010, 0, 0, 5, 0}, {2, 4, 1600, 1690, 1, 0, 0, 0}})
		require.Empty(t, rep.excused)
		require.Contains(t, strings.Join(rep.problems, "\n"), "not the smaller")
	})
	t.Run("lock_lost_overlap", func(t *testing.T) {
		// Redis is flushed at 100 ms; task 2 is granted its name and starts
		// at 150 ms while task 1's handler runs until its worker's renewal
		// finds the grant gone at 300 ms and fails it "lock lost".
		tasks := []*tasking.Task{
			task(1, 0, tasking.StateFailed, "lock lost: redis no longer holds the grant", 0, 310, x, nil),
			task(2, 1, tasking.StateCompleted, "", 140, 400, x, nil),
		}
		flush := faultFacts{lockLoss: [][2]int64{{ns(100), ns(101)}}}
		rep := checkAll(tasks, 2, []run{{1, 1, 1, 300, 0, 0, 0, 0}, {2, 2, 150, 390, 1, 0, 0, 0}}, flush)
		require.Len(t, rep.excused, 1, rep.problems)
		require.Equal(t, 1, rep.lockLost)
		require.Equal(t, 1, rep.violations, rep.problems) // P2: the database let task 2 be claimed first
		require.Contains(t, rep.problems[0], "P2")
		// Not without the flush, nor with the fences the wrong way round.
		rep = checkAll(tasks, 2, []run{{1, 1, 1, 300, 0, 0, 0, 0}, {2, 2, 150, 390, 1, 0, 0, 0}}, faultFacts{})
		require.Empty(t, rep.excused)
		require.Contains(t, strings.Join(rep.problems, "\n"), "P1: conflicting handlers overlapped: ")
		rep = checkAll(tasks, 2, []run{{1, 3, 1, 300, 0, 0, 0, 0}, {2, 2, 150, 390, 1, 0, 0, 0}}, flush)
		require.Empty(t, rep.excused)
		require.Contains(t, strings.Join(rep.problems, "\n"), "not the smaller")
	})
	t.Run("lock_lost_unnoticed", func(t *testing.T) {
		// Redis is flushed at 100 ms while task 1's handler holds a grant;
		// the handler runs on until 1500 ms and the task completes.
		flush := faultFacts{lockLoss: [][2]int64{{ns(100), ns(101)}}}
		tasks := []*tasking.Task{task(1, 0, tasking.StateCompleted, "", 0, 1510, x, nil)}
		rep := checkAll(tasks, 1, []run{{1, 1, 1, 1500, 0, 0, 0, 0}}, flush)
		require.Contains(t, strings.Join(rep.problems, "\n"), "Redis lost its grant")
		// Fine if the task failed "lock lost", or ended soon after the flush.
		rep = checkAll([]*tasking.Task{task(1, 0, tasking.StateFailed, "lock lost", 0, 1510, x, nil)}, 1,
			[]run{{1, 1, 1, 1500, 0, 0, 0, 0}}, flush)
		require.False(t, rep.failed(), rep.problems)
		rep = checkAll([]*tasking.Task{task(1, 0, tasking.StateCompleted, "", 0, 310, x, nil)}, 1,
			[]run{{1, 1, 1, 300, 0, 0, 0, 0}}, flush)
		require.False(t, rep.failed(), rep.problems)
		// A "lock lost" nowhere near a loss of Redis data is a fault of its own.
		rep = checkAll([]*tasking.Task{task(1, 0, tasking.StateFailed, "lock lost", 0, 5010, x, nil)}, 1,
			[]run{{1, 1, 4000, 5000, 0, 0, 0, 0}}, flush)
		require.Contains(t, strings.Join(rep.problems, "\n"), "did not run while Redis lost grants")
	})
	t.Run("cancel_paused", func(t *testing.T) {
		// Task 1's process is paused from 20 ms to 2020 ms; the test cancels
		// the task at 30 ms and cleanup ends it canceled at 1500 ms. Its
		// handler must stop soon after the process goes on.
		tasks := []*tasking.Task{task(1, 0, tasking.StateCanceled, "", 10, 1500, x, nil)}
		calls := map[int64]*cancelCall{1: {phase: cancelPaused, at: ns(30)}}
		rep := checkAll(tasks, 1, []run{{1, 1, 11, 2030, 0, 0, 20, 0}}, faultFacts{cancels: calls})
		require.False(t, rep.failed(), rep.problems)
		require.Equal(t, 1, rep.cancels.paused)
		require.Empty(t, rep.cancels.latency) // the pause is not cancel latency
		rep = checkAll(tasks, 1, []run{{1, 1, 11, 4000, 0, 0, 20, 0}}, faultFacts{cancels: calls})
		require.Contains(t, strings.Join(rep.problems, "\n"), "after it went on")
	})
	t.Run("started_after_final", func(t *testing.T) {
		rep := check([]*tasking.Task{task(1, 0, tasking.StateFailed, "worker lost", 0, 100, nil, nil)},
			[]run{{1, 0, 150, 160, 0, 0, 0, 0}})
		require.Contains(t, strings.Join(rep.problems, "\n"), "after the task was final")
		// Unless its process was paused in between.
		rep = check([]*tasking.Task{task(1, 0, tasking.StateFailed, "worker lost", 0, 100, nil, nil)},
			[]run{{1, 0, 2150, 2160, 0, 0, 50, 0}})
		require.False(t, rep.failed(), rep.problems)
	})
	t.Run("cancels", func(t *testing.T) {
		mkTasks := func() []*tasking.Task {
			never := task(1, 0, tasking.StateCanceled, "", 0, 5, x, nil)
			never.StartedAt = time.Time{}
			return []*tasking.Task{
				never, // canceled while waiting
				task(2, 1, tasking.StateCanceled, "canceled", 10, 60, nil, nil),   // running: saw it 3 ms after the call at 40 ms
				task(3, 2, tasking.StateCanceled, "canceled", 10, 60, nil, nil),   // claimed: canceled before its handler started
				task(4, 3, tasking.StateCompleted, "", 10, 60, nil, nil),          // finishing: Cancel found it final
				task(5, 4, tasking.StateCanceled, "canceled", 10, 60, nil, nil),   // finishing: handler had ended
				task(6, 5, tasking.StateCompleted, "", 10, 60, nil, nil),          // never canceled
				task(7, 6, tasking.StateCanceled, "canceled", 10, 1200, nil, nil), // killed worker, cleanup canceled it
			}
		}
		tasks := mkTasks()
		runs := []run{
			{2, 0, 11, 44, 0, 0, 0, 43},
			{3, 0, 12, 13, 0, 0, 0, 12},
			{4, 0, 11, 50, 0, 0, 0, 0},
			{5, 0, 11, 50, 0, 0, 0, 0},
			{6, 0, 11, 50, 0, 0, 0, 0},
			{7, 0, 11, -1, 1, 30, 0, 0},
		}
		calls := map[int64]*cancelCall{
			1: {phase: cancelDispatched, at: ns(2)},
			2: {phase: cancelRunning, at: ns(40)},
			3: {phase: cancelDispatched, at: ns(11)},
			4: {phase: cancelFinished, at: ns(55), err: fmt.Errorf("%w: task 4 is completed", tasking.ErrTaskFinal)},
			5: {phase: cancelFinished, at: ns(51)},
			7: {phase: cancelKilled, at: ns(31)},
		}
		rep := checkAll(tasks, len(tasks), runs, faultFacts{cancels: calls})
		require.False(t, rep.failed(), rep.problems)
		c := rep.cancels
		require.Equal(t, []time.Duration{3 * time.Millisecond}, c.latency)
		require.Equal(t, []int{1, 1, 1, 1}, []int{c.neverClaimed, c.beforeStart, c.endedBefore, c.dead})
		require.Equal(t, 1, c.final[cancelFinished])
		require.Contains(t, rep.cancelSummary(), "p99 3ms")

		bad := func(mutate func(tasks []*tasking.Task, runs []run, calls map[int64]*cancelCall) []run, want string) {
			t.Helper()
			ts := mkTasks()
			cs := make(map[int64]*cancelCall, len(calls))
			for id, call := range calls {
				c := *call
				cs[id] = &c
			}
			rs := mutate(ts, slices.Clone(runs), cs)
			rep := checkAll(ts, len(ts), rs, faultFacts{cancels: cs})
			require.True(t, rep.failed(), want)
			require.Contains(t, strings.Join(rep.problems, "\n"), want)
		}
		bad(func(ts []*tasking.Task, rs []run, _ map[int64]*cancelCall) []run {
			return append(rs, run{1, 1, 3, 4, 0, 0, 0, 0}) // the waiting task ran anyway
		}, "before any worker claimed it")
		bad(func(ts []*tasking.Task, rs []run, _ map[int64]*cancelCall) []run {
			ts[5].State = tasking.StateCanceled // nobody canceled it
			return rs
		}, "which no fault explains")
		bad(func(ts []*tasking.Task, rs []run, cs map[int64]*cancelCall) []run {
			cs[4].err = nil // Cancel said yes, yet it completed
			return rs
		}, "returned nil, but the task ended completed")
		bad(func(ts []*tasking.Task, rs []run, _ map[int64]*cancelCall) []run {
			rs[0].canceled, rs[0].end = 0, 1500 // ran on for 1.46 s
			return rs
		}, "without seeing it")
		bad(func(ts []*tasking.Task, rs []run, _ map[int64]*cancelCall) []run {
			rs[4].canceled = 20 // a cancel nobody sent
			return rs
		}, "saw a cancel, but the test canceled no such task")
	})
}
