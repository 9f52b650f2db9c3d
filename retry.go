package tasking

import (
	"encoding/json"
	"errors"
	"time"
)

// Retries. A failed attempt of a task with a retry policy and attempts left
// is not final: the task waits in [StateRetrying] until its backoff has
// passed and then runs again. It keeps its place in line meanwhile: tasks
// dispatched after it that conflict with it wait until it is final, exactly
// as they would while it runs, and tasks that conflict with nothing are not
// held up (docs/design.md §6).

// RetryPolicy says how often, and how soon, a failed task runs again.
type RetryPolicy struct {
	// Attempts is how many times the handler may run in all, the first
	// included: 3 means up to two retries. 1 (or 0) means no retry.
	Attempts int
	// Backoff is the wait before the first retry; it doubles with every
	// further one, up to MaxBackoff, and each wait varies by ±20% so that
	// tasks that failed together do not retry together. Default: 1s.
	Backoff time.Duration
	// MaxBackoff caps the wait. Default: 1h.
	MaxBackoff time.Duration
	// Interrupted, for idempotent handlers, puts a task whose attempt was
	// interrupted back to waiting at its place in line, to run again at
	// once, instead of failing it: interrupted by a graceful shutdown of its
	// worker (not a handler abandoned at shutdown), by the loss of its
	// locks, or by the loss of its worker (the fleet's cleanup then puts it
	// back). Such an attempt is logged in [Task.Attempts] and counts as an
	// attempt, but it is retried even when no attempts are left. The
	// handler may run again while an interrupted run still goes on (a
	// paused worker that was declared lost): conflicting tasks are kept
	// apart by the locker as always, but a task without resources is not.
	// Default: false (an interrupted task fails).
	Interrupted bool
}

// Retry gives the task its own retry policy, which overrides its handler's
// [HandlerRetry]. Default: the handler's policy.
func Retry(p RetryPolicy) DispatchOption {
	return func(s *TaskSpec) { s.Retry = &p }
}

// HandlerRetry retries the handler's failed tasks under p, unless a task
// has its own [Retry]. A failure is an error returned by the handler
// (unless wrapped with [NoRetry]), a panic or a timeout. A task that is
// canceled is not retried, nor one that was interrupted (its worker shut
// down or was lost, its locks were lost) unless p.Interrupted is set.
// Once a worker claims a task without a policy of its own, the handler's
// policy is stored on it ([Task.Retry]), so that the fleet's cleanup
// knows it when the worker is lost. Default: no retries.
func HandlerRetry(p RetryPolicy) HandlerOption {
	return func(h *handler) { h.retry = &p }
}

// NoRetry wraps err so that the task fails at once, whatever its retry
// policy: for failures that another attempt cannot fix (bad args, say).
// The task's error is err's text. NoRetry(nil) is nil.
func NoRetry(err error) error {
	if err == nil {
		return nil
	}
	return &noRetryError{err}
}

type noRetryError struct{ err error }

func (e *noRetryError) Error() string { return e.err.Error() }
func (e *noRetryError) Unwrap() error { return e.err }

// Attempt is one failed run of a task, as kept in [Task.Attempts].
type Attempt struct {
	Attempt    int       `json:"attempt"` // 1 for the first run
	StartedAt  time.Time `json:"started_at"`
	FinishedAt time.Time `json:"finished_at"`
	Error      string    `json:"error"`
}

const (
	defaultBackoff    = time.Second
	defaultMaxBackoff = time.Hour
	maxAttempts       = 1000
)

func (p *RetryPolicy) check() error {
	switch {
	case p.Attempts < 0 || p.Attempts > maxAttempts:
		return inputErr("retry policy", "%d attempts, need 0 to %d", p.Attempts, maxAttempts)
	case p.Backoff < 0 || p.MaxBackoff < 0 || p.Backoff > 0 && p.Backoff < time.Millisecond ||
		p.MaxBackoff > 0 && p.MaxBackoff < time.Millisecond:
		return inputErr("retry policy", "backoff %v, max %v: need at least 1ms (or 0 for the default)", p.Backoff, p.MaxBackoff)
	}
	return nil
}

// delay is the wait before the retry after the given attempt (1-based).
func (p *RetryPolicy) delay(attempt int) time.Duration {
	d, limit := p.Backoff, p.MaxBackoff
	if d == 0 {
		d = defaultBackoff
	}
	if limit == 0 {
		limit = defaultMaxBackoff
	}
	for i := 1; i < attempt && d < limit; i++ {
		d *= 2
	}
	return jitter(min(d, limit))
}

// retryAfter says whether a task whose attempt failed with err runs again,
// and after how long: the task's own policy, else its handler's.
func retryAfter(t *Task, h handler, err error) (time.Duration, bool) {
	p := t.Retry
	if p == nil {
		p = h.retry
	}
	var nr *noRetryError
	if p == nil || t.Attempt >= p.Attempts || errors.As(err, &nr) {
		return 0, false
	}
	return p.delay(t.Attempt), true
}

// retryJSON is how a policy is stored. The fleet's cleanup reads
// "interrupted" (internal/fleet).
type retryJSON struct {
	Attempts    int   `json:"attempts"`
	BackoffMS   int64 `json:"backoff_ms,omitempty"`
	MaxBackoff  int64 `json:"max_backoff_ms,omitempty"`
	Interrupted bool  `json:"interrupted,omitempty"`
}

func (p *RetryPolicy) json() retryJSON {
	return retryJSON{p.Attempts, p.Backoff.Milliseconds(), p.MaxBackoff.Milliseconds(), p.Interrupted}
}

func encodeRetry(p *RetryPolicy) *string {
	if p == nil {
		return nil
	}
	b, _ := json.Marshal(p.json())
	s := string(b)
	return &s
}

// handlerPolicies is the JSON object of the handlers' retry policies by
// task name, which the claim stores on tasks without a policy of their own.
func handlerPolicies(hs map[string]handler) string {
	m := map[string]retryJSON{}
	for name, h := range hs {
		if h.retry != nil {
			m[name] = h.retry.json()
		}
	}
	b, _ := json.Marshal(m)
	return string(b)
}

// requeue says whether t's interrupted attempt goes back in line.
func requeue(t *Task, h handler) bool {
	p := t.Retry
	if p == nil {
		p = h.retry
	}
	return p != nil && p.Interrupted
}

func decodeRetry(b []byte) *RetryPolicy {
	var r retryJSON
	if len(b) == 0 || json.Unmarshal(b, &r) != nil {
		return nil
	}
	return &RetryPolicy{Attempts: r.Attempts, Backoff: time.Duration(r.BackoffMS) * time.Millisecond,
		MaxBackoff: time.Duration(r.MaxBackoff) * time.Millisecond, Interrupted: r.Interrupted}
}
