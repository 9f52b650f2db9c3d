package tasking

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/tasking-go/tasking/internal/fleet"
)

// run is the state of one Worker.Run: the worker's connection, its lock
// session, the handlers running now, and the outcomes waiting to be written.
// A task's way through it: step.go claims it (and gets its locks); ahead.go
// holds it if it was claimed ahead of a free slot, chain.go if it was
// claimed behind the task before it on its line; handler.go runs its
// handler and queues the outcome; step.go writes the final state and hands
// its resources on in the next step, or chain.go's pass hands them to the
// task chained behind it; wake.go and wake_peers.go bring the step loop
// back when there is work; heartbeat.go keeps the worker's row alive and
// cleans up after dead workers.
type run struct {
	w        *Worker
	c        *Client
	id       int64
	self     fleet.Worker
	fleet    *fleet.Store
	conn     *workerConn   // the first lane's: heartbeats, LISTEN, the PostgreSQL locker's session
	lanes    []*workerConn // one step loop each; lanes[0] is conn
	log      *slog.Logger
	handlers map[string]handler
	names    []string // handled task names
	policies string   // the handlers' retry policies by name, JSON (see handlerPolicies)
	lock     LockSession
	progress *progressFlusher // progress reports to write (progress.go)

	// base parents every handler context; canceling it cuts off handlers at
	// the end of the shutdown grace.
	base      context.Context
	cancelAll context.CancelCauseFunc

	mu       sync.Mutex
	active   map[int64]*activeTask // handler running
	reserved int                   // slots a step in flight may fill
	ahead    []aheadTask           // claimed ahead, waiting for a slot (ahead.go)
	// launching: taken from ahead for a slot, not yet active.
	launching int
	// Moving averages of how long handlers run and steps take (ahead.go).
	handlerAvg, stepAvg time.Duration
	passAvg             time.Duration // a chain's hand-off (chain.go)
	draining            bool          // shutdown: no more reservations (see serve)
	// While the locker is out of reach (since lockDownSince), steps claim
	// only tasks that need no locks, and probe it again at lockProbeAt.
	lockDownSince, lockProbeAt time.Time
	canceled                   map[int64]time.Time // cancels that arrived before their task started here
	orphans                    map[int64]int32     // running here per the database, but unknown (epoch+1)
	unsent                     map[int64]struct{}  // handler returned, final state not yet written

	results       chan outcome  // from handlers to the step loop
	batches       atomic.Uint64 // steps that started handlers, numbered
	sendMu        sync.RWMutex  // guards closed and sends on results
	closed        bool
	wake          chan struct{}
	wakes         atomic.Uint64   // wake-ups asked for so far (see loop)
	unwritten     atomic.Int64    // outcomes given up on at shutdown
	wakeup        coalescer       // wake-ups this worker sends to the others
	peers         peerTable       // which other workers are hungry (wake_peers.go)
	hungerSay     coalescer       // this worker's hunger messages
	msgCtx        context.Context // for messages to the other workers; canceled at shutdown
	stopMsgs      context.CancelFunc
	registered    atomic.Bool  // id and log are set (register): peer messages may go out
	live          atomic.Int64 // live workers in the fleet, from the last heartbeat
	beatLog       failureLog   // heartbeats and cleanups that keep failing are logged once, then summarised
	cleanLog      failureLog
	unhandledSaid map[string]time.Time // names reported by warnUnhandled, and when
	handlerW      sync.WaitGroup
	retaining     atomic.Bool    // a retention purge runs (retention.go)
	retainW       sync.WaitGroup // the retention purge's goroutine
}

type activeTask struct {
	batch     uint64 // the step that started it (see awaitSiblings)
	task      *Task
	cancel    context.CancelCauseFunc
	names     bool // holds grants
	lost      bool // grants lost: fail whatever the handler returns
	abandoned bool // given up at shutdown: its outcome was written for it

	span  trace.Span // the run's span, nil when not tracing
	began time.Time
}

// ran is how long the handler has run.
func (a *activeTask) ran() time.Duration { return time.Since(a.began) }

