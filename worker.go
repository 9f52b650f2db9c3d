package tasking

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"sync"
	"time"
)

// HandlerFunc runs one task. Its context is canceled when the task is
// canceled, its locks are lost or the worker shuts down;
// context.Cause(ctx) says which. Returning nil completes the task; an error
// fails it with the error's text. A panic fails it with the panic value and
// stack, and the worker carries on.
type HandlerFunc func(ctx context.Context, t *Task) error

// HandleFunc registers a handler whose args are decoded from JSON into T.
// The running task is available through [TaskFromContext].
func HandleFunc[T any](w *Worker, name string, fn func(ctx context.Context, args T) error, opts ...HandlerOption) {
	w.Handle(name, func(ctx context.Context, t *Task) error {
		var args T
		if err := json.Unmarshal(t.Args, &args); err != nil {
			return fmt.Errorf("tasking: decode args of %q into %T: %w", name, args, err)
		}
		return fn(ctx, args)
	}, opts...)
}

// TaskArgs is implemented by args types that name their task, so that the
// name a task is dispatched under and the args type its handler decodes
// cannot drift apart (a typo in a name would leave the task waiting for
// ever, and every later task on its resources behind it). TaskName must not
// depend on the value: it is called on the zero value too.
type TaskArgs interface {
	TaskName() string
}

// HandleArgs registers fn as the handler of T's task name, with args decoded
// into T. Dispatch such tasks with [DispatchArgs].
func HandleArgs[T TaskArgs](w *Worker, fn func(ctx context.Context, args T) error, opts ...HandlerOption) {
	var zero T
	HandleFunc(w, zero.TaskName(), fn, opts...)
}

// HandlerOption configures one handler.
type HandlerOption func(*handler)

// HandlerTimeout gives every run of the handler a deadline: its context is
// canceled with cause [ErrTimeout] after d, and the task ends failed with
// "timeout". A task's own [Timeout] overrides it. Default: none.
func HandlerTimeout(d time.Duration) HandlerOption {
	return func(h *handler) { h.timeout = d }
}

type handler struct {
	fn      HandlerFunc
	timeout time.Duration
	retry   *RetryPolicy
}

type taskKey struct{}

// TaskFromContext returns the task a handler is running, or nil outside a
// handler.
func TaskFromContext(ctx context.Context) *Task {
	t, _ := ctx.Value(taskKey{}).(*Task)
	return t
}

// WorkerOption configures a Worker.
type WorkerOption func(*workerConfig)

type workerConfig struct {
	slots    int
	conns    int
	name     string
	poll     time.Duration
	grace    time.Duration
	ttl      time.Duration
	ahead    int // WithClaimAhead
	aheadSet bool

	middleware []Middleware // WithMiddleware
	onError    ErrorHandler // WithErrorHandler
	retention  *Retention   // nil: none
	periodic   []periodic

	siblingWait time.Duration  // see awaitSiblings; tests lengthen it
	aheadWait   time.Duration  // see ahead.go; tests change it
	afterClaim  func()         // tests: runs between a step's claim and the start of its tasks
	onStep      func(outs int) // tests: runs before each step with the outcomes it writes
	onChain     func(n int)    // tests: runs when a step admits n chained tasks (chain.go)
	skipBeat    func() bool    // tests: true skips a heartbeat (and its cleanup)
}

// WithSlots sets how many handlers run at once. Default: 16.
func WithSlots(n int) WorkerOption { return func(c *workerConfig) { c.slots = n } }

// WithConnections sets how many PostgreSQL connections the worker uses,
// each of its own (not from the client's pool), each running the worker's
// steps (finish, hand-off, claim) side by side. The first also carries the
// heartbeats, the PostgreSQL locker's session locks and LISTEN. One is
// enough for a worker with few slots; a second lets a worker with many
// slots keep a second database core busy, but in a fleet of many worker
// processes it only adds sessions that contend (mix, 16 processes × 5
// slots on 2 cores: about 1,450 tasks/s with one, 750 with two).
// Default: 2 with 32 slots or more, else 1.
func WithConnections(n int) WorkerOption { return func(c *workerConfig) { c.conns = n } }

// manySlots is where the default of WithConnections goes from 1 to 2.
const manySlots = 32

// WithWorkerName names the worker in the workers table and in logs.
// Default: "<hostname>-<pid>".
func WithWorkerName(name string) WorkerOption { return func(c *workerConfig) { c.name = name } }

// WithPollInterval sets how often the fleet looks for tasks when no wake-up
// arrives: each worker polls every interval times the number of live
// workers (±20% jitter), so the fleet's poll rate does not grow with its
// size. Wake-ups normally make polling unneeded; it only bounds the latency
// after a lost one. Default: 1s.
func WithPollInterval(d time.Duration) WorkerOption { return func(c *workerConfig) { c.poll = d } }

