package tasking

import (
	"cmp"
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// Chains. A line of short tasks on one resource drains one hand-off at a
// time: the task at its head finishes, a step writes that and makes the
// next one ready and claims it, and the locker releases the one and grants
// the other. The step's statement and commit were most of a hand-off (a
// hot line in one process: 1.3 ms of 1.5), and nothing else could overlap
// it: the line is one task after another.
//
// So a step that claims a task naming one resource, exclusively, may also
// claim the tasks queued right behind it on that line that name only that
// resource, exclusively (the step function stops at the first that does
// not, so none is passed over). Each of them is blocked by the one before
// it alone, so it becomes ready exactly when that one finishes, and
// nothing dispatched later can run before it. They wait among the tasks
// claimed ahead (ahead.go), each linked to the one before it, hold no
// grant and take no slot. When a handler returns with a final state, its
// successor takes its slot without a step (handOff): one small statement
// writes the final state and hands the line on, one locker call beside it
// moves the grant, and the successor starts once both are done, so after
// its predecessor is final (P2). A successor does not start when the task
// before it is to run again (retrying keeps its place at the head of the
// line), when its lock is refused, at shutdown, or when it waited past the
// deadline of every task claimed ahead: it goes back to waiting, with its
// place in line, and so do the tasks behind it. docs/design.md §6 has the
// argument.
//
// Chains are claimed only while handlers return faster than a step takes,
// like claiming ahead, and no longer than the handlers and hand-offs
// before a task take in half of aheadWait; WithClaimAhead(0) turns them
// off too.

// chainMax bounds the tasks one step chains, all lines together.
const chainMax = 32

// chainRoom is how many tasks a step may claim behind the others on their
// lines. r.mu is held.
func (r *run) chainRoom() int {
	if r.w.cfg.aheadSet && r.w.cfg.ahead == 0 || r.draining ||
		r.handlerAvg <= 0 || r.stepAvg <= 0 || r.handlerAvg >= r.stepAvg {
		return 0
	}
	// Each task of a chain waits for the handlers and hand-offs before it,
	// which take about a step each until measured. A hand-off does less
	// than a step, so a step bounds it: only passes update passAvg, and a
	// first pass slowed by a cold start (37 ms against 1.2 ms steps, seen
	// in the benchmark) would otherwise leave no room for the chains that
	// would correct it, for the rest of the worker's life.
	per := r.handlerAvg + min(cmp.Or(r.passAvg, r.stepAvg), r.stepAvg)
	return int(min(int64(chainMax), int64(r.w.cfg.aheadWait/2)/int64(per)))
}

// chainLinks returns, for each task of chained (in id order), the task it
// follows on its line: the last one before it, among heads and chained,
// that names its resource. heads are the claimed tasks that start (or wait
// for a slot); a chained task whose head is not among them (its lock was
// refused) follows nothing, and is returned in orphans.
func chainLinks(heads, chained []*Task) (after map[int64]int64, orphans []*Task) {
	last := make(map[string]int64)
	for _, t := range heads {
		if len(t.Exclusive) == 1 && len(t.Shared) == 0 {
			last[t.Exclusive[0]] = max(last[t.Exclusive[0]], t.ID)
		}
	}
	after = make(map[int64]int64, len(chained))
	for _, t := range chained {
		res := t.Exclusive[0]
		if p, ok := last[res]; ok && p < t.ID {
			after[t.ID] = p
			last[res] = t.ID
		} else {
			orphans = append(orphans, t)
		}
	}
	return after, orphans
}

// successor takes the task that waits for t on its line out of the tasks
// claimed ahead, for t's slot; ok is false when none waits. One that may
// not start (t runs again, shutdown, its deadline) is left to giveBack,
// marked to be put back, with those behind it. r.mu is held.
func (r *run) successor(t int64, final bool, now time.Time) (q aheadTask, ok bool) {
	for i := range r.ahead {
		if r.ahead[i].after != t {
			continue
		}
		if !final || r.draining || r.ahead[i].due(now) {
			r.ahead[i].back = true
			return aheadTask{}, false
		}
		q = r.ahead[i]
		r.ahead = append(r.ahead[:i], r.ahead[i+1:]...)
		r.launching++ // t's slot, until start
		return q, true
	}
	return aheadTask{}, false
}

// handOff hands the line of from (its handler returned, with outcome o,
// a final state) to q, the task claimed behind it, and starts q. One
// statement writes from's final state, takes it off the line and frees the
// line for q (the pass function of the schema); beside it, one locker call
// releases from's grant and acquires q's. q starts once both are done, so
// after from's final state is committed (P2). written says that o needs
// no step any more (it was written, or from was no longer this worker's).
// q goes back to waiting (with the tasks behind it) when it cannot start.
func (r *run) handOff(from *Task, o outcome, q aheadTask) (written bool) {
	ctx, cancel := context.WithTimeout(context.Background(), stepTimeout)
	defer cancel()
	owners := []Owner{{r.id, from.ID}}
	req := []LockRequest{{Owner: Owner{r.id, q.task.ID}, Exclusive: q.task.Exclusive, Shared: q.task.Shared}}
	// The handler has returned: nothing runs under from's grant any more,
	// and q's grant is of no use to anyone else (the line is q's next).
	var fences []int64
	var lockErr error
	locked := make(chan struct{})
	go func() {
		defer close(locked)
		if ra, ok := r.lock.(releaseAcquirer); ok {
			fences, lockErr = ra.releaseThenAcquire(ctx, owners, req)
		} else if lockErr = r.lock.Release(ctx, owners); lockErr == nil {
			fences, lockErr = r.lock.TryAcquire(ctx, req)
		}
	}()
	var result, progress *string
	if res := from.takeResult(); res != nil {
		s := string(res)
		result = &s
	}
	if o.progress != nil {
		s := string(o.progress)
		progress = &s
	}
	var next *string
	conn := r.lanes[len(r.lanes)-1] // the PostgreSQL locker's session is on lanes[0]
	sent := time.Now()
	err := conn.use(ctx, func(c *pgx.Conn) error {
		return c.QueryRow(ctx, r.c.q.pass, r.id, from.ID, int32(from.Epoch), string(o.state), o.err, result, progress,
			q.task.ID, int32(q.task.Epoch)).Scan(&next)
	})
	<-locked
	r.c.met.grants(ctx, -1)
	granted := lockErr == nil && fences[0] > 0
	switch {
	case lockErr != nil:
		r.lockerFailed()
		r.log.Warn("tasking: hand a resource on to the next task in line", "task", q.task.ID, "err", lockErr)
		if rerr := r.lock.Release(ctx, append(owners, req[0].Owner)); rerr != nil {
			r.log.Warn("tasking: release after failed acquire", "err", rerr)
		}
	case !granted:
		r.c.met.refused(ctx, 1)
	}
	started := false
	defer func() {
		if !started {
			if granted {
				if rerr := r.lock.Release(ctx, []Owner{req[0].Owner}); rerr != nil {
					r.log.Warn("tasking: release locks", "err", rerr)
				}
			}
			r.mu.Lock()
			r.launching--
			q.back, q.lost, q.after = true, true, 0 // nothing held any more
			r.ahead = append(r.ahead, q)
			r.mu.Unlock()
			r.signal() // a step loop puts it back
		}
	}()
	if err != nil {
		// Whether it was written is unknown: the step writes it (again),
		// guarded by owner and epoch.
		r.log.Warn("tasking: hand a line on to the next task", "task", from.ID, "err", err)
		return false
	}
	r.wrote(ctx, []outcome{o}, map[int64]bool{from.ID: next != nil})
	if next == nil {
		return true
	}
	r.mu.Lock()
	draining := r.draining
	r.mu.Unlock()
	if *next == "" || !granted || draining {
		// q is no longer this worker's (the worker was declared lost), its
		// grant was refused, or shutdown began meanwhile (no handler
		// starts once the wait for them has begun): q starts nowhere here.
		return true
	}
	r.c.met.grants(ctx, 1)
	q.task.Fence = fences[0]
	r.passTook(time.Since(sent))
	started = true
	r.start(q.task, q.batch)
	return true
}

// passTook feeds the average hand-off of a chain (chainRoom).
func (r *run) passTook(d time.Duration) {
	r.mu.Lock()
	ewma(&r.passAvg, max(d, 1))
	r.mu.Unlock()
}
