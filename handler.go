package tasking

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"time"
)

// outcome is a handler's end, to be written by the next step.
type outcome struct {
	task     *Task
	state    State
	err      string
	owner    bool            // holds locker grants to release
	ran      time.Duration   // how long the handler ran
	progress json.RawMessage // the last progress reports, nil for none
	delay    time.Duration   // StateRetrying: the backoff
	batch    uint64          // the step that started the handler
}

// start runs t's handler in its own goroutine. Its outcome goes to the step
// loop, which writes it in its next step.
func (r *run) start(t *Task, batch uint64) {
	t.live = &liveTask{schema: r.c.schema, mark: r.progress.mark}
	h := r.handlers[t.Name]
	hctx, cancel := context.WithCancelCause(r.base)
	hctx = context.WithValue(hctx, taskKey{}, t)
	stopTimer := context.CancelFunc(func() {})
	if d := cmp.Or(t.Timeout, h.timeout); d > 0 {
		hctx, stopTimer = context.WithTimeoutCause(hctx, d, ErrTimeout)
	}
	hctx, span := r.startRunSpan(hctx, t)
	r.c.met.startedTask(hctx, t)
	a := &activeTask{task: t, names: len(t.Exclusive)+len(t.Shared) > 0, span: span, batch: batch, began: time.Now()}
	r.mu.Lock()
	a.cancel = cancel
	r.active[t.ID] = a
	r.launching--                      // taken by takeAhead
	if _, ok := r.canceled[t.ID]; ok { // canceled while we were claiming it
		delete(r.canceled, t.ID)
		cancel(ErrCanceled)
	}
	r.mu.Unlock()
	r.handlerW.Add(1)
	go func() {
		defer r.handlerW.Done()
		// The outcome is recorded in a deferred call so that a handler that
		// ends its goroutine with runtime.Goexit (t.FailNow in a test helper,
		// say) still frees its slot and its locks instead of wedging its
		// task; returned tells the two apart.
		var err error
		returned := false
		defer func() {
			if !returned {
				err = errGoexit
				r.log.Error("tasking: handler called runtime.Goexit; its task fails", "task", t.ID, "name", t.Name)
			}
			r.settleHandler(hctx, t, a, err, stopTimer)
		}()
		err = callHandler(hctx, h.fn, t)
		returned = true
	}()
}

// errGoexit is the failure of a task whose handler called runtime.Goexit.
var errGoexit = errors.New("handler called runtime.Goexit before returning")

// settleHandler turns a handler's end into an outcome for the next step.
func (r *run) settleHandler(hctx context.Context, t *Task, a *activeTask, err error, stopTimer context.CancelFunc) {
	if lc, ok := r.lock.(LeaseChecker); ok && a.names {
		lc.CheckLease(Owner{r.id, t.ID}) // may call r.lost, before a.lost is read
	}
	cause := context.Cause(hctx)
	stopTimer()
	r.mu.Lock()
	if a.abandoned { // its outcome was written at shutdown
		r.mu.Unlock()
		return
	}
	a.cancel(nil)
	delete(r.active, t.ID)
	r.unsent[t.ID] = struct{}{}
	// The last progress reports go with the final state, in one write.
	o := outcome{task: t, state: StateCompleted, owner: a.names, ran: a.ran(), progress: t.live.endProgress(),
		batch: a.batch}
	r.handlerTook(o.ran)
	now := time.Now()
	r.progress.forget(t)
	var why error // for the error handler
	switch {
	case a.lost:
		o.state, o.err = StateFailed, errorText(cause)
		why = cmp.Or(cause, ErrLockLost)
		if requeue(t, r.handlers[t.Name]) {
			o.state = StateRetrying // back in line at once
		}
	case errors.Is(cause, ErrTimeout) || errors.Is(cause, ErrCanceled) || errors.Is(cause, ErrWorkerLost):
		// A canceled task ends canceled in the step.
		o.state, o.err = StateFailed, cause.Error()
		if !errors.Is(cause, ErrCanceled) {
			why = cause
		}
		if errors.Is(cause, ErrTimeout) {
			o.delay, o.state = r.retry(t, ErrTimeout)
		}
	case err != nil:
		o.state, o.err, why = StateFailed, err.Error(), err
		if errors.Is(cause, ErrShutdown) && !errors.Is(err, ErrShutdown) {
			// Say why the handler failed, once: a handler that returned
			// context.Cause(ctx) already says it.
			o.err = ErrShutdown.Error() + ": " + o.err
			why = fmt.Errorf("%w: %w", ErrShutdown, err)
		}
		switch {
		case cause == nil: // the handler's own failure, not an interruption
			o.delay, o.state = r.retry(t, err)
		case errors.Is(cause, ErrShutdown) && requeue(t, r.handlers[t.Name]):
			o.state = StateRetrying // back in line at once
		}
	}
	// The slot goes to the task behind this one on its line if one was
	// claimed with it and may start (chain.go), else to the next task
	// claimed ahead, if one waits.
	succ, handOff := r.successor(t.ID, o.state != StateRetrying, now)
	next := r.takeAhead(now)
	r.mu.Unlock()
	written := handOff && r.handOff(t, o, succ)
	for _, q := range next {
		r.start(q.task, q.batch)
	}
	r.failed(hctx, t, why)
	endSpan(a.span, why)
	if !written {
		r.send(o)
	}
}

// retry is the state a failed attempt of t leaves it in: retrying (after
// the returned backoff) or failed.
func (r *run) retry(t *Task, err error) (time.Duration, State) {
	if d, ok := retryAfter(t, r.handlers[t.Name], err); ok {
		return d, StateRetrying
	}
	return 0, StateFailed
}

func errorText(err error) string {
	if err == nil {
		return ErrLockLost.Error()
	}
	return err.Error()
}

// callHandler runs the handler (a worker's is wrapped in its middleware),
// turning a panic into a [*PanicError] with its stack.
func callHandler(ctx context.Context, fn HandlerFunc, t *Task) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = &PanicError{Value: v, Stack: debug.Stack()}
		}
	}()
	return fn(ctx, t) // a worker's fn is wrapped in its middleware (newRun)
}

// send hands an outcome to the step loop, unless shutdown has closed the
// channel: a handler abandoned at shutdown may return after the loop ended,
// and its task is then left for cleanup.
func (r *run) send(o outcome) {
	r.sendMu.RLock()
	defer r.sendMu.RUnlock()
	if !r.closed {
		r.results <- o
	}
}

// closeResults tells the step loop that no more outcomes will come.
func (r *run) closeResults() {
	r.sendMu.Lock()
	defer r.sendMu.Unlock()
	if !r.closed {
		r.closed = true
		close(r.results)
	}
}
