package tasking

import (
	"context"
	"time"

	"github.com/tasking-go/tasking/internal/fleet"
)

// heartbeat beats every TTL/3 in its own goroutine, so handlers never starve
// it, and runs the fleet's cleanup when it wins the election. It shares the
// worker's connection with the step loop, whose statements are short; a
// step refreshes the heartbeat too when it is a third of the TTL old, so a
// worker that steps stays alive even when its heartbeat is late.
func (r *run) heartbeat(ctx context.Context) {
	defer r.retainW.Wait()
	r.beat(ctx)
	t := time.NewTicker(r.w.cfg.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if r.w.cfg.skipBeat != nil && r.w.cfg.skipBeat() {
			continue
		}
		r.beat(ctx)
		r.cleanup(ctx)
	}
}

func (r *run) beat(ctx context.Context) {
	b, err := r.fleet.Beat(ctx, r.id)
	if err != nil {
		if ctx.Err() == nil {
			r.beatLog.failed(err)
		}
		return
	}
	r.beatLog.ok()
	r.live.Store(b.Live)
	r.repeatHunger()
	r.sweep(ctx, b.Owned)
	if !b.Present {
		// Cleanup declared this worker gone (it was paused for longer than
		// the TTL): its running tasks are already failed. Stop their
		// handlers, then come back under the same id.
		r.log.Error("tasking: this worker was declared lost; canceling its handlers and rejoining")
		r.mu.Lock()
		for _, a := range r.active {
			a.cancel(ErrWorkerLost)
		}
		r.dropAhead(nil, false) // cleanup failed them; their grants are released
		r.mu.Unlock()
		r.signal()
		if err := r.fleet.Reinstate(ctx, r.id, r.self, r.w.cfg.ttl); err != nil && ctx.Err() == nil {
			r.log.Warn("tasking: rejoin the fleet", "err", err)
		}
	}
}

// sweep reconciles what the database says this worker runs with what it
// does run. A canceling task is canceled here (its signal may have been
// lost). A running task this worker has no handler for and is not finishing
// was claimed by a step whose reply never arrived: its handler never ran,
// so once it has been seen so on two heartbeats in a row (a step in flight
// takes milliseconds, a heartbeat period is seconds) it is put back to
// waiting, guarded by owner and epoch; a canceling one ends canceled.
func (r *run) sweep(ctx context.Context, owned []fleet.OwnedTask) {
	var back []fleet.OwnedTask
	r.mu.Lock()
	prev := r.orphans
	r.orphans = make(map[int64]int32)
	for _, t := range owned {
		_, running := r.active[t.ID]
		_, unsent := r.unsent[t.ID]
		ahead := r.isAhead(t.ID)
		switch {
		case running && t.Canceling:
			r.active[t.ID].cancel(ErrCanceled)
		case ahead && t.Canceling:
			r.canceled[t.ID] = time.Now() // start applies it
		case running || unsent || ahead:
		case prev[t.ID] == t.Epoch+1: // stored +1 so that the zero value means unseen
			back = append(back, t)
		default:
			r.orphans[t.ID] = t.Epoch + 1
		}
	}
	r.mu.Unlock()
	if len(back) == 0 {
		return
	}
	var ids []int64
	var epochs []int32
	canceled := 0
	for _, t := range back {
		if t.Canceling {
			// Its handler never ran: the step loop ends it canceled.
			r.send(outcome{task: &Task{ID: t.ID, Epoch: int(t.Epoch)}, state: StateCanceled, err: ErrCanceled.Error()})
			canceled++
			continue
		}
		ids, epochs = append(ids, t.ID), append(epochs, t.Epoch)
	}
	var put int64
	if len(ids) > 0 {
		tag, err := r.conn.Exec(ctx, r.c.q.unclaim, r.id, ids, epochs)
		if err != nil {
			r.log.Warn("tasking: put back tasks whose claim was lost", "err", err)
			return
		}
		put = tag.RowsAffected()
	}
	r.log.Warn("tasking: settled tasks claimed by a step whose reply was lost",
		"put_back", put, "canceled", canceled)
	r.signal()
}

func (r *run) cleanup(ctx context.Context) {
	// A little under the heartbeat period: a lone worker cleans up on each
	// of its heartbeats, a fleet about as often in all.
	got, err := r.fleet.Cleanup(ctx, r.w.cfg.ttl/5)
	if err != nil {
		if ctx.Err() == nil {
			r.cleanLog.failed(err)
		}
		return
	}
	r.cleanLog.ok()
	if got.Won {
		r.warnUnhandled(ctx)
		r.retain(ctx)
	}
	if len(got.Workers) == 0 && got.Failed+got.Canceled+got.Requeued == 0 {
		return
	}
	r.log.Warn("tasking: cleaned up after dead workers", "workers", got.Workers,
		"failed", got.Failed, "canceled", got.Canceled, "put_back", got.Requeued)
	r.freeGrants(ctx, got.Workers)
	if got.Ready+got.Requeued > 0 {
		r.wakeOthers(true)
	}
	r.c.waits.poke()
}

// unhandledAfter is how long the oldest ready task of a name may wait with
// no live worker handling that name before it is reported; unhandledEvery
// is how often it is reported again while that lasts.
var (
	unhandledAfter = time.Minute // a variable for tests
	unhandledEvery = 10 * time.Minute
)

// warnUnhandled reports task names that have ready tasks and no live worker
// that handles them: a typo in a dispatch, or a worker kind that is not
// deployed. Such a task never starts, and every later task on its
// resources waits behind it. Only the worker that won the cleanup looks,
// and each name is reported at most once per unhandledEvery.
func (r *run) warnUnhandled(ctx context.Context) {
	names, err := r.fleet.Unhandled(ctx, unhandledAfter)
	if err != nil {
		return // the next cleanup tries again
	}
	now := time.Now()
	for _, u := range names {
		if at, ok := r.unhandledSaid[u.Name]; ok && now.Sub(at) < unhandledEvery {
			continue
		}
		r.unhandledSaid[u.Name] = now
		r.log.Warn("tasking: ready tasks whose name no live worker handles; they, and every later task on their resources, wait",
			"name", u.Name, "oldest", u.Oldest.Format(time.RFC3339), "tasks", u.Tasks)
	}
}

// freeGrants frees the locker grants of dead worker instances at once, for
// lockers that can ([WorkerFreer]).
func (r *run) freeGrants(ctx context.Context, workers []int64) {
	f, ok := r.lock.(WorkerFreer)
	if !ok || len(workers) == 0 {
		return
	}
	if err := f.FreeWorkers(ctx, workers); err != nil {
		r.log.Warn("tasking: free dead workers' locks", "err", err)
	}
}

// pollEvery is this worker's fallback poll interval: the configured one
// times the number of live workers, so the fleet as a whole polls about once
// per interval however many workers it has (a fleet of 150 workers polling
// every 10 ms each saturated Pulp's database).
func (r *run) pollEvery() time.Duration {
	return jitter(r.w.cfg.poll * time.Duration(max(r.live.Load(), 1)))
}
