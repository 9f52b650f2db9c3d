package tasking

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tasking-go/tasking/internal/admit"
)

// HandlerFunc runs one task. Its context is canceled when the task is
// canceled, its locks are lost or the worker shuts down;
// context.Cause(ctx) says which. Returning nil completes the task; an error
// fails it with the error's text. A panic fails it with the panic value and
// stack, and the worker carries on.
type HandlerFunc func(ctx context.Context, t *Task) error

// HandleFunc registers a handler whose args are decoded from JSON into T.
// The running task is available through [TaskFromContext].
func HandleFunc[T any](w *Worker, name string, fn func(ctx context.Context, args T) error) {
	w.Handle(name, func(ctx context.Context, t *Task) error {
		var args T
		if err := json.Unmarshal(t.Args, &args); err != nil {
			return fmt.Errorf("tasking: decode args of %q into %T: %w", name, args, err)
		}
		return fn(ctx, args)
	})
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
	slots int
	name  string
	poll  time.Duration
	grace time.Duration
	ttl   time.Duration
}

// WithSlots sets how many handlers run at once. Default: 16.
func WithSlots(n int) WorkerOption { return func(c *workerConfig) { c.slots = n } }

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
// context is done before canceling them (cause [ErrShutdown]). Default: 10s.
func WithShutdownGrace(d time.Duration) WorkerOption { return func(c *workerConfig) { c.grace = d } }

// WithHeartbeatTTL sets after how long without a heartbeat a worker counts
// as gone. Heartbeats are sent every TTL/3. Default: 30s.
func WithHeartbeatTTL(d time.Duration) WorkerOption { return func(c *workerConfig) { c.ttl = d } }

// Worker runs the tasks of a Client's queue with a fixed number of slots.
// Register handlers with Handle or HandleFunc, then call Run.
type Worker struct {
	c        *Client
	cfg      workerConfig
	mu       sync.Mutex
	handlers map[string]HandlerFunc
	running  bool
	id       int64
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
	}
	for _, o := range opts {
		o(&cfg)
	}
	return &Worker{c: c, cfg: cfg, handlers: make(map[string]HandlerFunc)}
}

// Handle registers the handler for tasks named name. It panics on an
// invalid name, a nil handler, a name registered twice, or a running worker,
// as these are programming errors.
func (w *Worker) Handle(name string, h HandlerFunc) {
	if err := checkName("task name", name, MaxTaskNameLen); err != nil {
		panic(err)
	}
	if h == nil {
		panic("tasking: nil handler for " + name)
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

// Run registers the worker, runs tasks until ctx is done, then shuts down:
// it stops admitting, lets running handlers finish for the shutdown grace,
// cancels the rest (they end failed with [ErrShutdown]), writes every final
// state and releases every lock. It returns nil after a clean shutdown.
func (w *Worker) Run(ctx context.Context) error {
	if err := w.validate(); err != nil {
		return err
	}
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		return errors.New("tasking: worker is already running")
	}
	w.running = true
	handlers := make(map[string]HandlerFunc, len(w.handlers))
	for k, v := range w.handlers {
		handlers[k] = v
	}
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.running, w.id = false, 0
		w.mu.Unlock()
	}()

	c := w.c
	if err := c.checkSchema(ctx); err != nil {
		return err
	}
	id, err := w.register(ctx)
	if err != nil {
		return err
	}
	w.mu.Lock()
	w.id = id
	w.mu.Unlock()
	r := newRun(w, id, handlers)
	defer r.retire()

	r.lock, err = c.locker.Open(ctx, LockSessionConfig{
		Worker: id, Pool: c.pool, Schema: c.schema, Logger: r.log, OnLost: r.lost,
	})
	if err != nil {
		return fmt.Errorf("tasking: open %s locker: %w", c.locker.Kind(), err)
	}
	r.log.Info("tasking: worker started", "slots", w.cfg.slots, "locker", c.locker.Kind())
	r.serve(ctx)
	return nil
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
	case w.cfg.poll <= 0:
		return inputErr("poll interval", "%v, need > 0", w.cfg.poll)
	case w.cfg.grace < 0:
		return inputErr("shutdown grace", "%v, need >= 0", w.cfg.grace)
	case w.cfg.ttl <= 0:
		return inputErr("heartbeat TTL", "%v, need > 0", w.cfg.ttl)
	case w.cfg.name == "":
		return inputErr("worker name", "empty")
	}
	return nil
}

// register adds the worker to the workers table, refusing while live workers
// use another kind of locker. The check and the insert hold a transaction
// lock so two workers of different kinds cannot both pass.
func (w *Worker) register(ctx context.Context) (int64, error) {
	c := w.c
	host, _ := os.Hostname()
	var id int64
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", hashKey("tasking/registry", c.schema, "")); err != nil {
			return err
		}
		var kind, name string
		err := tx.QueryRow(ctx, c.q.liveKind, c.locker.Kind(), w.cfg.ttl.String()).Scan(&kind, &name)
		if err == nil {
			return fmt.Errorf("%w: worker %q uses %q, this one %q", ErrLockerMismatch, name, kind, c.locker.Kind())
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		return tx.QueryRow(ctx, c.q.register, w.cfg.name, host, os.Getpid(), c.locker.Kind()).Scan(&id)
	})
	if err != nil && !errors.Is(err, ErrLockerMismatch) {
		err = fmt.Errorf("tasking: register worker: %w", err)
	}
	return id, err
}

