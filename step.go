package tasking

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// The step loop is the worker's engine. One step is one statement on the
// worker's connection (the step function of the schema, see queue.go):
// it writes the final states of the tasks whose handlers returned, takes
// them off their resources' waiting lines and hands those resources to the
// next tasks in line, and claims up to the free slots of ready tasks, oldest
// first. The locker is asked after it, in one call: it releases the grants
// of the finished tasks and acquires those of the claimed ones (a locker
// without such a call releases while the step runs and acquires after it).
// Work per started task is a share of
// one statement and of those calls, however many workers there are and
// however long the lines behind a busy resource; docs/design.md says why
// this keeps the ordering promise.

const (
	stepBatch   = 512              // outcomes written by one step at most
	stepTimeout = 30 * time.Second // bound on one step's statements
	drainGiveUp = 30 * time.Second // at shutdown, stop retrying final states after this
	// A wake-up within coalesceWindow of a step that started fewer than
	// smallStep tasks waits for the window to end: tasks trickling in one
	// at a time then cost one step for several, not one each.
	coalesceWindow = 2 * time.Millisecond
	smallStep      = 8
	// How soon to look again when a claimed task's locks were refused (a
	// dead worker's grant not yet freed) or a handoff was left for later.
	retrySoon = 5 * time.Millisecond
)

// loop runs steps on conn until ctx is done and then, with no more claims,
// until every outcome is written. A worker runs one loop per connection
// (WithConnections); they share the outcomes, the wake-ups and the slots.
func (r *run) loop(ctx context.Context, conn *workerConn) {
	poll := time.NewTimer(r.pollEvery())
	defer poll.Stop()
	var retry <-chan time.Time
	var due <-chan time.Time // the earliest retry or scheduled task is due
	var dueAt time.Time
	var pending []outcome
	results := r.results
	done := ctx.Done()
	stopping := false
	woken := true // look once at start
	failing := false
	var failingSince time.Time
	backoff := 10 * time.Millisecond
	var lastEnd time.Time
	lastStarted := 0
	for {
		if !stopping && ctx.Err() != nil {
			// Shutdown began while this loop was busy: claim nothing more
			// (a task claimed now would start under a canceled context).
			stopping, done = true, nil
		}
		if r.aheadDue() || stopping && results == nil && len(pending) == 0 {
			pending = append(pending, r.giveBack(ctx, conn, stopping && results == nil)...)
		}
		if stopping && results == nil && len(pending) == 0 {
			return
		}
		free := 0
		if !stopping {
			free = r.freeSlots()
		}
		// Wait for something to do, or, after a failed step, for the
		// backoff to pass (the outcomes stay pending meanwhile).
		if failing && retry != nil || len(pending) == 0 && (free <= 0 || !woken) {
			select {
			case <-done:
				stopping, done = true, nil
			case o, ok := <-results:
				if !ok {
					results = nil
				} else {
					pending = append(pending, o)
				}
			case <-r.wake:
				woken = true
				r.c.met.wakeup(false)
				// Right after a small step, wait out a short window so that
				// the next step takes everything that arrived meanwhile. An
				// isolated dispatch, or a busy backlog, is not delayed.
				if since := time.Since(lastEnd); lastStarted < smallStep && since < coalesceWindow {
					sleepCtx(ctx, coalesceWindow-since)
				}
			case <-poll.C:
				poll.Reset(r.pollEvery())
				woken = true
				r.c.met.wakeup(true)
			case <-retry:
				retry, woken = nil, true
			case <-due:
				due, dueAt, woken = nil, time.Time{}, true
			}
			continue
		}
	drain:
		for len(pending) < stepBatch && results != nil {
			select {
			case o, ok := <-results:
				if !ok {
					results = nil
					break drain
				}
				pending = append(pending, o)
			default:
				break drain
			}
		}
		if !stopping && !failing && len(pending) > 0 {
			pending, results = r.awaitSiblings(pending, results)
		}
		claim := 0
		if !stopping {
			claim, free = r.reserve() // handlers may have returned meanwhile
		}
		// A step runs to its end even when shutdown begins meanwhile: a
		// statement cut off mid-flight would close the worker's connection
		// (and lose every grant on it) or leave a claim's outcome unknown.
		// A wake-up that arrives during the step may be taken by another
		// lane that has no free slot: this lane looks again if any came.
		seq := r.wakes.Load()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stepTimeout)
		started, again, next, err := r.step(sctx, conn, pending, claim, free)
		cancel()
		r.unreserve(claim)
		lastEnd, lastStarted = time.Now(), started
		if err != nil {
			if !failing {
				r.log.Error("tasking: worker step failed; retrying with backoff", "err", err)
				failing, failingSince = true, time.Now()
			}
			if stopping && time.Since(failingSince) > drainGiveUp {
				r.log.Error("tasking: giving up on final states at shutdown; cleanup will settle the tasks",
					"tasks", len(pending), "err", err)
				r.unwritten.Add(int64(len(pending)))
				return
			}
			retry = time.After(jitter(backoff))
			backoff = min(backoff*2, 5*time.Second)
			woken = false
			continue
		}
		if failing {
			r.log.Info("tasking: worker steps recovered")
			failing, backoff = false, 10*time.Millisecond
		}
		pending = pending[:0]
		woken = r.wakes.Load() != seq
		if again && retry == nil {
			retry = time.After(retrySoon)
		}
		if !next.IsZero() && (dueAt.IsZero() || next.Before(dueAt)) {
			// Wake up when it is due (the step makes it ready), not at the
			// next poll.
			dueAt, due = next, time.After(time.Until(next)+time.Millisecond)
		}
	}
}

