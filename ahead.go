package tasking

import (
	"context"
	"time"
)

// Claiming ahead. A step costs a statement and a commit, and one locker
// call, whatever number of tasks it finishes and claims; a worker claims at
// most its free slots, so a worker with few slots shares that fixed cost
// among few tasks. A fleet of small workers (16 processes × 5 slots) spent
// a step per 4 tasks where one process of 80 slots spent one per 31, and
// ran mix at about a third of the big process's rate (docs/design.md §10).
//
// So while the worker's handlers return faster than a step takes, a step
// may claim up to WithClaimAhead tasks more than its free slots. They are
// claimed, locked and in state running like the others, and wait here in
// claim order: each handler that returns starts the next one at once,
// without a step, and the next step finishes the lot. A task waits here
// less than a step would have taken to claim it, and holds its grants
// meanwhile, which blocks nothing that its place in line did not already
// block: a conflicting task dispatched later is not ready before this one
// finishes.
//
// A task that has not started by its deadline (aheadWait after its step,
// or a third of the heartbeat TTL after the step was sent, the bound every
// claimed task starts by: see step) is put back to waiting, with its
// place in line, as is every waiting task at shutdown and one whose grants
// were lost.

const (
	// aheadTarget sets the default of WithClaimAhead: a worker claims
	// ahead so that a step can carry this many tasks (none from this many
	// slots up). Past about 30 tasks a step's fixed cost is a small share.
	aheadTarget = 32
	// aheadWait bounds how long a task claimed ahead waits for a slot
	// before it is put back: the handlers it waits for have turned out
	// slower than the worker measured.
	aheadWait = 50 * time.Millisecond
)

// aheadTask is a claimed task waiting for a slot.
type aheadTask struct {
	task     *Task
	batch    uint64    // the step that claimed it
	deadline time.Time // put back if not started by then
	back     bool      // put back now: shutdown, the worker was declared lost, or its grants were lost
	lost     bool      // its grants were lost: nothing to release
}

func (q *aheadTask) due(now time.Time) bool { return q.back || !now.Before(q.deadline) }

// aheadRoom is how many tasks beyond the free slots a step may claim now:
// none unless handlers return faster than a step takes, and no more than
// the slots run in a step's time (a task waits about ahead/slots handler
// runs), at most WithClaimAhead. r.mu is held.
func (r *run) aheadRoom() int {
	if r.w.cfg.ahead <= 0 || r.draining || r.handlerAvg <= 0 || r.stepAvg <= 0 || r.handlerAvg >= r.stepAvg {
		return 0
	}
	return int(min(int64(r.w.cfg.ahead), int64(r.w.cfg.slots)*int64(r.stepAvg)/int64(r.handlerAvg)))
}

// ewmaShift sets the weight of a new sample in the averages below: 1/8.
const ewmaShift = 3

// handlerTook and stepTook feed the averages that aheadRoom compares.
// r.mu is held.
func (r *run) handlerTook(d time.Duration) { r.handlerAvg += (d - r.handlerAvg) >> ewmaShift }

func (r *run) stepTook(d time.Duration) {
	r.mu.Lock()
	if r.stepAvg == 0 {
		r.stepAvg = d
	} else {
		r.stepAvg += (d - r.stepAvg) >> ewmaShift
	}
	r.mu.Unlock()
}

// admit queues the tasks a step claimed and starts as many as there are
// free slots, oldest first; the rest wait for handlers to return.
func (r *run) admit(ts []*Task, batch uint64, sent time.Time) {
	now := time.Now()
	deadline := now.Add(r.w.cfg.aheadWait)
	if paused := sent.Add(r.w.cfg.ttl / 3); paused.Before(deadline) {
		deadline = paused
	}
	r.mu.Lock()
	for _, t := range ts {
		r.ahead = append(r.ahead, aheadTask{task: t, batch: batch, deadline: deadline})
	}
	next := r.takeAhead(now)
	r.mu.Unlock()
	for _, q := range next {
		r.start(q.task, q.batch)
	}
}

