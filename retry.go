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
}

// Retry gives the task its own retry policy, which overrides its handler's
// [HandlerRetry]. Default: the handler's policy.
func Retry(p RetryPolicy) DispatchOption {
	return func(s *TaskSpec) { s.Retry = &p }
}

// HandlerRetry retries the handler's failed tasks under p, unless a task
// has its own [Retry]. A failure is an error returned by the handler
// (unless wrapped with [NoRetry]), a panic or a timeout. A task that is
// canceled, or interrupted (its worker shut down or was lost, its locks
// were lost), is not retried: it ends as without a policy. Default: no
// retries.
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

// retryJSON is how a task's own policy is stored.
type retryJSON struct {
	Attempts   int   `json:"attempts"`
	BackoffMS  int64 `json:"backoff_ms,omitempty"`
	MaxBackoff int64 `json:"max_backoff_ms,omitempty"`
}

func encodeRetry(p *RetryPolicy) *string {
	if p == nil {
		return nil
	}
	b, _ := json.Marshal(retryJSON{p.Attempts, p.Backoff.Milliseconds(), p.MaxBackoff.Milliseconds()})
	s := string(b)
	return &s
}

func decodeRetry(b []byte) *RetryPolicy {
	var r retryJSON
	if len(b) == 0 || json.Unmarshal(b, &r) != nil {
		return nil
	}
	return &RetryPolicy{Attempts: r.Attempts, Backoff: time.Duration(r.BackoffMS) * time.Millisecond,
		MaxBackoff: time.Duration(r.MaxBackoff) * time.Millisecond}
}
