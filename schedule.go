package tasking

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime/debug"
	"slices"
	"time"

	"github.com/tasking-go/tasking/internal/admit"
)

// Scan sizes. The first page is a window of about twice the free slots; when
// it yields too few candidates the scan goes deeper in growing pages, carrying
// the taken sets, so a long blocked head never idles free slots (P6).
const (
	windowMargin = 16
	maxPage      = 4096
	finishBatch  = 512
	drainGiveUp  = 30 * time.Second
	retryLimit   = 4
	cycleTimeout = 30 * time.Second
	// A wake-up within coalesceWindow of a cycle that started fewer than
	// smallCycle tasks waits for the window to end (see schedule).
	coalesceWindow = 2 * time.Millisecond
	smallCycle     = 8
	deepKeep       = 32                     // candidates a deep scan keeps, per free slot
	deepTTL        = 500 * time.Millisecond // how long they are used before a fresh deep scan
)

// schedule is the scheduler loop: one admission cycle per wake-up or poll
// while slots are free.
func (r *run) schedule(ctx context.Context) {
	poll := time.NewTimer(r.pollEvery())
	defer poll.Stop()
	retries := 0
	failing := false
	backoff := 10 * time.Millisecond
	var lastEnd time.Time // when the last cycle ended
	lastStarted := 0      // and how many tasks it started
	for {
		if retries == 0 {
			select {
			case <-ctx.Done():
				return
			case <-r.wake:
				// Tasks trickling in one at a time would each cost a cycle
				// (a scan and a claim). Right after a cycle that started
				// few tasks, wait out a short window so that the next one
				// takes everything that arrived meanwhile. An isolated
				// dispatch, or a busy backlog, is not delayed.
				if since := time.Since(lastEnd); lastStarted < smallCycle && since < coalesceWindow {
					sleepCtx(ctx, coalesceWindow-since)
					select {
					case <-r.wake:
					default:
					}
				}
			case <-poll.C:
				poll.Reset(r.pollEvery())
			}
		} else {
			// A race lost to another worker: look again shortly rather than
			// waiting for the next wake-up.
			sleepCtx(ctx, time.Duration(retries)*time.Millisecond)
			if ctx.Err() != nil {
				return
			}
		}
		free := r.freeSlots()
		if free == 0 {
			retries = 0
			continue // a finishing handler signals
		}
		// A cycle runs to its end even when shutdown begins meanwhile: a
		// statement cut off mid-flight would close the lock connection (and
		// lose every grant on it) or leave a claim's outcome unknown.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cycleTimeout)
		started, more, err := r.cycle(cctx, free)
		cancel()
		progress := started > 0
		lastEnd, lastStarted = time.Now(), started
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case err != nil:
			if !failing {
				r.log.Error("tasking: admission failed; retrying with backoff", "err", err)
				failing = true
			}
			retries = 0
			// Back off, but come back at once on a wake-up: the buses send
			// one when their connection is back.
			t := time.NewTimer(jitter(backoff))
			select {
			case <-ctx.Done():
			case <-r.wake:
			case <-t.C:
			}
			t.Stop()
			backoff = min(backoff*2, 5*time.Second)
			r.signal()
			continue
		case failing:
			r.log.Info("tasking: admission recovered")
			failing, backoff = false, 10*time.Millisecond
		}
		switch {
		case more && progress:
			retries = 0
			r.signal()
		case more && retries < retryLimit:
			retries++
		default:
			retries = 0
		}
	}
}

func (r *run) freeSlots() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.w.cfg.slots - len(r.active)
}

func (r *run) handles(name string) bool {
	_, ok := r.handlers[name]
	return ok
}