func newRun(w *Worker, handlers map[string]handler) *run {
	base, cancelAll := context.WithCancelCause(context.Background())
	names := make([]string, 0, len(handlers))
	for n, h := range handlers {
		names = append(names, n)
		h.fn = chain(h.fn, w.cfg.middleware) // handlers is this run's copy
		handlers[n] = h
	}
	host, _ := os.Hostname()
	c := w.c
	r := &run{
		w: w, c: c, handlers: handlers, names: names, policies: handlerPolicies(handlers),
		self:          fleet.Worker{Name: w.cfg.name, Host: host, PID: os.Getpid(), Locker: c.locker.Kind(), Handles: names, Slots: w.cfg.slots},
		conn:          newWorkerConn(c.pool, "tasking worker"),
		base:          base,
		cancelAll:     cancelAll,
		active:        make(map[int64]*activeTask),
		canceled:      make(map[int64]time.Time),
		unhandledSaid: make(map[string]time.Time),
		unsent:        make(map[int64]struct{}),
		results:       make(chan outcome, 4*w.cfg.slots),
		wake:          make(chan struct{}, 1),
		log:           c.log.With("worker", w.cfg.name),
		progress:      newProgressFlusher(),
	}
	r.msgCtx, r.stopMsgs = context.WithCancel(context.Background())
	r.lanes = []*workerConn{r.conn}
	for i := 1; i < w.cfg.conns; i++ {
		r.lanes = append(r.lanes, newWorkerConn(c.pool, "tasking worker"))
	}
	r.fleet = fleet.New(r.conn, c.schema, hashKey("tasking/registry", c.schema, ""), hashKey("tasking/cleanup", c.schema, ""))
	r.conn.channel = c.bus.listenChannel()
	r.conn.onNotify = r.onMessage
	r.conn.onReopen = r.onListening
	return r
}

// register adds the worker to the workers table (see fleet.Register) and
// names its connection after it.
func (r *run) register(ctx context.Context) error {
	id, taken, err := r.fleet.Register(ctx, r.self, r.w.cfg.ttl)
	switch {
	case errors.Is(err, fleet.ErrKindMismatch):
		return fmt.Errorf("%w: %v", ErrLockerMismatch, err)
	case errors.Is(err, fleet.ErrNameInUse):
		return fmt.Errorf("%w: %v", ErrWorkerNameInUse, err)
	case err != nil:
		return fmt.Errorf("tasking: register worker: %w", err)
	}
	r.id = id
	r.log = r.log.With("worker_id", id)
	r.beatLog = failureLog{log: r.log, what: "heartbeat"}
	r.cleanLog = failureLog{log: r.log, what: "cleanup of dead workers"}
	for _, l := range r.lanes {
		l.setAppName(ctx, workerAppName(r.c.schema, id))
	}
	if len(taken) > 0 {
		r.log.Warn("tasking: took over a crashed instance with the same name", "instances", taken)
		r.freeGrants(ctx, taken)
	}
	return nil
}

// workerAppName names a worker's connection in pg_stat_activity:
// "tasking worker <id> <schema hash>". Worker ids are unique only within a
// schema, and application_name is cut at 63 bytes, hence the short hash.
// Cleanup ends the connections of dead workers by this name, which frees
// their PostgreSQL locks.
func workerAppName(schema string, worker int64) string {
	return fmt.Sprintf("tasking worker %d %016x", worker, uint64(hashKey("tasking/app", schema, "")))
}

