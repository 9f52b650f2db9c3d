package tasking

import (
	"context"
	"slices"
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
	// slots up). docs/design.md §6 says why 64.
	aheadTarget = 64
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
	// after: the task before it on its line, whose slot and grant it takes
	// when that one's handler returns (chain.go); 0 for a task that waits
	// for any slot. A chained task holds no grant while it waits.
	after int64
}

func (q *aheadTask) due(now time.Time) bool { return q.back || !now.Before(q.deadline) }

// aheadRoom is how many tasks beyond the free slots a step may claim now:
// none unless handlers return faster than a step takes, and no more than
// the slots run in a step's time, or in half of aheadWait (a task waits
// about ahead/slots handler runs), at most WithClaimAhead. r.mu is held.
func (r *run) aheadRoom() int {
	if r.w.cfg.ahead <= 0 || r.draining || r.handlerAvg <= 0 || r.stepAvg <= 0 || r.handlerAvg >= r.stepAvg {
		return 0
	}
	span := min(r.stepAvg, r.w.cfg.aheadWait/2)
	return int(min(int64(r.w.cfg.ahead), int64(r.w.cfg.slots)*int64(span)/int64(r.handlerAvg)))
}

// ewmaShift sets the weight of a new sample in the averages below: 1/8.
const ewmaShift = 3

// handlerTook and stepTook feed the averages that aheadRoom compares; the
// first sample seeds each. r.mu is held for handlerTook.
func (r *run) handlerTook(d time.Duration) { ewma(&r.handlerAvg, max(d, 1)) }

func (r *run) stepTook(d time.Duration) {
	r.mu.Lock()
	ewma(&r.stepAvg, max(d, 1))
	r.mu.Unlock()
}

func ewma(avg *time.Duration, d time.Duration) {
	if *avg == 0 {
		*avg = d
	} else {
		*avg += (d - *avg) >> ewmaShift
	}
}

// admit queues the tasks a step claimed and starts as many as there are
// free slots, oldest first; the rest wait for handlers to return. chained
// wait for the tasks after says (chain.go).
func (r *run) admit(ts, chained []*Task, after map[int64]int64, batch uint64, sent time.Time) {
	now := time.Now()
	deadline := now.Add(r.w.cfg.aheadWait)
	if paused := sent.Add(r.w.cfg.ttl / 3); paused.Before(deadline) {
		deadline = paused
	}
	r.mu.Lock()
	for _, t := range ts {
		r.ahead = append(r.ahead, aheadTask{task: t, batch: batch, deadline: deadline})
	}
	for _, t := range chained {
		r.ahead = append(r.ahead, aheadTask{task: t, batch: batch, deadline: deadline, after: after[t.ID]})
	}
	if r.w.cfg.onChain != nil && len(chained) > 0 {
		r.w.cfg.onChain(len(chained))
	}
	next := r.takeAhead(now)
	waiting := len(r.ahead) > 0
	r.mu.Unlock()
	for _, q := range next {
		r.start(q.task, q.batch)
	}
	if waiting {
		// Whichever step loop is free then puts back what is still waiting
		// (usually nothing: a wake-up for nothing would cost a step).
		time.AfterFunc(time.Until(deadline)+time.Millisecond, func() {
			if r.aheadDue() {
				r.signal()
			}
		})
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
		if room > 0 && !q.due(now) && q.after == 0 {
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

// aheadDue reports whether a waiting task is due to be put back.
func (r *run) aheadDue() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	for i := range r.ahead {
		if r.ahead[i].due(now) {
			return true
		}
	}
	return false
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

// dropAhead marks waiting tasks to be put back: those of owners, or all of
// them for nil; lost says their grants were lost, so there is nothing to
// release. r.mu is held.
func (r *run) dropAhead(owners []Owner, lost bool) {
	for i := range r.ahead {
		q := &r.ahead[i]
		if owners == nil || slices.Contains(owners, Owner{r.id, q.task.ID}) {
			q.back, q.lost = true, q.lost || lost
		}
	}
}

// giveBack puts the waiting tasks that are due back to waiting (all of
// them with all set): their grants are released, then the claims undone,
// guarded by owner and epoch, so each keeps its place in line. It returns
// outcomes for the step loop to write: those of tasks canceled while they
// waited (a claim of a canceling task is not undone; it ends canceled).
// Failures are logged: the heartbeat's sweep puts back a claimed task
// that runs nowhere, and leases run out.
func (r *run) giveBack(ctx context.Context, conn *workerConn, all bool) []outcome {
	now := time.Now()
	r.mu.Lock()
	r.chainBack(now)
	var back []aheadTask
	keep := r.ahead[:0]
	for _, q := range r.ahead {
		switch {
		case !q.back && q.due(now):
			// It waited its time out: the handlers before it ran longer
			// than the averages said. Claim no more ahead until handlers
			// return fast again (else the next step would claim it back).
			r.handlerAvg = max(r.handlerAvg, r.w.cfg.aheadWait, r.stepAvg)
			fallthrough
		case all || q.back:
			back = append(back, q)
		default:
			keep = append(keep, q)
		}
	}
	clear(r.ahead[len(keep):])
	r.ahead = keep
	r.mu.Unlock()
	if len(back) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stepTimeout)
	defer cancel()
	var owners []Owner
	ts := make([]*Task, len(back))
	for i, q := range back {
		ts[i] = q.task
		if !q.lost && q.after == 0 && len(q.task.Exclusive)+len(q.task.Shared) > 0 {
			owners = append(owners, Owner{r.id, q.task.ID})
		}
	}
	if len(owners) > 0 {
		if err := r.lock.Release(ctx, owners); err != nil {
			r.log.Warn("tasking: release locks of tasks claimed ahead", "err", err)
		}
		r.c.met.grants(ctx, -len(owners))
	}
	put, err := r.unclaimed(ctx, conn, ts)
	if err != nil {
		r.log.Warn("tasking: put back tasks claimed ahead", "tasks", len(ts), "err", err)
		return nil
	}
	r.log.Debug("tasking: put back tasks claimed ahead that did not start", "tasks", len(put))
	r.signal() // they are ready again
	var outs []outcome
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, q := range back {
		if !put[q.task.ID] && !q.lost {
			r.unsent[q.task.ID] = struct{}{}
			outs = append(outs, outcome{task: q.task, state: StateCanceled, err: ErrCanceled.Error(), batch: q.batch})
		}
	}
	return outs
}

// chainBack marks the chained tasks behind a task that goes back to be put
// back too: they may not start before it. r.mu is held.
func (r *run) chainBack(now time.Time) {
	for {
		more := false
		for i := range r.ahead {
			q := &r.ahead[i]
			if q.after == 0 || q.back {
				continue
			}
			for j := range r.ahead {
				if p := &r.ahead[j]; p.task.ID == q.after && p.due(now) {
					q.back, more = true, true
					break
				}
			}
		}
		if !more {
			return
		}
	}
}

// aheadSlots is how many waiting tasks will take a slot of their own (a
// chained one takes the slot of the task before it). r.mu is held.
func (r *run) aheadSlots() int {
	n := 0
	for i := range r.ahead {
		if r.ahead[i].after == 0 {
			n++
		}
	}
	return n
}