// takeAhead takes waiting tasks, oldest first, for the slots no handler
// takes; each counts as launching until start makes it active. Tasks due to
// be put back stay for giveBack. r.mu is held.
func (r *run) takeAhead(now time.Time) []aheadTask {
	room := r.w.cfg.slots - len(r.active) - r.launching
	if room <= 0 || len(r.ahead) == 0 {
		return nil
	}
	var took []aheadTask
	keep := r.ahead[:0]
	for _, q := range r.ahead {
		if room > 0 && !q.due(now) {
			took = append(took, q)
			room--
			continue
		}
		keep = append(keep, q)
	}
	clear(r.ahead[len(keep):])
	r.ahead = keep
	r.launching += len(took)
	return took
}

// aheadDue reports whether a waiting task is due to be put back, and when
// the next one will be (zero: none waits).
func (r *run) aheadDue() (bool, time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	var next time.Time
	for i := range r.ahead {
		if r.ahead[i].due(now) {
			return true, time.Time{}
		}
		if next.IsZero() || r.ahead[i].deadline.Before(next) {
			next = r.ahead[i].deadline
		}
	}
	return false, next
}

// isAhead reports whether task id waits here. r.mu is held.
func (r *run) isAhead(id int64) bool {
	for i := range r.ahead {
		if r.ahead[i].task.ID == id {
			return true
		}
	}
	return false
}

// dropAhead marks the waiting tasks to be put back: all of them (shutdown,
// the worker was declared lost), or, with lost, those of owners, whose
// grants were lost. r.mu is held.
func (r *run) dropAhead(owners []Owner, lost bool) {
	for i := range r.ahead {
		if !lost {
			r.ahead[i].back = true
			continue
		}
		for _, o := range owners {
			if o.Worker == r.id && o.Task == r.ahead[i].task.ID {
				r.ahead[i].back, r.ahead[i].lost = true, true
			}
		}
	}
}

// giveBack puts the waiting tasks that are due back to waiting (all of
// them with all set): their grants are released, then the claims undone,
// guarded by owner and epoch, so each keeps its place in line. Failures
// are logged: the heartbeat's sweep puts back a claimed task that runs
// nowhere, and leases run out.
func (r *run) giveBack(ctx context.Context, conn *workerConn, all bool) {
	now := time.Now()
	r.mu.Lock()
	var back []aheadTask
	keep := r.ahead[:0]
	for _, q := range r.ahead {
		switch {
		case !q.back && q.due(now):
			// It waited aheadWait: the handlers before it ran that long at
			// least. Until handlers return fast again, claim no more ahead
			// (else the next step would claim it again, and so on).
			r.handlerAvg = max(r.handlerAvg, r.w.cfg.aheadWait)
			fallthrough
		case all || q.back:
			back = append(back, q)
		default:
			keep = append(keep, q)
		}
	}
	clear(r.ahead[len(keep):])
	r.ahead = keep
	next := r.takeAhead(now)
	r.mu.Unlock()
	for _, q := range next {
		r.start(q.task, q.batch)
	}
	if len(back) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stepTimeout)
	defer cancel()
	var owners []Owner
	ts := make([]*Task, len(back))
	for i, q := range back {
		ts[i] = q.task
		if !q.lost && len(q.task.Exclusive)+len(q.task.Shared) > 0 {
			owners = append(owners, Owner{r.id, q.task.ID})
		}
	}
	if len(owners) > 0 {
		if err := r.lock.Release(ctx, owners); err != nil {
			r.log.Warn("tasking: release locks of tasks claimed ahead", "err", err)
		}
		r.c.met.grants(ctx, -len(owners))
	}
	if err := r.unclaim(ctx, conn, ts); err != nil {
		r.log.Warn("tasking: put back tasks claimed ahead", "tasks", len(ts), "err", err)
		return
	}
	r.log.Debug("tasking: put back tasks claimed ahead that did not start", "tasks", len(ts))
	r.signal() // they are ready again
}
