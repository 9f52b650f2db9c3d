package tasking

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Immediate tasks (Pulp's dispatch(immediate=True)): the caller runs the
// task's handler itself, now, when nothing earlier conflicts with it.
//
// The task is dispatched like any other, so it gets its id and its line
// entries, and in the same transaction, when it is ready (no earlier task
// that is not final conflicts with it, design.md §3), it is claimed: running,
// with no worker, and a lease (its deadline plus a TTL). An earlier
// conflicting task therefore always runs first, and a later one waits for
// it, exactly as for queued tasks. The caller then takes its locks through
// the client's locker (in a lock session of the Immediate, opened on first
// use), runs the handler with the deadline, releases the locks and writes
// the final state, which hands its lines on like a worker's step does. A
// caller that crashes leaves the task running with no worker: the fleet's
// cleanup fails it ("worker lost") once its lease has run out, and the
// locker frees its grants when the caller's session ends (PostgreSQL) or its
// leases run out (Redis).

var (
	// ErrBlocked matches every [*BlockedError].
	ErrBlocked = errors.New("tasking: immediate task waits behind earlier tasks")
	// ErrImmediateClosed: Run was called on a closed [Immediate].
	ErrImmediateClosed = errors.New("tasking: immediate runner closed")
)

// BlockedError says what an immediate task would wait behind: it was not
// run, and not recorded ([Immediate.Run] without [DeferIfBlocked]).
type BlockedError struct {
	Tasks     []int64  // earlier tasks, not final, that conflict with it (at most 100)
	Resources []string // the resources on which they conflict
	// Reason is set when the task was ready but its locks were refused (an
	// earlier holder that was declared lost still holds them); the task is
	// then recorded as canceled with this reason.
	Reason string
}

func (e *BlockedError) Error() string {
	if e.Reason != "" {
		return fmt.Sprintf("tasking: immediate task not run: %s (resources %v)", e.Reason, e.Resources)
	}
	return fmt.Sprintf("tasking: immediate task waits behind tasks %v (resources %v)", e.Tasks, e.Resources)
}

// Is makes errors.Is(err, ErrBlocked) true.
func (e *BlockedError) Is(target error) bool { return target == ErrBlocked }

// DeferIfBlocked makes [Immediate.Run] queue the task for the workers when
// it cannot run at once, instead of returning a [*BlockedError]. Other
// dispatches ignore it. Default: the error.
func DeferIfBlocked() DispatchOption {
	return func(s *TaskSpec) { s.deferIfBlocked = true }
}

// DefaultImmediateTimeout is the deadline of an immediate task's handler
// when the task has no [Timeout].
const DefaultImmediateTimeout = 30 * time.Second

// ImmediateOption configures an Immediate.
type ImmediateOption func(*immediateConfig)

type immediateConfig struct {
	ttl time.Duration
}

// WithImmediateTTL sets how long after its deadline an immediate task that
// its caller did not finish (the process died) is failed by the fleet's
// cleanup, which frees its resources for the tasks behind it. Default: 30s.
func WithImmediateTTL(d time.Duration) ImmediateOption {
	return func(c *immediateConfig) { c.ttl = d }
}

// Immediate runs tasks in the caller's process ([Immediate.Run]). It holds
// a lock session of the client's locker, opened on first use (with the
// PostgreSQL locker: a connection of its own); [Immediate.Close] closes it.
// It is safe for concurrent use.
type Immediate struct {
	c   *Client
	cfg immediateConfig

	mu      sync.Mutex
	sess    LockSession
	owner   int64 // the Owner.Worker of its grants: negative, apart from the workers' ids
	closed  bool
	running map[int64]*immediateRun
}

type immediateRun struct {
	cancel context.CancelCauseFunc
	lost   bool
}

// NewImmediate returns a runner of immediate tasks for c.
func NewImmediate(c *Client, opts ...ImmediateOption) *Immediate {
	cfg := immediateConfig{ttl: 30 * time.Second}
	for _, o := range opts {
		o(&cfg)
	}
	return &Immediate{c: c, cfg: cfg, running: make(map[int64]*immediateRun)}
}

// Run runs a task in the caller now, if nothing earlier conflicts with it:
// it is dispatched (it gets its id), its locks are taken through the
// client's locker, fn runs in the calling goroutine with the task's
// deadline ([Timeout], default [DefaultImmediateTimeout]), and its final
// state is recorded and handed on like a worker's. Run returns the final
// task; a failed task is not an error of Run's (see [Task.Err]).
//
// When an earlier task that is not final conflicts with it, the task is not
// run: Run returns a [*BlockedError] naming those tasks and resources, and
// nothing is recorded, or, with [DeferIfBlocked], the task is left waiting
// for the workers (which need a handler for name) and returned waiting.
//
// The handler's context carries the task ([TaskFromContext]): its
// children record it as their parent. Progress reports are written while
// it runs, as on a worker. [Client.Cancel], from any process, cancels the
// handler's context (cause [ErrCanceled]) within about half a second, and
// the task ends canceled. Cancelling ctx cancels the handler's. A worker's
// middleware and error handler do not apply (no worker runs it), and no
// OpenTelemetry span or metric is recorded for it.
func (im *Immediate) Run(ctx context.Context, name string, args any, fn HandlerFunc, opts ...DispatchOption) (*Task, error) {
	if fn == nil {
		return nil, inputErr("handler", "nil HandlerFunc")
	}
	spec := Spec(name, args, opts...)
	if spec.Timeout == 0 {
		spec.Timeout = DefaultImmediateTimeout
	}
	if im.cfg.ttl <= 0 {
		return nil, inputErr("immediate TTL", "%v, need > 0", im.cfg.ttl)
	}
	batch, err := prepareBatch([]TaskSpec{spec})
	if err != nil {
		return nil, err
	}
	c := im.c
	if err := c.checkSchema(ctx); err != nil {
		return nil, err
	}
	// The session first: a locker out of reach fails the call before
	// anything is recorded.
	sess, owner, err := im.session(ctx)
	if err != nil {
		return nil, err
	}
	t, claimed, err := c.dispatchImmediate(ctx, batch, c.parentOf(ctx), spec.Timeout+im.cfg.ttl, spec.deferIfBlocked)
	if err != nil || !claimed {
		return t, err
	}
	o := Owner{owner, t.ID}
	if len(t.Exclusive)+len(t.Shared) > 0 {
		fence, err := im.acquire(ctx, sess, o, t)
		if err != nil {
			return im.giveBack(ctx, t, spec.deferIfBlocked, err)
		}
		t.Fence = fence
	}
	return im.run(ctx, sess, o, t, fn)
}

// session returns the lock session, opening it first if needed.
func (im *Immediate) session(ctx context.Context) (LockSession, int64, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return nil, 0, ErrImmediateClosed
	}
	if im.sess != nil {
		return im.sess, im.owner, nil
	}
	c := im.c
	var owner int64
	if err := c.pool.QueryRow(ctx, c.q.immediateOwner).Scan(&owner); err != nil {
		return nil, 0, fmt.Errorf("tasking: immediate runner: %w", err)
	}
	sess, err := c.locker.Open(ctx, LockSessionConfig{
		Worker: owner, Pool: c.pool, Schema: c.schema, Logger: c.log, OnLost: im.lost,
	})
	if err != nil {
		return nil, 0, fmt.Errorf("tasking: open %s locker for immediate tasks: %w", c.locker.Kind(), err)
	}
	im.sess, im.owner = sess, owner
	return sess, owner, nil
}

// Close closes the runner's lock session, releasing whatever it still
// holds. Call it when no Run is in progress; later Runs return
// [ErrImmediateClosed].
func (im *Immediate) Close(ctx context.Context) error {
	im.mu.Lock()
	sess := im.sess
	im.sess, im.closed = nil, true
	im.mu.Unlock()
	if sess == nil {
		return nil
	}
	return sess.Close(ctx)
}

// lost is the session's OnLost: cancel the handlers whose grants are gone.
func (im *Immediate) lost(owners []Owner, cause error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	for _, o := range owners {
		if r := im.running[o.Task]; r != nil && o.Worker == im.owner {
			r.lost = true
			r.cancel(cause)
		}
	}
}
