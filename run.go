package tasking

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tasking-go/tasking/internal/admit"
	"github.com/tasking-go/tasking/internal/fleet"
)

// run is the state of one Worker.Run.
type run struct {
	w        *Worker
	c        *Client
	id       int64
	self     fleet.Worker
	fleet    *fleet.Store
	log      *slog.Logger
	handlers map[string]handler
	names    []string // handled task names, for the claim of tasks without resources
	lock     LockSession

	// base parents every handler context; canceling it cuts off handlers at
	// the end of the shutdown grace.
	base      context.Context
	cancelAll context.CancelCauseFunc

	mu        sync.Mutex
	active    map[int64]*activeTask
	finishing map[int64]struct{}  // handler returned, final state not yet written
	canceled  map[int64]time.Time // cancels that arrived before their task started here
	orphans   map[int64]int32     // running here per the database, but unknown (epoch+1)

	sendMu   sync.RWMutex // guards closed and sends on results
	closed   bool         // results no longer accepted
	draining atomic.Bool  // shutting down: the finisher writes what is left
	results  chan outcome

	wake     chan struct{}
	live     atomic.Int64 // live workers in the fleet, from the last heartbeat
	handlerW sync.WaitGroup
	finished chan struct{} // closed when the finisher has written everything

	// scheduler scratch, reused between cycles
	taken   *admit.Taken
	entries []admit.Entry
	cands   []admit.Entry
	deep    []admit.Entry // candidates past the first page, kept between cycles (see fillDeep)
	deepAt  time.Time
}

type activeTask struct {
	task   *Task
	cancel context.CancelCauseFunc
	names  bool // holds grants
	lost   bool // grants lost: fail whatever the handler returns
}

func newRun(w *Worker, handlers map[string]handler) *run {
	base, cancelAll := context.WithCancelCause(context.Background())
	names := make([]string, 0, len(handlers))
	for n := range handlers {
		names = append(names, n)
	}
	host, _ := os.Hostname()
	c := w.c
	return &run{
		w: w, c: c, handlers: handlers, names: names,
		self:      fleet.Worker{Name: w.cfg.name, Host: host, PID: os.Getpid(), Locker: c.locker.Kind()},
		fleet:     fleet.New(c.pool, c.schema, hashKey("tasking/registry", c.schema, ""), hashKey("tasking/cleanup", c.schema, "")),
		base:      base,
		cancelAll: cancelAll,
		active:    make(map[int64]*activeTask),
		finishing: make(map[int64]struct{}),
		canceled:  make(map[int64]time.Time),
		results:   make(chan outcome, 4*w.cfg.slots),
		wake:      make(chan struct{}, 1),
		finished:  make(chan struct{}),
		taken:     admit.NewTaken(),
	}
}

// register adds the worker to the workers table (see fleet.Register).
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
	r.log = r.c.log.With("worker", r.w.cfg.name, "worker_id", id)
	if len(taken) > 0 {
		r.log.Warn("tasking: took over a crashed instance with the same name", "instances", taken)
		r.freeGrants(ctx, taken)
	}
	return nil
}

// signal asks the scheduler for another cycle.
func (r *run) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// serve runs the worker until ctx is done, then shuts it down, letting
// handlers finish until the context grace returns is done.
func (r *run) serve(ctx context.Context, grace func() context.Context) {
	bg, stopBg := context.WithCancel(context.WithoutCancel(ctx))
	var bgW sync.WaitGroup
	bgW.Add(3)
	go func() { defer bgW.Done(); _ = r.c.bus.listen(bg, r.signal, r.cancelTask) }()
	go func() { defer bgW.Done(); r.heartbeat(bg) }()
	go func() { defer bgW.Done(); r.finisher() }()

	r.schedule(ctx)

	// Shutdown: no more admissions. Let handlers finish within the grace,
	// then cut them off.
	if !waitGroupCtx(grace(), &r.handlerW) {
		r.log.Warn("tasking: shutdown grace over; canceling running handlers")
		r.cancelAll(ErrShutdown)
		hard, cancel := context.WithTimeout(context.Background(), hardStopWait)
		if !waitGroupCtx(hard, &r.handlerW) {
			r.log.Error("tasking: handlers ignore cancellation; leaving their tasks running for cleanup")
		}
		cancel()
	}
	r.sendMu.Lock()
	r.closed = true
	r.draining.Store(true)
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
	if err := r.fleet.Retire(ctx, r.id); err != nil {
		r.log.Warn("tasking: remove worker row", "err", err)
	}
	r.log.Info("tasking: worker stopped")
}