// cycle runs one admission: scan and walk the waiting tasks that name
// resources, ask the locker for the candidates in one round trip, then claim
// the granted ones, and fill the remaining free slots with tasks that name no
// resources, in one UPDATE. started: how many tasks started. more:
// candidates were denied or lost to other workers while slots stay free.
func (r *run) cycle(ctx context.Context, free int) (started int, more bool, err error) {
	var lockErr error
	cands, err := r.scan(ctx, free)
	if err != nil {
		return 0, false, err
	}
	fences := make(map[int64]int64, len(cands))
	if len(cands) > 0 {
		reqs := make([]LockRequest, len(cands))
		for i, e := range cands {
			reqs[i] = LockRequest{Owner: Owner{r.id, e.ID}, Exclusive: e.Exclusive, Shared: e.Shared}
		}
		fs, err := r.lock.TryAcquire(ctx, reqs)
		if err != nil {
			// The locker is out of reach: nothing that names resources
			// starts, but tasks without resources need no grant.
			r.releaseOwners(reqs)
			lockErr = fmt.Errorf("acquire locks: %w", err)
		}
		for i, f := range fs {
			if f > 0 {
				fences[cands[i].ID] = f
			}
		}
	}
	ids := make([]int64, 0, len(fences))
	for id := range fences {
		ids = append(ids, id)
	}

	rows, err := r.c.claim(ctx, r.id, ids, r.names, free-len(ids))
	if err != nil {
		return 0, false, r.recoverClaim(ctx, ids, err)
	}
	claimedRes := 0
	for _, row := range rows {
		fence, ok := fences[row.id]
		if ok {
			claimedRes++
			delete(fences, row.id)
		}
		r.start(&Task{
			ID: row.id, Name: row.name, Args: row.args, Exclusive: row.excl, Shared: row.shared,
			State: StateRunning, WorkerID: r.id, Epoch: row.epoch, CreatedAt: row.created,
			StartedAt: row.started, Fence: fence, Timeout: time.Duration(row.timeout) * time.Millisecond,
		})
	}
	if len(fences) > 0 { // granted, but another worker claimed or canceled the task first
		unused := make([]Owner, 0, len(fences))
		for id := range fences {
			unused = append(unused, Owner{r.id, id})
		}
		if err := r.lock.Release(ctx, unused); err != nil {
			r.log.Warn("tasking: release unused grants", "err", err)
		}
	}
	return len(rows), len(rows) < free && len(cands) > claimedRes, lockErr
}

// recoverClaim handles a claim that failed, perhaps after committing (the
// connection broke mid-statement): it releases the grants. A task the claim
// did move to running is then owned by this worker without a handler; no
// other worker can claim it, and the heartbeat's sweep puts it back in line.
func (r *run) recoverClaim(ctx context.Context, ids []int64, cause error) error {
	if len(ids) > 0 {
		owners := make([]Owner, len(ids))
		for i, id := range ids {
			owners[i] = Owner{r.id, id}
		}
		if err := r.lock.Release(context.WithoutCancel(ctx), owners); err != nil {
			r.log.Warn("tasking: release grants after failed claim", "err", err)
		}
	}
	return fmt.Errorf("claim: %w", cause)
}

// scan reads the waiting tasks that name resources, oldest first, and walks
// them until it has free candidates or reaches the end of the queue. The
// walk starts with the names of running tasks taken, so candidates are those
// the locker should grant.
func (r *run) scan(ctx context.Context, free int) ([]admit.Entry, error) {
	r.taken.Reset()
	r.cands = r.cands[:0]
	page := min(2*free+windowMargin, maxPage)
	if err := r.readFirstPage(ctx, page); err != nil {
		return nil, err
	}
	want := 2 * free
	r.cands, _ = admit.Walk(r.entries, r.taken, r.handles, want, r.cands)
	if len(r.cands) >= want || len(r.entries) < page {
		return spread(r.cands, free), nil
	}
	// Too few candidates near the head: take them from past it.
	last := r.entries[len(r.entries)-1].ID
	if err := r.fillDeep(ctx, last, want-len(r.cands), free); err != nil {
		return nil, err
	}
	for len(r.cands) < want && len(r.deep) > 0 {
		e := r.deep[0]
		r.deep = r.deep[1:]
		if e.ID > last && r.taken.Admissible(e.Exclusive, e.Shared) {
			r.cands = append(r.cands, e)
			r.taken.Add(e.Exclusive, e.Shared)
		}
	}
	return spread(r.cands, free), nil
}