// signal asks the step loop for another step.
func (r *run) signal() {
	r.wakes.Add(1)
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// serve runs the worker until ctx is done, then shuts it down: the step loop
// stops claiming, handlers may finish until the context grace returns is
// done, then they are canceled; the loop writes every final state before it
// returns.
func (r *run) serve(ctx context.Context, grace func() context.Context) error {
	bg, stopBg := context.WithCancel(context.WithoutCancel(ctx))
	var bgW sync.WaitGroup
	bgW.Add(4)
	go func() { defer bgW.Done(); r.flushProgress(bg) }()
	go func() { defer bgW.Done(); _ = r.c.bus.listen(bg, r) }()
	go func() {
		defer bgW.Done()
		r.conn.listen(bg, func(ctx context.Context, err error) {
			r.log.Warn("tasking: LISTEN on the worker connection failed; retrying", "err", err)
			sleepCtx(ctx, jitter(time.Second))
		})
	}()
	go func() { defer bgW.Done(); r.heartbeat(bg) }()
	for _, p := range r.w.cfg.periodic {
		bgW.Add(1)
		go func() { defer bgW.Done(); r.periodicLoop(bg, p) }()
	}

	var loops sync.WaitGroup
	for _, l := range r.lanes {
		loops.Add(1)
		go func() { defer loops.Done(); r.loop(ctx, l) }()
	}

	<-ctx.Done()
	// No step may start handlers once the wait for them has begun: take no
	// more reservations, and let the steps that hold some start theirs.
	g := grace()
	r.endClaims(g)
	// Shutdown: the loops claim no more. Handlers may finish within the
	// grace; then they are canceled, and those that still do not return are
	// abandoned.
	abandoned := r.drainHandlers(g)
	r.closeResults()
	loops.Wait()
	stopBg()
	bgW.Wait()
	// Messages to the other workers go out on the worker's connection,
	// which retire closes: none may be in flight then.
	r.stopMsgs()
	r.wakeup.stop()
	r.hungerSay.stop()
	var errs []error
	if len(abandoned) > 0 {
		errs = append(errs, fmt.Errorf("%w: tasks %v did not return after their context was canceled", ErrHandlersAbandoned, abandoned))
	}
	if n := r.unwritten.Load(); n > 0 {
		errs = append(errs, fmt.Errorf("tasking: final states of %d tasks not written at shutdown; the cleanup of dead workers settles them", n))
	}
	return errors.Join(errs...)
}

// endClaims stops reservations of slots and waits (until shortly before
// grace's deadline) for the steps that hold some: they start their
// handlers before they give the slots back.
func (r *run) endClaims(grace context.Context) {
	deadline, ok := grace.Deadline()
	if !ok {
		deadline = time.Now().Add(stepTimeout)
	}
	r.mu.Lock()
	r.draining = true
	for r.reserved > 0 && time.Now().Before(deadline) {
		r.mu.Unlock()
		time.Sleep(time.Millisecond)
		r.mu.Lock()
	}
	// Tasks claimed ahead do not start any more: the step loops put them
	// back to waiting.
	r.dropAhead(nil, false)
	r.mu.Unlock()
	r.signal()
}

// drainHandlers waits for the handlers until shortly before grace's
// deadline, cancels them (cause ErrShutdown), waits until a little closer
// to it, and abandons the ones still running: their tasks fail with
// reasonAbandoned. The margins leave time for the final write, so that a
// Stop returns by its deadline. A grace that is already over (a hard stop)
// gives canceled handlers a moment to return.
func (r *run) drainHandlers(grace context.Context) []int64 {
	deadline, ok := grace.Deadline()
	if !ok || grace.Err() != nil && deadline.After(time.Now()) {
		deadline = time.Now()
	}
	margin := min(time.Until(deadline)/5, time.Second)
	if waitGroupUntil(deadline.Add(-margin), &r.handlerW) {
		return nil
	}
	r.log.Warn("tasking: shutdown grace over; canceling running handlers")
	r.cancelAll(ErrShutdown)
	until := deadline.Add(-margin / 2)
	if time.Until(until) < hardSettle {
		until = time.Now().Add(hardSettle)
	}
	if waitGroupUntil(until, &r.handlerW) {
		return nil
	}
	return r.abandon()
}

// hardSettle is how long canceled handlers get to return when the grace is
// already over.
const hardSettle = 100 * time.Millisecond

// reasonAbandoned is the failure of a task whose handler was abandoned.
var reasonAbandoned = ErrShutdown.Error() + ": handler abandoned at shutdown (it did not return after its context was canceled)"

// abandon fails the tasks of the handlers still running: the step loops
// write them, and release their locks, before Run returns.
func (r *run) abandon() []int64 {
	r.mu.Lock()
	var outs []outcome
	var ids []int64
	for id, a := range r.active {
		a.abandoned = true
		delete(r.active, id)
		r.unsent[id] = struct{}{}
		outs = append(outs, outcome{task: a.task, state: StateFailed, err: reasonAbandoned, owner: a.names, ran: a.ran(),
			progress: a.task.live.endProgress()})
		r.progress.forget(a.task)
		endSpan(a.span, ErrHandlersAbandoned)
		ids = append(ids, id)
	}
	r.mu.Unlock()
	slices.Sort(ids)
	r.log.Error("tasking: handlers ignore cancellation; abandoning them and failing their tasks", "tasks", ids)
	for _, o := range outs {
		r.failed(context.WithValue(context.Background(), taskKey{}, o.task), o.task,
			fmt.Errorf("%w: task %d did not return after its context was canceled", ErrHandlersAbandoned, o.task.ID))
		r.send(o)
	}
	return ids
}

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
	if err := r.fleet.Retire(ctx, r.id); err != nil {
		r.log.Warn("tasking: remove worker row", "err", err)
	}
	for _, l := range r.lanes {
		l.close(ctx)
	}
	r.log.Info("tasking: worker stopped")
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
	if len(r.ahead) > 0 {
		r.dropAhead(owners, true)
		defer r.signal() // the step loop puts them back
	}
	r.log.Warn("tasking: locks lost; canceled their tasks", "tasks", len(owners), "cause", cause)
}

// cancelTask cancels a running handler whose task was canceled. A cancel
// can overtake the start of its task on this worker (it raced the claim);
// it is kept for a while so start can apply it.
func (r *run) cancelTask(id int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if a := r.active[id]; a != nil {
		a.cancel(ErrCanceled)
		return
	}
	now := time.Now()
	for k, at := range r.canceled {
		if now.Sub(at) > time.Minute {
			delete(r.canceled, k)
		}
	}
	r.canceled[id] = now
}

// waitGroupUntil waits for wg until t; it reports whether wg was done.
func waitGroupUntil(t time.Time, wg *sync.WaitGroup) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-done:
		return true
	case <-timer.C:
		return false
	}
}