// siblingWait bounds how long a step waits for the siblings of the tasks it
// is to finish: the handlers one step started tend to return together, and
// a step for all of them is one statement where a step each is several
// (16 processes × 5 slots, noop tasks: 0.40 statements per task without it,
// 0.24 with it). A millisecond made a line on one resource hand over about
// a fifth slower (a head task waited for the tail tasks claimed with it);
// 250 µs did not, measurably.
const siblingWait = 250 * time.Microsecond

// awaitSiblings collects more outcomes while a handler that was started by
// the same step as one of pending still runs, for at most siblingWait. A
// handler is no longer running once it returned, whichever lane takes its
// outcome.
func (r *run) awaitSiblings(pending []outcome, results chan outcome) ([]outcome, chan outcome) {
	var timer *time.Timer
	for r.siblingsRunning(pending) {
		if timer == nil {
			timer = time.NewTimer(r.w.cfg.siblingWait)
			defer timer.Stop()
		}
		select {
		case o, ok := <-results:
			if !ok {
				return pending, nil
			}
			pending = append(pending, o)
		case <-timer.C:
			return pending, results
		}
	}
	return pending, results
}

func (r *run) siblingsRunning(pending []outcome) bool {
	var batches []uint64 // few: the steps whose handlers returned lately
	for i := range pending {
		if !slices.Contains(batches, pending[i].batch) {
			batches = append(batches, pending[i].batch)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.active {
		if !a.abandoned && slices.Contains(batches, a.batch) {
			return true
		}
	}
	for i := range r.ahead { // claimed ahead: they start as handlers return
		if slices.Contains(batches, r.ahead[i].batch) {
			return true
		}
	}
	return false
}

// freeSlots is how many slots no handler, no task claimed ahead and no
// step in flight takes.
func (r *run) freeSlots() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.freeLocked()
}

func (r *run) freeLocked() int {
	return r.w.cfg.slots - len(r.active) - r.launching - r.aheadSlots() - r.reserved
}

// reserve takes the free slots, and the room to claim ahead (ahead.go), for
// a step, so that another lane's step does not fill them too; unreserve
// gives them back once the step has admitted its tasks (which then count
// as active or claimed ahead). claim is what the step may claim, free the
// part of it that free slots make up.
func (r *run) reserve() (claim, free int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.draining {
		return 0, 0
	}
	free = max(r.freeLocked(), 0)
	claim = max(r.freeLocked()+r.aheadRoom(), 0)
	r.reserved += claim
	return claim, free
}

func (r *run) unreserve(n int) {
	r.mu.Lock()
	r.reserved -= n
	r.mu.Unlock()
}

// step writes the outcomes, claims up to claim ready tasks, acquires their
// locks and starts them, as many as there are free slots (the others wait
// for one, see ahead.go). free is the part of claim that free slots make
// up. again: something is worth another look soon (refused locks, handoffs
// left for later). next: when the earliest retry or scheduled task is due,
// zero for none.
func (r *run) step(ctx context.Context, conn *workerConn, outs []outcome, claim, free int) (started int, again bool, next time.Time, err error) {
	// The finished tasks' grants go as early as the locker allows: the
	// step makes the next in line ready, and it should find its resources
	// free. The handlers have returned, so nothing is done under these
	// grants any more.
	if r.w.cfg.onStep != nil && len(outs) > 0 {
		r.w.cfg.onStep(len(outs))
	}
	var owners []Owner
	for i := range outs {
		if outs[i].owner {
			owners = append(owners, Owner{r.id, outs[i].task.ID})
			outs[i].owner = false // a failed release is not retried: leases run out, a broken session drops all
		}
	}
	release := func(owners []Owner) {
		if err := r.lock.Release(ctx, owners); err != nil {
			r.log.Warn("tasking: release locks", "err", err)
		}
		r.c.met.grants(ctx, -len(owners))
	}
	ra, merge := r.lock.(releaseAcquirer)
	var released chan struct{}
	var deferred []Owner // released with the claims' acquire, after the step
	switch {
	case len(owners) == 0:
	case merge:
		// The PostgreSQL and Redis lockers release with the acquire after
		// the step, in one statement or script call, rather than in a
		// round trip of its own (before the step, or beside it). Until
		// then another worker (or another lane of this one,
		// WithConnections) that claims a task this step frees may be
		// refused, and claims it again shortly; this step's own claims
		// (the usual case: a step claims the oldest ready tasks, which
		// include those it just freed) are not. The release's round trip
		// is off the hand-off from one task to the next either way.
		deferred = owners
	case releaseInline(r.lock):
		release(owners)
	default:
		// Any other locker releases while the step runs. The release
		// is started first and is one round trip against the step's
		// statement and commit, so it has almost always landed when
		// the step commits what it frees; if not, a worker that
		// claimed such a task is refused and claims it again shortly.
		released = make(chan struct{})
		go func() {
			defer close(released)
			release(owners)
		}()
	}

	chain := 0
	if claim > 0 {
		r.mu.Lock()
		chain = r.chainRoom()
		r.mu.Unlock()
	}
	sent := time.Now()
	res, err := r.c.step(ctx, conn, r.id, outs, r.names, r.policies, claim, chain, r.w.cfg.ttl*2/3, r.lockerUp(ctx))
	if released != nil {
		// Before anything is acquired: a task this step claimed may need
		// what the finished ones held.
		<-released
	}
	if err != nil {
		if len(deferred) > 0 {
			release(deferred)
		}
		return 0, false, time.Time{}, err
	}
	if r.w.cfg.afterClaim != nil && len(res.claimed) > 0 {
		r.w.cfg.afterClaim()
	}
	next = res.nextRetry
	r.c.met.cycle(ctx)
	r.wrote(ctx, outs, res.done)
	if res.left > 0 {
		r.wakeOthers(false)
	}
	again = res.handoffs

	// Locks for the claimed tasks that name resources, in one call.
	var reqs []LockRequest
	var need []*Task
	for _, t := range res.claimed {
		if len(t.Exclusive)+len(t.Shared) > 0 {
			reqs = append(reqs, LockRequest{Owner: Owner{r.id, t.ID}, Exclusive: t.Exclusive, Shared: t.Shared})
			need = append(need, t)
		}
	}
	var refused []*Task
	var lockErr error
	if len(reqs) == 0 && len(deferred) > 0 {
		release(deferred)
	}
	if len(reqs) > 0 {
		var fences []int64
		var err error
		if len(deferred) > 0 {
			// A failure is reported below with the acquire's, and the
			// released grants are released again there.
			fences, err = ra.releaseThenAcquire(ctx, deferred, reqs)
			r.c.met.grants(ctx, -len(deferred))
		} else {
			fences, err = r.lock.TryAcquire(ctx, reqs)
		}
		if err != nil {
			r.lockerFailed()
			// The locker is out of reach: what names resources goes back in
			// line; tasks without resources need no grant. The finished
			// tasks' grants are released again too (Redis keeps them
			// releasable; the PostgreSQL locker has forgotten them).
			if rerr := r.lock.Release(ctx, append(ownersOf(reqs), deferred...)); rerr != nil {
				r.log.Warn("tasking: release after failed acquire", "err", rerr)
			}
			refused, lockErr = need, fmt.Errorf("acquire locks: %w", err)
		} else {
			for i, t := range need {
				if fences[i] > 0 {
					t.Fence = fences[i]
				} else {
					refused = append(refused, t)
				}
			}
			r.c.met.grants(ctx, len(need)-len(refused))
			r.c.met.refused(ctx, len(refused))
		}
	}
	late := time.Since(sent)
	if late <= r.w.cfg.ttl/3 {
		r.stepTook(late)
	}
	if late > r.w.cfg.ttl/3 && len(res.claimed) > 0 {
		// The step claimed with a heartbeat younger than two thirds of the
		// TTL, which leaves a third of it to start the tasks. This worker
		// was paused longer than that since (a stopped process, a
		// suspended VM): cleanup may have declared it lost and failed the
		// tasks, and a conflicting task may run already. Start none; put
		// them back (guarded by epoch: a failed task stays failed).
		r.log.Warn("tasking: claimed tasks not started: the worker was paused between claim and start",
			"pause", late.Round(time.Millisecond), "tasks", len(res.claimed))
		if len(reqs) > 0 && lockErr == nil {
			if err := r.lock.Release(ctx, ownersOf(reqs)); err != nil {
				r.log.Warn("tasking: release locks of tasks not started", "err", err)
			}
			r.c.met.grants(ctx, -(len(need) - len(refused)))
		}
		if err := r.unclaim(ctx, conn, slices.Concat(res.claimed, res.chained)); err != nil {
			r.log.Warn("tasking: put back tasks not started", "err", err)
		}
		return 0, true, next, lockErr
	}
	skip := make(map[int64]bool, len(refused))
	for _, t := range refused {
		skip[t.ID] = true
	}
	admit := make([]*Task, 0, len(res.claimed)-len(refused))
	for _, t := range res.claimed {
		if !skip[t.ID] {
			admit = append(admit, t)
		}
	}
	// Chained tasks behind a refused one go back with it.
	after, orphans := chainLinks(admit, res.chained)
	chained := res.chained
	if len(orphans) > 0 {
		chained = slices.DeleteFunc(slices.Clone(chained), func(t *Task) bool { return slices.Contains(orphans, t) })
	}
	if len(refused)+len(orphans) > 0 {
		// Refused: a grant of a worker that was declared lost, not freed yet
		// (it runs out with its lease or session). The tasks keep their
		// place in line and are claimed again shortly.
		if err := r.unclaim(ctx, conn, slices.Concat(refused, orphans)); err != nil {
			r.log.Warn("tasking: put back tasks whose locks were refused", "err", err)
		}
		again = true
	}
	if free > 0 {
		r.setHungry(len(res.claimed) < free)
	}
	r.readParents(ctx, conn, slices.Concat(admit, chained))
	r.admit(admit, chained, after, r.batches.Add(1), sent)
	return len(admit) + len(chained), again, next, lockErr
}

// wrote records that the final states of outs were written, those in done,
// or that their tasks were no longer this worker's to finish.
func (r *run) wrote(ctx context.Context, outs []outcome, done map[int64]bool) {
	if len(outs) == 0 {
		return
	}
	r.mu.Lock()
	for _, o := range outs {
		delete(r.unsent, o.task.ID)
	}
	r.mu.Unlock()
	for _, o := range outs {
		if !done[o.task.ID] {
			r.log.Warn("tasking: task was no longer this worker's to finish", "task", o.task.ID)
		} else {
			r.c.met.finishedTask(ctx, o)
		}
	}
	r.c.waits.poke()
}

// A releaseAcquirer is a LockSession that can release grants and acquire
// others in one call (the PostgreSQL and Redis lockers), so that a step
// costs one locker round trip, not two.
type releaseAcquirer interface {
	releaseThenAcquire(ctx context.Context, owners []Owner, reqs []LockRequest) ([]int64, error)
}

// An inlineReleaser is a LockSession whose Release is not worth running
// beside the step: the memory locker's costs nothing to wait for.
type inlineReleaser interface {
	releaseInline()
}

func releaseInline(s LockSession) bool {
	_, ok := s.(inlineReleaser)
	return ok
}

// lockerFailed notes that the locker is out of reach: until a probe gets
// through, steps claim only tasks that need no locks, rather than claiming
// and putting back the others again and again.
func (r *run) lockerFailed() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.lockDownSince.IsZero() {
		r.lockDownSince = time.Now()
		r.lockProbeAt = time.Now()
	}
}