// fillDeep makes sure r.deep holds candidates from past the first page
// (ids above last), scanning deeper pages only when the ones found by an
// earlier deep scan are used up or too old. That scan continues the walk of
// the first page and keeps up to deepKeep times the free slots.
//
// Keeping candidates between cycles is safe: a task that had no earlier
// conflicting task when it was scanned cannot get one later. A conflicting
// task dispatched later draws a larger id, and one with a smaller id that
// commits later cannot conflict with it (dispatch ordered them: the later
// one would have waited for that commit). At worst a kept candidate has
// been claimed or canceled meanwhile; scan drops it when it is seen running
// (its names are taken), and otherwise the lock or the claim turns it away.
// What keeping buys: a blocked head of thousands of tasks is read once per
// refill instead of on every cycle (DESIGN §5.7, P6).
func (r *run) fillDeep(ctx context.Context, last int64, need, free int) error {
	if len(r.deep) > 0 && time.Since(r.deepAt) < deepTTL {
		return nil
	}
	r.deep = r.deep[:0]
	// Walk on copies of the sets: the first page's sets stay for scan.
	taken := r.taken.Clone()
	keep := max(deepKeep*free, need)
	page := min(4*(2*free+windowMargin), maxPage)
	after := last
	for {
		var err error
		r.entries, err = r.c.readWindow(ctx, after, page, taken, r.entries[:0])
		if err != nil {
			return err
		}
		r.deep, _ = admit.Walk(r.entries, taken, r.handles, keep, r.deep)
		if len(r.deep) >= keep || len(r.entries) < page {
			break
		}
		after = r.entries[len(r.entries)-1].ID
		page = min(page*4, maxPage)
	}
	r.deepAt = time.Now()
	return nil
}

// spread picks n of the candidates at random. Candidates never conflict with
// each other, so any subset keeps the promise; picking at random keeps
// workers that read the same window from all asking for the same tasks.
func spread(cands []admit.Entry, n int) []admit.Entry {
	if len(cands) <= n {
		return cands
	}
	for i := 0; i < n; i++ {
		j := i + rand.IntN(len(cands)-i)
		cands[i], cands[j] = cands[j], cands[i]
	}
	return cands[:n]
}

// readFirstPage adds the names of running tasks to the taken sets and reads
// the first page of waiting tasks into r.entries, from one snapshot.
func (r *run) readFirstPage(ctx context.Context, page int) error {
	rows, err := r.c.pool.Query(ctx, r.c.q.scan, page)
	if err != nil {
		return err
	}
	defer rows.Close()
	r.entries = r.entries[:0]
	for rows.Next() {
		var running bool
		var e admit.Entry
		if err := rows.Scan(&running, &e.ID, &e.Name, &e.Exclusive, &e.Shared); err != nil {
			return err
		}
		if running {
			r.taken.Add(e.Exclusive, e.Shared)
		} else {
			r.entries = append(r.entries, e)
		}
	}
	// UNION ALL does not promise to keep the branch's order.
	slices.SortFunc(r.entries, func(a, b admit.Entry) int { return cmp.Compare(a.ID, b.ID) })
	return rows.Err()
}

// releaseOwners releases the grants of requests whose acquire failed.
func (r *run) releaseOwners(reqs []LockRequest) {
	owners := make([]Owner, len(reqs))
	for i, q := range reqs {
		owners[i] = q.Owner
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = r.lock.Release(ctx, owners)
}

// start runs t's handler in its own goroutine.
func (r *run) start(t *Task) {
	h := r.handlers[t.Name]
	hctx, cancel := context.WithCancelCause(r.base)
	hctx = context.WithValue(hctx, taskKey{}, t)
	stopTimer := context.CancelFunc(func() {})
	if d := cmp.Or(t.Timeout, h.timeout); d > 0 {
		hctx, stopTimer = context.WithTimeoutCause(hctx, d, ErrTimeout)
	}
	a := &activeTask{task: t, names: len(t.Exclusive)+len(t.Shared) > 0}
	r.mu.Lock()
	a.cancel = cancel
	r.active[t.ID] = a
	if _, ok := r.canceled[t.ID]; ok { // canceled while we were claiming it
		delete(r.canceled, t.ID)
		cancel(ErrCanceled)
	}
	r.mu.Unlock()
	r.handlerW.Add(1)
	go func() {
		defer r.handlerW.Done()
		err := r.call(hctx, h.fn, t)
		if lc, ok := r.lock.(leaseChecker); ok && a.names {
			lc.checkLease(Owner{r.id, t.ID}) // may call r.lost, before a.lost is read
		}
		cause := context.Cause(hctx)
		stopTimer()
		r.mu.Lock()
		a.cancel(nil)
		delete(r.active, t.ID)
		r.finishing[t.ID] = struct{}{}
		o := outcome{task: t, state: StateCompleted, owner: a.names}
		switch {
		case a.lost:
			o.state, o.err = StateFailed, errorText(cause)
		case errors.Is(cause, ErrTimeout) || errors.Is(cause, ErrCanceled) || errors.Is(cause, ErrWorkerLost):
			// A canceled task ends canceled in the finish statement.
			o.state, o.err = StateFailed, cause.Error()
		case err != nil:
			o.state, o.err = StateFailed, err.Error()
			if errors.Is(cause, ErrShutdown) {
				o.err = ErrShutdown.Error() + ": " + o.err
			}
		}
		r.mu.Unlock()
		r.signal() // a slot is free
		r.sendMu.RLock()
		if !r.closed {
			r.results <- o
		}
		r.sendMu.RUnlock()
	}()
}

// leaseChecker is implemented by lock sessions whose grants are leases that
// can run out before the session notices (the Redis locker after a process
// pause). checkLease reports o's grant through OnLost if its lease may have
// run out, so the task fails with "lock lost" instead of completing.
type leaseChecker interface {
	checkLease(o Owner)
}

func errorText(err error) string {
	if err == nil {
		return ErrLockLost.Error()
	}
	return err.Error()
}

// call runs the handler, turning a panic into an error with its stack.
func (r *run) call(ctx context.Context, fn HandlerFunc, t *Task) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("panic: %v\n%s", v, debug.Stack())
		}
	}()
	return fn(ctx, t)
}

