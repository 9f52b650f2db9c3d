package tasking

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Running one immediate task in the caller (see immediate.go): its locks,
// its handler with a deadline, cancel and progress while it runs, and its
// final state, written and handed on like a worker's step does.

// immediateRetry bounds how long Run tries for locks that are refused: a
// grant of a holder that was declared lost, until its lease or session ends.
const immediateRetry = time.Second

// acquire takes the task's locks, retrying refusals for a while.
func (im *Immediate) acquire(ctx context.Context, sess LockSession, o Owner, t *Task) (int64, error) {
	req := []LockRequest{{Owner: o, Exclusive: t.Exclusive, Shared: t.Shared}}
	give := time.Now().Add(immediateRetry)
	for {
		fences, err := sess.TryAcquire(ctx, req)
		if err != nil {
			if rerr := sess.Release(context.WithoutCancel(ctx), []Owner{o}); rerr != nil {
				im.c.log.Warn("tasking: release after failed acquire", "err", rerr)
			}
			return 0, fmt.Errorf("acquire locks: %w", err)
		}
		if fences[0] > 0 {
			return fences[0], nil
		}
		if time.Now().After(give) || ctx.Err() != nil {
			return 0, errors.New("locks refused: an earlier holder, declared lost, still holds them")
		}
		sleepCtx(ctx, retrySoon)
	}
}

// giveBack handles a claimed task whose locks could not be had: deferred,
// it goes back to waiting for the workers (it keeps its place: its entries
// never left the lines); otherwise it ends canceled with the reason.
func (im *Immediate) giveBack(ctx context.Context, t *Task, deferIt bool, cause error) (*Task, error) {
	c := im.c
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stepTimeout)
	defer cancel()
	if deferIt {
		tag, err := c.pool.Exec(wctx, c.q.unclaimImmediate, t.ID, t.Epoch)
		if err != nil {
			return nil, fmt.Errorf("tasking: immediate task %d: put back for the workers: %w", t.ID, err)
		}
		if tag.RowsAffected() == 1 {
			c.bus.released(wctx) // it is ready: wake a worker
			t.State, t.StartedAt = StateWaiting, time.Time{}
			return t, nil
		}
		return c.get(wctx, t.ID) // canceled meanwhile
	}
	if _, err := im.finish(wctx, t, StateCanceled, cause.Error()); err != nil {
		return nil, err
	}
	return nil, &BlockedError{Resources: append(append([]string{}, t.Exclusive...), t.Shared...), Reason: cause.Error()}
}

// run runs fn in the caller and records the outcome.
func (im *Immediate) run(ctx context.Context, sess LockSession, o Owner, t *Task, fn HandlerFunc) (*Task, error) {
	flush := im.progressFlusher(ctx, t)
	hctx, cancel := context.WithCancelCause(ctx)
	hctx = context.WithValue(hctx, taskKey{}, t)
	hctx, stopTimer := context.WithTimeoutCause(hctx, t.Timeout, ErrTimeout)
	stopWatch := im.watchCancel(ctx, t, cancel)
	r := &immediateRun{cancel: cancel}
	im.mu.Lock()
	im.running[t.ID] = r
	im.mu.Unlock()
	names := len(t.Exclusive)+len(t.Shared) > 0
	end := func(state State, msg string) (*Task, error) {
		im.mu.Lock()
		delete(im.running, t.ID)
		im.mu.Unlock()
		cancel(nil)
		stopWatch()
		flush.stop() // the last reports go with the final state
		wctx, wcancel := context.WithTimeout(context.WithoutCancel(ctx), stepTimeout)
		defer wcancel()
		if names {
			// Released before the final write, as a worker's step does: the
			// write is what makes the next in line ready.
			if err := sess.Release(wctx, []Owner{o}); err != nil {
				im.c.log.Warn("tasking: release locks of an immediate task", "task", t.ID, "err", err)
			}
		}
		return im.finish(wctx, t, state, msg)
	}
	returned := false
	defer func() {
		if !returned { // runtime.Goexit: record the failure, then let the goroutine end
			stopTimer()
			_, _ = end(StateFailed, errGoexit.Error())
		}
	}()
	err := callHandler(hctx, fn, t)
	returned = true
	if lc, ok := sess.(LeaseChecker); ok && names {
		lc.CheckLease(o) // may call im.lost
	}
	cause := context.Cause(hctx)
	stopTimer()
	im.mu.Lock()
	lost := r.lost
	im.mu.Unlock()
	state, msg := StateCompleted, ""
	switch {
	case lost:
		state, msg = StateFailed, errorText(cause)
	case errors.Is(cause, ErrTimeout) || errors.Is(cause, ErrCanceled): // canceled: ends canceled
		state, msg = StateFailed, cause.Error()
	case err != nil:
		state, msg = StateFailed, err.Error()
	}
	return end(state, msg)
}