// run is the state of one Worker.Run.
type run struct {
	w        *Worker
	c        *Client
	id       int64
	log      *slog.Logger
	handlers map[string]HandlerFunc
	names    []string // handled task names, for the claim of tasks without resources
	lock     LockSession

	// base parents every handler context; canceling it cuts off handlers at
	// the end of the shutdown grace.
	base      context.Context
	cancelAll context.CancelCauseFunc

	mu     sync.Mutex
	active map[int64]*activeTask

	sendMu  sync.RWMutex // guards closed and sends on results
	closed  bool         // results no longer accepted
	results chan outcome

	wake     chan struct{}
	live     atomic.Int64 // live workers in the fleet, from the last heartbeat
	handlerW sync.WaitGroup
	finished chan struct{} // closed when the finisher has written everything

	// scheduler scratch, reused between cycles
	taken   *admit.Taken
	entries []admit.Entry
	cands   []admit.Entry
}

type activeTask struct {
	task   *Task
	cancel context.CancelCauseFunc
	names  bool // holds grants
	lost   bool // grants lost: fail whatever the handler returns
}

func newRun(w *Worker, id int64, handlers map[string]HandlerFunc) *run {
	base, cancelAll := context.WithCancelCause(context.Background())
	names := make([]string, 0, len(handlers))
	for n := range handlers {
		names = append(names, n)
	}
	return &run{
		names: names,
		w:     w, c: w.c, id: id, handlers: handlers,
		log:       w.c.log.With("worker", w.cfg.name, "worker_id", id),
		base:      base,
		cancelAll: cancelAll,
		active:    make(map[int64]*activeTask),
		results:   make(chan outcome, 4*w.cfg.slots),
		wake:      make(chan struct{}, 1),
		finished:  make(chan struct{}),
		taken:     admit.NewTaken(),
	}
}

// signal asks the scheduler for another cycle.
func (r *run) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// serve runs the worker until ctx is done, then shuts it down.
func (r *run) serve(ctx context.Context) {
	bg, stopBg := context.WithCancel(context.WithoutCancel(ctx))
	var bgW sync.WaitGroup
	bgW.Add(3)
	go func() { defer bgW.Done(); _ = r.c.bus.listen(bg, r.signal) }()
	go func() { defer bgW.Done(); r.heartbeat(bg) }()
	go func() { defer bgW.Done(); r.finisher() }()

	r.schedule(ctx)

	// Shutdown: no more admissions. Let handlers finish within the grace,
	// then cut them off.
	if !waitGroupTimeout(&r.handlerW, r.w.cfg.grace) {
		r.log.Warn("tasking: shutdown grace over; canceling running handlers")
		r.cancelAll(ErrShutdown)
		if !waitGroupTimeout(&r.handlerW, hardStopWait) {
			r.log.Error("tasking: handlers ignore cancellation; leaving their tasks running for cleanup")
		}
	}
	r.sendMu.Lock()
	r.closed = true
	close(r.results)
	r.sendMu.Unlock()
	<-r.finished
	stopBg()
	bgW.Wait()
}

// hardStopWait bounds how long shutdown waits for handlers that were canceled.
const hardStopWait = 5 * time.Second

// retire closes the lock session and removes the worker's row.
func (r *run) retire() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r.cancelAll(ErrShutdown)
	if r.lock != nil {
		if err := r.lock.Close(ctx); err != nil {
			r.log.Warn("tasking: close locker", "err", err)
		}
	}
	if _, err := r.c.pool.Exec(ctx, r.c.q.retire, r.id); err != nil {
		r.log.Warn("tasking: remove worker row", "err", err)
	}
	r.log.Info("tasking: worker stopped")
}

// beat records a heartbeat and learns how many workers are live.
func (r *run) beat(ctx context.Context) {
	var live int64
	err := r.c.pool.QueryRow(ctx, r.c.q.beat, r.id, r.w.cfg.ttl.String()).Scan(&live)
	switch {
	case err != nil && ctx.Err() == nil:
		r.log.Warn("tasking: heartbeat failed", "err", err)
	case err == nil:
		r.live.Store(max(live, 1))
	}
}

// pollEvery is this worker's fallback poll interval: the configured one
// times the number of live workers, so the fleet as a whole polls about once
// per interval however many workers it has (a fleet of 150 workers polling
// every 10 ms each saturated Pulp's database).
func (r *run) pollEvery() time.Duration {
	return jitter(r.w.cfg.poll * time.Duration(max(r.live.Load(), 1)))
}

func (r *run) heartbeat(ctx context.Context) {
	r.beat(ctx)
	t := time.NewTicker(r.w.cfg.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.beat(ctx)
	}
}

// lost is the locker's OnLost: cancel the handlers whose grants are gone.
func (r *run) lost(owners []Owner, cause error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, o := range owners {
		if a := r.active[o.Task]; a != nil && o.Worker == r.id {
			a.lost = true
			a.cancel(cause)
		}
	}
	r.log.Warn("tasking: locks lost; canceled their tasks", "tasks", len(owners), "cause", cause)
}

func waitGroupTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}