// finisher writes final states in batches: whatever has queued up while the
// previous write was in flight goes in the next one. Locks are released only
// after the final state is committed.
func (r *run) finisher() {
	defer close(r.finished)
	batch := make([]outcome, 0, finishBatch)
	for o := range r.results {
		batch = append(batch[:0], o)
	drain:
		for len(batch) < finishBatch {
			select {
			case o, ok := <-r.results:
				if !ok {
					break drain
				}
				batch = append(batch, o)
			default:
				break drain
			}
		}
		r.finishBatch(batch)
	}
}

func (r *run) finishBatch(batch []outcome) {
	backoff := 50 * time.Millisecond
	var done map[int64]bool
	var failingSince time.Time
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		var err error
		done, err = r.c.finish(ctx, r.id, batch)
		cancel()
		if err == nil {
			break
		}
		if failingSince.IsZero() {
			failingSince = time.Now()
			r.log.Error("tasking: writing final states failed; retrying", "tasks", len(batch), "err", err)
		}
		// While the worker runs, keep trying: the tasks are running in the
		// database and their locks must stay held until the state is
		// written. Once it is stopping, give up after a while: cleanup of
		// this worker settles them ("worker lost").
		if r.draining.Load() && time.Since(failingSince) > drainGiveUp {
			r.log.Error("tasking: giving up on final states at shutdown; cleanup will settle the tasks",
				"tasks", len(batch), "err", err)
			return
		}
		time.Sleep(jitter(backoff))
		backoff = min(backoff*2, 5*time.Second)
	}
	r.mu.Lock()
	for _, o := range batch {
		delete(r.finishing, o.task.ID)
	}
	r.mu.Unlock()
	var owners []Owner
	for _, o := range batch {
		if !done[o.task.ID] {
			r.log.Warn("tasking: task was no longer this worker's to finish", "task", o.task.ID)
		}
		if o.owner {
			owners = append(owners, Owner{r.id, o.task.ID})
		}
	}
	if len(owners) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		r.release(ctx, owners)
		cancel()
		r.signal()
	}
	r.c.waits.poke()
}

// releaseNotifier is a lock session that can send the release wake-up
// (NOTIFY on channel) in the same round trip as the release itself, and
// only when the release freed something on the server.
type releaseNotifier interface {
	releaseAndNotify(ctx context.Context, owners []Owner, channel string) error
}

// release drops grants and wakes the workers that may be waiting for them.
func (r *run) release(ctx context.Context, owners []Owner) {
	if rn, ok := r.lock.(releaseNotifier); ok {
		if ch := r.c.bus.dispatchChannel(); ch != "" {
			if err := rn.releaseAndNotify(ctx, owners, ch); err != nil {
				r.log.Warn("tasking: release locks", "err", err)
			}
			return
		}
	}
	if err := r.lock.Release(ctx, owners); err != nil {
		r.log.Warn("tasking: release locks", "err", err)
	}
	r.c.bus.released(ctx)
}