// heartbeat beats every TTL/3 in its own goroutine, so scans and handlers
// never starve it, and runs the fleet's cleanup when it wins the election.
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
		r.cleanup(ctx)
	}
}

func (r *run) beat(ctx context.Context) {
	b, err := r.fleet.Beat(ctx, r.id, r.w.cfg.ttl)
	if err != nil {
		if ctx.Err() == nil {
			r.log.Warn("tasking: heartbeat failed", "err", err)
		}
		return
	}
	r.live.Store(b.Live)
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
		r.mu.Unlock()
		if err := r.fleet.Reinstate(ctx, r.id, r.self); err != nil && ctx.Err() == nil {
			r.log.Warn("tasking: rejoin the fleet", "err", err)
		}
	}
}

// sweep reconciles what the database says this worker runs with what it
// does run. A canceling task is canceled here (its signal may have been
// lost). A running task this worker has no handler for and is not finishing
// was claimed by a claim whose reply never arrived: its handler never ran,
// so once it has been seen so on two heartbeats in a row (a claim in flight
// takes milliseconds, a heartbeat period is seconds) it is put back to
// waiting, guarded by owner and epoch.
func (r *run) sweep(ctx context.Context, owned []fleet.OwnedTask) {
	var back []fleet.OwnedTask
	r.mu.Lock()
	prev := r.orphans
	r.orphans = make(map[int64]int32)
	for _, t := range owned {
		_, running := r.active[t.ID]
		_, finishing := r.finishing[t.ID]
		switch {
		case running && t.Canceling:
			r.active[t.ID].cancel(ErrCanceled)
		case running || finishing:
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
	ids, epochs := make([]int64, len(back)), make([]int32, len(back))
	for i, t := range back {
		ids[i], epochs[i] = t.ID, t.Epoch
	}
	// A canceling orphan never ran either; the finish statement ends it
	// canceled. A running one goes back in line.
	tag, err := r.c.pool.Exec(ctx, r.c.q.unclaim, r.id, ids, epochs)
	if err != nil {
		r.log.Warn("tasking: put back tasks whose claim was lost", "err", err)
		return
	}
	var canceled []outcome
	for _, t := range back {
		if t.Canceling {
			canceled = append(canceled, outcome{task: &Task{ID: t.ID, Epoch: int(t.Epoch)}, state: StateCanceled, err: ErrCanceled.Error()})
		}
	}
	if len(canceled) > 0 {
		if _, err := r.c.finish(ctx, r.id, canceled); err != nil {
			r.log.Warn("tasking: cancel tasks whose claim was lost", "err", err)
		}
	}
	r.log.Warn("tasking: settled tasks claimed by a claim whose reply was lost",
		"put_back", tag.RowsAffected(), "canceled", len(canceled))
	r.signal()
}

func (r *run) cleanup(ctx context.Context) {
	got, err := r.fleet.Cleanup(ctx, r.w.cfg.ttl)
	if err != nil {
		if ctx.Err() == nil {
			r.log.Warn("tasking: cleanup of dead workers failed", "err", err)
		}
		return
	}
	if len(got.Workers) == 0 && got.Failed+got.Canceled == 0 {
		return
	}
	r.log.Warn("tasking: cleaned up after dead workers", "workers", got.Workers,
		"failed", got.Failed, "canceled", got.Canceled)
	r.freeGrants(ctx, got.Workers)
	r.c.bus.released(ctx) // their resources may be free now
	r.c.waits.poke()
}

// freeGrants frees the locker grants of dead worker instances at once, for
// lockers that can (with the PostgreSQL locker the server dropped them when
// the dead worker's connection closed).
func (r *run) freeGrants(ctx context.Context, workers []int64) {
	f, ok := r.c.locker.(interface {
		freeWorkers(ctx context.Context, schema string, workers []int64) error
	})
	if !ok || len(workers) == 0 {
		return
	}
	// Worker ids are only unique within a schema, and the locker's key
	// namespace may derive from it: the locker needs both.
	if err := f.freeWorkers(ctx, r.c.schema, workers); err != nil {
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

func waitGroupCtx(ctx context.Context, wg *sync.WaitGroup) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-ctx.Done():
		return false
	}
}