// immediateCancelPoll is how often the caller of an immediate task looks
// whether the task was canceled (from any process).
const immediateCancelPoll = 500 * time.Millisecond

// watchCancel cancels the handler's context with cause ErrCanceled once the
// task is canceling: workers are told of cancels by wake-up messages, but
// the caller of an immediate task may run none, so it looks at the task
// every immediateCancelPoll while the handler runs.
func (im *Immediate) watchCancel(ctx context.Context, t *Task, cancel context.CancelCauseFunc) (stop func()) {
	c := im.c
	wctx, stopW := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			sleepCtx(wctx, immediateCancelPoll)
			if wctx.Err() != nil {
				return
			}
			var st string
			if err := c.pool.QueryRow(wctx, c.q.state, t.ID).Scan(&st); err == nil && State(st) == StateCanceling {
				cancel(ErrCanceled)
				return
			}
		}
	}()
	return func() { stopW(); <-done }
}

// immediateFlush writes an immediate task's progress reports while its
// handler runs, like a worker's flusher: at once for the first change,
// then at most every progressEvery, guarded by epoch and "no worker". Its
// goroutine starts with the first report.
type immediateFlush struct {
	once   sync.Once
	kick   chan struct{}
	cancel context.CancelFunc
	done   sync.WaitGroup
}

// progressFlusher sets t's live state up with a flusher of its own.
func (im *Immediate) progressFlusher(ctx context.Context, t *Task) *immediateFlush {
	f := &immediateFlush{kick: make(chan struct{}, 1)}
	fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	f.cancel = cancel
	c := im.c
	loop := func() {
		defer f.done.Done()
		for {
			select {
			case <-fctx.Done():
				return
			case <-f.kick:
			}
			_, err := c.pool.Exec(fctx, c.q.progressImmediate, t.ID, t.Epoch, string(t.live.snapshotProgress()))
			if err != nil && fctx.Err() == nil {
				c.log.Warn("tasking: write progress reports of an immediate task", "task", t.ID, "err", err)
			}
			sleepCtx(fctx, progressEvery)
		}
	}
	t.live = &liveTask{schema: c.schema, mark: func(*Task) {
		f.once.Do(func() { f.done.Add(1); go loop() })
		select {
		case f.kick <- struct{}{}:
		default:
		}
	}}
	return f
}

// stop ends the flusher and waits for its write in flight.
func (f *immediateFlush) stop() {
	f.once.Do(func() {}) // no flusher starts after this
	f.cancel()
	f.done.Wait()
}