// lockerUp reports whether steps may claim tasks that need locks. While the
// locker is out of reach it probes it now and then (with a grant no task
// uses, released at once).
func (r *run) lockerUp(ctx context.Context) bool {
	r.mu.Lock()
	down, next := !r.lockDownSince.IsZero(), r.lockProbeAt
	r.mu.Unlock()
	if !down {
		return true
	}
	if time.Now().Before(next) {
		return false
	}
	probe := []LockRequest{{Owner: Owner{r.id, 0}, Exclusive: []string{"tasking/probe"}}}
	_, err := r.lock.TryAcquire(ctx, probe)
	if err == nil {
		err = r.lock.Release(ctx, ownersOf(probe))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		wait := min(2*time.Since(r.lockDownSince), 2*time.Second)
		r.lockProbeAt = time.Now().Add(jitter(max(wait, 20*time.Millisecond)))
		return false
	}
	r.lockDownSince = time.Time{}
	return true
}

// unclaim puts claimed tasks that will not run here back to waiting, guarded
// by owner and epoch. They keep their place: their entries never left the
// lines.
func (r *run) unclaim(ctx context.Context, conn *workerConn, ts []*Task) error {
	_, err := r.unclaimed(ctx, conn, ts)
	return err
}

// unclaimed is unclaim, and says which tasks it put back: not those that
// were canceled meanwhile, nor those no longer this worker's.
func (r *run) unclaimed(ctx context.Context, conn *workerConn, ts []*Task) (map[int64]bool, error) {
	ids, epochs := make([]int64, len(ts)), make([]int32, len(ts))
	for i, t := range ts {
		ids[i], epochs[i] = t.ID, int32(t.Epoch)
	}
	rows, err := conn.Query(ctx, r.c.q.unclaim, r.id, ids, epochs)
	if err != nil {
		return nil, err
	}
	back, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, err
	}
	put := make(map[int64]bool, len(back))
	for _, id := range back {
		put[id] = true
	}
	return put, nil
}

func ownersOf(reqs []LockRequest) []Owner {
	owners := make([]Owner, len(reqs))
	for i, q := range reqs {
		owners[i] = q.Owner
	}
	return owners
}