// WithShutdownGrace sets how long Run lets running handlers finish after its
// context is done, or after a Stop whose context has no deadline: handlers
// still running shortly before its end are canceled (cause [ErrShutdown]),
// and those that do not return by its end are abandoned (see
// [Worker.Stop]). Default: 10s.
func WithShutdownGrace(d time.Duration) WorkerOption { return func(c *workerConfig) { c.grace = d } }

// WithClaimAhead sets how many tasks a worker may claim beyond its free
// slots, to start as its handlers return. A step (one statement and
// commit, and one locker call) costs about the same for one task as for
// thirty, so a worker with few slots spends a step on few tasks; claiming
// ahead lets its steps carry more (mix, 16 processes × 5 slots on 2
// cores: docs/design.md §6). The worker claims ahead only while its
// handlers return faster than a step takes, and no more than its slots run
// in that time, so a task claimed ahead waits less than a step would take
// to claim it; one that has not started 50 ms after its claim (a handler
// ran longer than the worker measured) is put back to waiting, with its
// place in line, as are those still waiting at shutdown. A task claimed
// ahead is running for the database (started_at is its claim) and holds
// its locks while it waits. 0 turns it off, and chains with it: a step
// that claims a task naming one resource, exclusively, also claims up to
// 32 tasks queued right behind it that name only that resource, and each
// starts, in the slot of the one before it, once that one's final state
// is written (docs/design.md §6, "Chains"); a line of short tasks then
// costs one small statement per hand-off, not a step. Default: enough for
// a step to carry 64 tasks (64 minus the slots; none from 64 slots up),
// and chains on.
func WithClaimAhead(n int) WorkerOption {
	return func(c *workerConfig) { c.ahead, c.aheadSet = n, true }
}

// WithHeartbeatTTL sets after how long without a heartbeat a worker counts
// as gone. Heartbeats are sent every TTL/3. Default: 30s.
func WithHeartbeatTTL(d time.Duration) WorkerOption { return func(c *workerConfig) { c.ttl = d } }

// Worker runs the tasks of a Client's queue with a fixed number of slots.
// Register handlers with Handle or HandleFunc, then call Run.
type Worker struct {
	c        *Client
	cfg      workerConfig
	mu       sync.Mutex
	handlers map[string]handler
	running  bool
	id       int64
	stop     func(context.Context) // set while running: asks Run to shut down
	done     chan struct{}         // closed when the current Run returns
	runErr   error                 // what the last Run returned
}