// finish writes the final state (finish_immediate) and returns the task
// as stored.
func (im *Immediate) finish(ctx context.Context, t *Task, state State, msg string) (*Task, error) {
	c := im.c
	var result, progress *string
	if b := t.takeResult(); b != nil {
		s := string(b)
		result = &s
	}
	var reports json.RawMessage
	if t.live != nil {
		reports = t.live.endProgress()
	}
	if reports != nil {
		s := string(reports)
		progress = &s
	}
	var stored *string
	var finished *time.Time
	var ready int
	err := retryConflict(ctx, func() error {
		return c.pool.QueryRow(ctx, c.q.finishImmediate, t.ID, t.Epoch, string(state), msg, result, progress,
			c.bus.dispatchChannel()).Scan(&stored, &finished, &ready)
	})
	if err != nil {
		return nil, fmt.Errorf("tasking: immediate task %d: write final state: %w", t.ID, err)
	}
	if ready > 0 && c.bus.dispatchChannel() == "" {
		c.bus.released(ctx) // the statement could not wake the workers itself
	}
	c.waits.poke()
	if stored == nil {
		// No longer ours: cleanup failed it (its lease ran out first).
		return c.get(ctx, t.ID)
	}
	out := *t
	out.live = nil
	out.State, out.FinishedAt, out.Error = State(*stored), *finished, msg
	if result != nil {
		out.Result = json.RawMessage(*result)
	}
	if reports != nil {
		if err := json.Unmarshal(reports, &out.Progress); err != nil {
			return nil, err
		}
	}
	return &out, nil
}

// dispatchImmediate runs dispatch_immediate for a batch of one task.
// claimed: the task is running, the caller's to run; otherwise it was left
// waiting (deferred).
func (c *Client) dispatchImmediate(ctx context.Context, b *preparedBatch, parent int64, lease time.Duration, deferIt bool) (*Task, bool, error) {
	s := b.specs[0]
	// An immediate task runs now, once, in the caller: a start time, a
	// retry policy or a unique key (which could hand back another task)
	// have no meaning for it.
	switch {
	case !s.RunAt.IsZero():
		return nil, false, inputErr("immediate task", "RunAt/RunAfter do not apply: it runs now or not at all")
	case s.Retry != nil:
		return nil, false, inputErr("immediate task", "Retry does not apply: it runs once, in the caller")
	case s.Unique != "":
		return nil, false, inputErr("immediate task", "Unique does not apply: it runs in the caller")
	}
	exclJSON, _ := json.Marshal([][]string{s.Exclusive})
	sharedJSON, _ := json.Marshal([][]string{s.Shared})
	related := parent != 0 || s.Group > 0
	var id int64
	var created time.Time
	var group *int64
	var claimed bool
	var epoch int32
	var started *time.Time
	err := c.pool.QueryRow(ctx, c.q.immediate, []string{s.Name}, []string{string(b.args[0])},
		string(exclJSON), string(sharedJSON), []int64{s.Timeout.Milliseconds()},
		related, parent, []int64{s.Group}, lease.Milliseconds(), deferIt).
		Scan(&id, &created, &group, &claimed, &epoch, &started)
	if err != nil {
		if be := blockedErr(err); be != nil {
			return nil, false, be
		}
		return nil, false, dispatchErr(err)
	}
	t := &Task{
		ID: id, Name: s.Name, Args: b.args[0], Exclusive: s.Exclusive, Shared: s.Shared,
		State: StateWaiting, CreatedAt: created, Timeout: s.Timeout, Parent: parent,
	}
	if group != nil {
		t.Group = *group
	}
	if claimed {
		t.State, t.Epoch, t.StartedAt = StateRunning, int(epoch), *started
	}
	return t, claimed, nil
}

// blockedErr turns dispatch_immediate's TG005 into a *BlockedError.
func blockedErr(err error) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "TG005" {
		return nil
	}
	var d struct {
		Tasks     []int64  `json:"tasks"`
		Resources []string `json:"resources"`
	}
	if jerr := json.Unmarshal([]byte(pgErr.Detail), &d); jerr != nil {
		return fmt.Errorf("%w: %s", ErrBlocked, pgErr.Detail)
	}
	return &BlockedError{Tasks: d.Tasks, Resources: d.Resources}
}