// NewWorker returns a worker for c's queue.
func NewWorker(c *Client, opts ...WorkerOption) *Worker {
	host, _ := os.Hostname()
	cfg := workerConfig{
		slots: 16,
		name:  fmt.Sprintf("%s-%d", host, os.Getpid()),
		poll:  time.Second,
		grace: 10 * time.Second,
		ttl:   30 * time.Second,

		siblingWait: siblingWait,
		aheadWait:   aheadWait,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.conns == 0 {
		cfg.conns = 1
		if cfg.slots >= manySlots {
			cfg.conns = 2
		}
	}
	if !cfg.aheadSet {
		cfg.ahead = max(aheadTarget-cfg.slots, 0)
	}
	return &Worker{c: c, cfg: cfg, handlers: make(map[string]handler)}
}

// Handle registers the handler for tasks named name. It panics on an
// invalid name, a nil handler, a name registered twice, a negative timeout,
// an invalid retry policy,
// or a running worker, as these are programming errors.
func (w *Worker) Handle(name string, fn HandlerFunc, opts ...HandlerOption) {
	if err := checkName("task name", name, MaxTaskNameLen); err != nil {
		panic(err)
	}
	if fn == nil {
		panic("tasking: nil handler for " + name)
	}
	h := handler{fn: fn}
	for _, o := range opts {
		o(&h)
	}
	if h.timeout < 0 {
		panic(fmt.Sprintf("tasking: negative timeout %v for handler %s", h.timeout, name))
	}
	if h.retry != nil {
		if err := h.retry.check(); err != nil {
			panic(fmt.Sprintf("tasking: handler %s: %v", name, err))
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.running {
		panic("tasking: Handle called on a running worker")
	}
	if _, dup := w.handlers[name]; dup {
		panic("tasking: handler for " + name + " registered twice")
	}
	w.handlers[name] = h
}

// ID returns the id of the running worker instance in the workers table,
// or 0 when the worker is not running.
func (w *Worker) ID() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.id
}

// Run registers the worker, runs tasks until ctx is done or Stop is called,
// then shuts down: it stops admitting, lets running handlers finish for the
// shutdown grace, cancels the rest (they end failed with [ErrShutdown]),
// writes every final state and releases every lock. It returns nil after a
// clean shutdown.
//
// Handlers must return once their context is canceled: one that has not
// returned by the end of the grace is abandoned (see [Worker.Stop]), and Run
// returns an error matching [ErrHandlersAbandoned].
func (w *Worker) Run(ctx context.Context) (err error) {
	if err := w.validate(); err != nil {
		return err
	}
	runCtx, cancelRun := context.WithCancel(ctx)
	defer cancelRun()
	var stopMu sync.Mutex
	var stopCtx context.Context // the deadline Stop gave, if it was called
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		return errors.New("tasking: worker is already running")
	}
	w.running = true
	w.done = make(chan struct{})
	w.stop = func(ctx context.Context) {
		stopMu.Lock()
		stopCtx = ctx
		stopMu.Unlock()
		cancelRun()
	}
	handlers := maps.Clone(w.handlers)
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.running, w.id, w.stop = false, 0, nil
		w.runErr = err
		close(w.done)
		w.mu.Unlock()
	}()

	c := w.c
	r := newRun(w, handlers)
	defer func() {
		for _, l := range r.lanes {
			l.close(context.WithoutCancel(ctx))
		}
	}()
	// Everything the worker does goes through its one connection, the
	// schema check too: a worker process needs no other.
	if err := c.checkSchemaOn(ctx, r.conn); err != nil {
		return err
	}
	if err := r.register(ctx); err != nil {
		if runCtx.Err() != nil {
			return nil // asked to stop before it was up
		}
		return err
	}
	w.mu.Lock()
	w.id = r.id
	w.mu.Unlock()
	defer r.retire()
	r.registered.Store(true)
	r.onListening() // the first open, for the schema check, could not tell the peers

	lock, err := c.locker.Open(ctx, LockSessionConfig{
		Worker: r.id, Pool: c.pool, Schema: c.schema, Logger: r.log, OnLost: r.lost, conn: r.conn,
	})
	if err != nil {
		if runCtx.Err() != nil {
			return nil // asked to stop before it was up
		}
		return fmt.Errorf("tasking: open %s locker: %w", c.locker.Kind(), err)
	}
	r.lock = lock
	r.log.Info("tasking: worker started", "slots", w.cfg.slots, "locker", c.locker.Kind())
	return r.serve(runCtx, func() context.Context {
		stopMu.Lock()
		defer stopMu.Unlock()
		parent := context.Background()
		if stopCtx != nil {
			if _, ok := stopCtx.Deadline(); ok || stopCtx.Err() != nil {
				return stopCtx
			}
			parent = stopCtx // no deadline: the configured grace applies
		}
		grace, cancel := context.WithTimeout(parent, w.cfg.grace)
		context.AfterFunc(grace, cancel)
		return grace
	})
}

// Stop shuts down the running Run like canceling its context does, but with
// ctx's deadline as the grace: running handlers may finish until shortly
// before it, then they are canceled (cause [ErrShutdown]), and those that
// still have not returned by the deadline are abandoned: their tasks fail
// with a reason that says so, their locks are released, and Stop (like Run)
// returns an error matching [ErrHandlersAbandoned] that names them. An
// abandoned handler's goroutine may still be running when Stop returns.
// A ctx without a deadline gets the configured [WithShutdownGrace]; a ctx
// that is already done is a hard stop (handlers are canceled at once). Stop
// returns what Run returned, by the deadline plus the final write of the
// task states; it does nothing when the worker is not running.
func (w *Worker) Stop(ctx context.Context) error {
	w.mu.Lock()
	stop, done := w.stop, w.done
	w.mu.Unlock()
	if stop == nil {
		return nil
	}
	stop(ctx)
	<-done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.runErr
}

func (w *Worker) validate() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case w.c == nil:
		return inputErr("client", "nil *Client")
	case len(w.handlers) == 0:
		return ErrNoHandlers
	case w.cfg.slots < 1:
		return inputErr("slots", "%d, need at least 1", w.cfg.slots)
	case w.cfg.conns < 1 || w.cfg.conns > w.cfg.slots:
		return inputErr("connections", "%d, need 1 to the number of slots (%d)", w.cfg.conns, w.cfg.slots)
	case w.cfg.poll <= 0:
		return inputErr("poll interval", "%v, need > 0", w.cfg.poll)
	case w.cfg.grace < 0:
		return inputErr("shutdown grace", "%v, need >= 0", w.cfg.grace)
	case w.cfg.ttl <= 0:
		return inputErr("heartbeat TTL", "%v, need > 0", w.cfg.ttl)
	case w.cfg.ahead < 0:
		return inputErr("claim ahead", "%d, need >= 0", w.cfg.ahead)
	case w.cfg.name == "":
		return inputErr("worker name", "empty")
	case w.cfg.retention != nil && w.cfg.retention.validate() != nil:
		return w.cfg.retention.validate()
	}
	return checkPeriodic(w.cfg.periodic)
}
