package tasking

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/tasking-go/tasking/internal/migrate"
)

// Limits on what a task may declare. Larger input is rejected with an
// [*InputError].
const (
	MaxTaskNameLen     = 255  // bytes
	MaxResourceNameLen = 1024 // bytes
	MaxResources       = 128  // distinct names per task, exclusive and shared together

	// MaxArgsSize is the largest task args, in bytes of JSON. PostgreSQL's
	// jsonb holds at most about 255 MiB, and JSON text can grow up to six
	// times on the way in (an array of one-digit numbers), so every JSON
	// text of this size fits.
	MaxArgsSize = 32 << 20
)

// DefaultSchema is the schema used when [WithSchema] is not given.
const DefaultSchema = "tasking"

var (
	// ErrNotFound: no task has that id.
	ErrNotFound = errors.New("tasking: task not found")
	// ErrInvalidInput is matched by every [*InputError].
	ErrInvalidInput = errors.New("tasking: invalid input")
	// ErrNotMigrated: the schema has not been created by [Client.Migrate].
	ErrNotMigrated = errors.New("tasking: schema not migrated (call Client.Migrate)")
	// ErrSchemaTooNew: the schema was migrated by a newer release of tasking.
	ErrSchemaTooNew = errors.New("tasking: schema is newer than this release")
	// ErrNoHandlers: Worker.Run was called on a worker with no handlers.
	ErrNoHandlers = errors.New("tasking: worker has no handlers")
	// ErrLockerMismatch: live workers of the fleet use another kind of locker.
	ErrLockerMismatch = errors.New("tasking: live workers use another kind of locker")
	// ErrLockLost is the cause given to a handler's context when its task's
	// locks were lost; the task ends failed.
	ErrLockLost = errors.New("lock lost")
	// ErrShutdown is the cause given to a handler's context when the worker
	// stops before the handler returns; the task ends failed.
	ErrShutdown = errors.New("worker shut down before the task finished")
	// ErrCanceled is the cause given to a handler's context when its task is
	// canceled; the task ends canceled.
	ErrCanceled = errors.New("canceled")
	// ErrTimeout is the cause given to a handler's context at the task's
	// deadline; the task ends failed.
	ErrTimeout = errors.New("timeout")
	// ErrWorkerLost is the cause given to a handler's context when its worker
	// was declared gone (it missed heartbeats for a TTL, e.g. while paused);
	// cleanup has already failed the task with "worker lost".
	ErrWorkerLost = errors.New("worker lost")
	// ErrWorkerNameInUse: a live worker already has the name.
	ErrWorkerNameInUse = errors.New("tasking: a live worker already has this name")
	// ErrPanic matches (through [Task.Err]) a task whose handler panicked;
	// its stored reason holds the panic value and stack.
	ErrPanic = errors.New("panic")
	// ErrHandlersAbandoned: at shutdown, handlers did not return after
	// their context was canceled; their tasks were failed and their locks
	// released (see Worker.Stop).
	ErrHandlersAbandoned = errors.New("tasking: handlers abandoned at shutdown")
	// ErrTaskFinal: the task already completed or failed, so it cannot be
	// canceled.
	ErrTaskFinal = errors.New("tasking: task already final")
)

// InputError describes input rejected before anything was written.
// errors.Is(err, ErrInvalidInput) matches it.
type InputError struct {
	Field   string // what was wrong: "task name", "args", "resource name", ...
	Problem string
}

func (e *InputError) Error() string { return "tasking: invalid " + e.Field + ": " + e.Problem }

// Is makes errors.Is(err, ErrInvalidInput) true.
func (e *InputError) Is(target error) bool { return target == ErrInvalidInput }

func inputErr(field, format string, a ...any) error {
	return &InputError{Field: field, Problem: fmt.Sprintf(format, a...)}
}

// State is where a task is in its life.
type State string

// The states of a task. Completed, failed and canceled are final.
const (
	StateWaiting   State = "waiting"
	StateScheduled State = "scheduled" // dispatched with a start time still to come (see RunAt)
	StateRetrying  State = "retrying"  // an attempt failed; it runs again after its backoff (see RetryPolicy)
	StateRunning   State = "running"
	StateCanceling State = "canceling"
	StateCompleted State = "completed"
	StateFailed    State = "failed"
	StateCanceled  State = "canceled"
)

// Err returns why a failed or canceled task ended, as an error that
// errors.Is matches against the reasons the library gives: [ErrTimeout],
// [ErrCanceled], [ErrWorkerLost], [ErrLockLost], [ErrShutdown] (and
// [ErrHandlersAbandoned] for a handler abandoned at shutdown), [ErrPanic];
// any other failure is the handler's own error, as text. It returns nil for
// a task that is not failed or canceled.
func (t *Task) Err() error {
	switch t.State {
	case StateCanceled:
		return &TaskError{ID: t.ID, Reason: cmp.Or(t.Error, ErrCanceled.Error()), kind: ErrCanceled}
	case StateFailed:
	default:
		return nil
	}
	e := &TaskError{ID: t.ID, Reason: t.Error}
	for _, k := range []error{ErrTimeout, ErrCanceled, ErrWorkerLost, ErrLockLost, ErrShutdown} {
		if t.Error == k.Error() || strings.HasPrefix(t.Error, k.Error()+":") {
			e.kind = k
		}
	}
	switch {
	case strings.HasPrefix(t.Error, "panic: "):
		e.kind = ErrPanic
	case strings.Contains(t.Error, "handler abandoned at shutdown"):
		e.abandoned = true
	}
	return e
}

// TaskError is the reason a task failed or was canceled ([Task.Err]).
type TaskError struct {
	ID        int64
	Reason    string // the stored reason, as in Task.Error
	kind      error  // the library's reason, nil for the handler's own error
	abandoned bool
}

func (e *TaskError) Error() string {
	return fmt.Sprintf("tasking: task %d: %s", e.ID, e.Reason)
}

// Is matches the library's reason for the failure.
func (e *TaskError) Is(target error) bool {
	return target != nil && (target == e.kind || e.abandoned && (target == ErrHandlersAbandoned || target == ErrShutdown))
}

// Final reports whether s is a final state.
func (s State) Final() bool {
	return s == StateCompleted || s == StateFailed || s == StateCanceled
}

// Task is a dispatched task as stored.
type Task struct {
	ID         int64 // dispatch position: conflicting tasks run in ID order
	Name       string
	Args       json.RawMessage
	Exclusive  []string
	Shared     []string
	State      State
	WorkerID   int64         // the worker instance that last claimed it, 0 if none
	Epoch      int           // incremented by every claim
	Timeout    time.Duration // handler deadline set at dispatch, 0 for none
	CreatedAt  time.Time
	StartedAt  time.Time // zero until claimed
	FinishedAt time.Time // zero until final
	Error      string
	Result     json.RawMessage
	// Parent is the task whose handler dispatched it, 0 if none; Group the
	// group it belongs to, 0 if none. Read with Get or List (the task a
	// handler is given does not carry them).
	Parent int64
	Group  int64

	// Progress holds the task's progress reports, in the order their names
	// were first reported ([Task.ReportProgress]): the latest written while
	// it runs (at most 250 ms old, normally), the last ones once it is final.
	Progress []Progress

	// Fence is the fencing token of the task's lock grant while a handler
	// runs it (0 for a task without resources). Tokens grow with every grant,
	// so a side effect guarded by the token can refuse a stale holder.
	Fence int64

	// parent is the trace context of the dispatch, read at claim by a
	// worker that traces.
	parent trace.SpanContext

	// Attempt is the number of the task's current or last run, 1 for the
	// first (0 before it ever ran).
	Attempt int
	// Attempts holds every failed attempt, oldest first. The last one's
	// error is also in Error.
	Attempts []Attempt
	// RunAt is the time before which the task was not to start: the one
	// it was dispatched with ([RunAt]), or, once an attempt failed, the end
	// of the last backoff. Zero for neither.
	RunAt time.Time
	// Retry is the task's own retry policy ([Retry]), nil for none.
	Retry *RetryPolicy

	// UniqueKey is the task's unique key ([Unique]), "" for none.
	UniqueKey string
	// Existing is set on a task that Dispatch returned instead of adding
	// one: a task yet to run already had the unique key asked for.
	Existing bool

	// live is set on the task a handler runs: the result it sets. A Task
	// read with Get or List has none (and copies of a Task share it).
	live *liveTask
}

type liveTask struct {
	mu     sync.Mutex
	result json.RawMessage
	schema string // of the client whose worker runs it: its children's parent is in the same schema

	progress []Progress  // see progress.go
	dirty    bool        // progress changed since it was last written
	ended    bool        // the handler returned: no more reports
	mark     func(*Task) // queues the task's progress for its worker's next write
}

// ErrNotRunning: SetResult was called on a task that no handler of this
// process runs (one read with Get or List, say).
var ErrNotRunning = errors.New("tasking: task is not running in a handler here")

// SetResult records v, marshalled to JSON, as the task's result. Call it
// from the handler on the task it was given; the result is stored with the
// final state. The same limits apply as to args ([MaxArgsSize], what
// PostgreSQL's jsonb can hold), checked here, so that a bad result is the
// handler's error rather than a final state that cannot be written.
func (t *Task) SetResult(v any) error {
	if t.live == nil {
		return ErrNotRunning
	}
	b, err := []byte("null"), error(nil)
	if v != nil {
		b, err = marshalArgs(v)
	}
	if err != nil {
		var in *InputError
		if errors.As(err, &in) {
			in.Field = "result"
		}
		return err
	}
	t.live.mu.Lock()
	t.live.result = b
	t.live.mu.Unlock()
	return nil
}

func (t *Task) takeResult() json.RawMessage {
	if t.live == nil {
		return nil
	}
	t.live.mu.Lock()
	defer t.live.mu.Unlock()
	return t.live.result
}

// Client dispatches tasks and reads them. It is safe for concurrent use.
type Client struct {
	pool   *pgxpool.Pool
	schema string
	log    *slog.Logger
	locker ResourceLocker
	q      queries
	bus    wakeBus

	versionMu sync.Mutex
	checked   bool // schema version matched once

	waits *waiters

	met    *meters      // nil without WithMeterProvider
	tracer trace.Tracer // nil without WithTracerProvider
}

// Option configures a Client.
type Option func(*clientConfig)

type clientConfig struct {
	schema string
	logger *slog.Logger
	locker ResourceLocker

	meters  metric.MeterProvider
	tracers trace.TracerProvider
}

// WithSchema sets the PostgreSQL schema that holds tasking's tables.
// Default: "tasking" ([DefaultSchema]).
//
// A name is 1 to 63 ASCII letters, digits and underscores, not starting with
// a digit and not with "pg_" (PostgreSQL reserves those); [New] refuses
// anything else. Such a name is safe everywhere tasking puts it: in SQL, in
// the migrations' function bodies, in NOTIFY channels and in Redis keys.
func WithSchema(name string) Option { return func(c *clientConfig) { c.schema = name } }

// WithLogger sets the logger. Default: [slog.Default].
func WithLogger(l *slog.Logger) Option { return func(c *clientConfig) { c.logger = l } }

// WithLocker sets the ResourceLocker of the client's workers.
// Default: [NewPostgresLocker] (session-level advisory locks).
func WithLocker(l ResourceLocker) Option { return func(c *clientConfig) { c.locker = l } }

// New returns a client over the caller's pool. It does not touch the
// database: call [Client.Migrate] once to create or upgrade the schema.
func New(pool *pgxpool.Pool, opts ...Option) (*Client, error) {
	if pool == nil {
		return nil, inputErr("pool", "nil *pgxpool.Pool")
	}
	cfg := clientConfig{schema: DefaultSchema}
	for _, o := range opts {
		o(&cfg)
	}
	if err := checkSchemaName(cfg.schema); err != nil {
		return nil, err
	}
	if cfg.logger == nil {
		cfg.logger = slog.Default()
	}
	if cfg.locker == nil {
		cfg.locker = NewPostgresLocker()
	}
	c := &Client{
		pool:   pool,
		schema: cfg.schema,
		log:    cfg.logger,
		locker: cfg.locker,
		q:      newQueries(cfg.schema),
	}
	c.bus = newBus(c)
	c.waits = newWaiters(c)
	if cfg.meters != nil {
		m, err := newMeters(c, cfg.meters)
		if err != nil {
			return nil, err
		}
		c.met = m
	}
	if cfg.tracers != nil {
		c.tracer = cfg.tracers.Tracer(instrumentation)
	}
	return c, nil
}

// Schema returns the schema the client works in.
func (c *Client) Schema() string { return c.schema }

// Migrate creates the schema or upgrades it to this release's version.
// It is safe to call from several processes at once.
func (c *Client) Migrate(ctx context.Context) error {
	_, _, err := migrate.Migrate(ctx, c.pool, c.schema)
	var tooNew *migrate.TooNewError
	if errors.As(err, &tooNew) {
		return fmt.Errorf("%w: %v", ErrSchemaTooNew, err)
	}
	if err != nil {
		return fmt.Errorf("tasking: migrate schema %q: %w", c.schema, err)
	}
	c.versionMu.Lock()
	c.checked = true
	c.versionMu.Unlock()
	return nil
}

// checkSchema fails with ErrNotMigrated or ErrSchemaTooNew when the schema
// does not match this release. A success is remembered.
func (c *Client) checkSchema(ctx context.Context) error {
	return c.checkSchemaOn(ctx, c.pool)
}

// checkSchemaOn is checkSchema on db.
func (c *Client) checkSchemaOn(ctx context.Context, db migrate.Querier) error {
	c.versionMu.Lock()
	defer c.versionMu.Unlock()
	if c.checked {
		return nil
	}
	v, err := migrate.Version(ctx, db, c.schema)
	switch {
	case errors.Is(err, migrate.ErrNotMigrated):
		return fmt.Errorf("%w: schema %q has no tasking tables", ErrNotMigrated, c.schema)
	case err != nil:
		return fmt.Errorf("tasking: read schema version: %w", err)
	case v > migrate.Latest():
		return fmt.Errorf("%w: schema %q is at version %d, this release knows up to %d", ErrSchemaTooNew, c.schema, v, migrate.Latest())
	case v < migrate.Latest():
		return fmt.Errorf("%w: schema %q is at version %d, this release needs %d", ErrNotMigrated, c.schema, v, migrate.Latest())
	}
	c.checked = true
	return nil
}

// DispatchOption sets a property of one dispatched task.
type DispatchOption func(*TaskSpec)

// Exclusive declares resources the task needs alone: no other task naming
// any of them, in any mode, runs at the same time.
func Exclusive(names ...string) DispatchOption {
	return func(s *TaskSpec) { s.Exclusive = append(s.Exclusive, names...) }
}

// Shared declares resources the task may share with other shared holders;
// no exclusive holder of them runs at the same time.
func Shared(names ...string) DispatchOption {
	return func(s *TaskSpec) { s.Shared = append(s.Shared, names...) }
}

// Timeout gives the task's handler a deadline: its context is canceled with
// cause [ErrTimeout] when d has passed since it started, and the task ends
// failed with "timeout". It overrides the handler's [HandlerTimeout].
// Default: none.
func Timeout(d time.Duration) DispatchOption {
	return func(s *TaskSpec) { s.Timeout = d }
}

// RunAt schedules the task: it does not start before t (PostgreSQL's clock
// decides). Until then it is in [StateScheduled]. It takes its place in
// line when it is dispatched, like any task: tasks dispatched after it that
// conflict with it wait until it has run, and tasks dispatched before it
// that conflict with it run first. So schedule on resources that nothing
// else needs meanwhile, or dispatch closer to the time. Workers wake up
// when it is due. A time in the past is now. Default: now.
func RunAt(t time.Time) DispatchOption {
	return func(s *TaskSpec) { s.RunAt = t }
}

// RunAfter is RunAt(time.Now().Add(d)).
func RunAfter(d time.Duration) DispatchOption {
	return func(s *TaskSpec) { s.RunAt = time.Now().Add(d) }
}

// Unique gives the task a unique key: while a task yet to run has the key
// (waiting, scheduled, or waiting for a retry), dispatching another task
// with it adds nothing and returns that task, with [Task.Existing] set. A
// task that is running (or final) does not count, so "one waiting sync per
// repository, queued behind the running one" is
//
//	client.Dispatch(ctx, "sync", args, tasking.Exclusive("repo:42"), tasking.Unique("sync:repo:42"))
//
// The check is atomic: dispatches with one key are serialised (a dispatch
// in an open [Client.DispatchTx] transaction holds the key until it ends),
// so concurrent dispatchers get one task. In a batch, a task whose key an
// earlier task of the batch has gets that task. The task returned was yet
// to run when Dispatch looked; it may start right after, so a handler
// must not count on seeing what happened after it was first dispatched.
// The returned task keeps its own name, args, resources and place in line:
// nothing of the new dispatch is applied to it. Default: none. A key is at
// most MaxResourceNameLen bytes of UTF-8 without NUL.
func Unique(key string) DispatchOption {
	return func(s *TaskSpec) { s.Unique = key; s.uniqueSet = true }
}

// TaskSpec describes one task to dispatch. Build it with [Spec] or fill it in.
type TaskSpec struct {
	Name      string
	Args      any // marshalled to JSON; json.RawMessage and []byte are taken as JSON; at most MaxArgsSize bytes
	Exclusive []string
	Shared    []string
	Timeout   time.Duration // 0: none
	Unique    string        // unique key (see [Unique]); "": none
	Retry     *RetryPolicy  // the task's own retry policy (see [Retry]); nil: its handler's
	RunAt     time.Time     // not before this time (see [RunAt]); zero: now

	uniqueSet bool // Unique was given, so "" is an error

	deferIfBlocked bool // DeferIfBlocked, for Immediate.Run

	// Group is the group the task joins: 0 for the group of the task whose
	// handler dispatches it (none outside a handler, or when that task has
	// none), [NoGroup] for none, else a group's id ([Client.CreateGroup]).
	Group int64
}

// Spec builds a TaskSpec for [Client.DispatchMany].
func Spec(name string, args any, opts ...DispatchOption) TaskSpec {
	s := TaskSpec{Name: name, Args: args}
	for _, o := range opts {
		o(&s)
	}
	return s
}

// Dispatch stores a waiting task and returns it. Tasks that conflict with it
// run before it if dispatched earlier, after it if dispatched later.
//
// Called with the context of a running handler (or one derived from it),
// the task records the handler's task as its [Task.Parent], and joins that
// task's group unless [InGroup] says otherwise. The same holds for every
// Dispatch function.
func (c *Client) Dispatch(ctx context.Context, name string, args any, opts ...DispatchOption) (*Task, error) {
	ts, err := c.DispatchMany(ctx, Spec(name, args, opts...))
	if err != nil {
		return nil, err
	}
	return ts[0], nil
}

// DispatchArgs dispatches a task named by its args' type (see [TaskArgs]
// and [HandleArgs]).
func DispatchArgs[T TaskArgs](ctx context.Context, c *Client, args T, opts ...DispatchOption) (*Task, error) {
	return c.Dispatch(ctx, args.TaskName(), args, opts...)
}

// DispatchTx stores a waiting task inside the caller's transaction: the task
// exists if and only if the caller commits. Until then, later conflicting
// dispatches wait for the transaction (that is what keeps their order), so
// keep such transactions short.
//
// With the PostgreSQL locker the commit itself wakes the workers. With the
// Redis locker nothing can tell Redis about the caller's commit, so the task
// is picked up on the workers' next wake-up (any later dispatch or finish)
// or the fleet's next poll (about once per [WithPollInterval], default 1s),
// unless the caller calls [Client.Notify] after the commit.
func (c *Client) DispatchTx(ctx context.Context, tx pgx.Tx, name string, args any, opts ...DispatchOption) (*Task, error) {
	ts, err := c.DispatchManyTx(ctx, tx, Spec(name, args, opts...))
	if err != nil {
		return nil, err
	}
	return ts[0], nil
}

// DispatchMany stores a batch of tasks in one round trip, in order: each
// gets a larger ID than the one before it. Either all are stored or none.
func (c *Client) DispatchMany(ctx context.Context, specs ...TaskSpec) ([]*Task, error) {
	return c.dispatch(ctx, c.pool, specs, true)
}

// DispatchManyTx is DispatchMany inside the caller's transaction.
func (c *Client) DispatchManyTx(ctx context.Context, tx pgx.Tx, specs ...TaskSpec) ([]*Task, error) {
	if tx == nil {
		return nil, inputErr("transaction", "nil pgx.Tx")
	}
	return c.dispatch(ctx, tx, specs, false)
}

func (c *Client) dispatch(ctx context.Context, db querier, specs []TaskSpec, autocommit bool) (_ []*Task, err error) {
	if len(specs) == 0 {
		return nil, inputErr("batch", "no tasks to dispatch")
	}
	batch, err := prepareBatch(specs)
	if err != nil {
		return nil, err
	}
	if err := c.checkSchema(ctx); err != nil {
		return nil, err
	}
	parent := c.parentOf(ctx)
	ctx, span, trace := c.startDispatchSpan(ctx, batch.specs)
	tasks, ready, err := c.insert(ctx, db, batch, autocommit, trace, parent)
	endSpan(span, err)
	if err != nil {
		return nil, err
	}
	c.met.dispatchedTasks(ctx, batch.specs)
	if autocommit && ready {
		c.bus.dispatched(ctx)
	}
	return tasks, nil
}

// Notify wakes the client's workers now, so they look for waiting tasks.
// Dispatch and DispatchMany do it themselves. Call it after committing a
// transaction that used DispatchTx when the workers use the Redis locker:
// they are woken through Redis, which cannot see the commit. With the
// PostgreSQL locker the commit already woke them and Notify only sends one
// more wake-up.
func (c *Client) Notify(ctx context.Context) error {
	if err := c.bus.notify(ctx); err != nil {
		return fmt.Errorf("tasking: notify workers: %w", err)
	}
	return nil
}

// Cancel cancels a task. A waiting task becomes canceled at once. A running
// one becomes canceling: its worker is told, cancels the handler's context
// with cause [ErrCanceled], and the task ends canceled whatever the handler
// returns. Canceling a task that is already canceled or canceling does
// nothing; a completed or failed one returns [ErrTaskFinal], an unknown id
// [ErrNotFound]. A cancel that races a claim, a finish or a worker's death
// still ends in one final state: every transition is a guarded update.
func (c *Client) Cancel(ctx context.Context, id int64) error {
	if err := c.checkSchema(ctx); err != nil {
		return err
	}
	var state *string
	var ready int
	err := retryConflict(ctx, func() error {
		return c.pool.QueryRow(ctx, c.q.cancel, id, c.bus.dispatchChannel()).Scan(&state, &ready)
	})
	if err == nil && state == nil {
		err = pgx.ErrNoRows
	}
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		t, err := c.get(ctx, id)
		if err != nil {
			return err
		}
		if t.State == StateCanceled || t.State == StateCanceling {
			return nil
		}
		return fmt.Errorf("%w: task %d is %s", ErrTaskFinal, id, t.State)
	case err != nil:
		return fmt.Errorf("tasking: cancel task %d: %w", id, err)
	}
	if State(*state) == StateCanceling {
		c.bus.canceled(ctx, id)
	}
	if ready > 0 && c.bus.dispatchChannel() == "" {
		c.bus.released(ctx) // the cancel statement could not wake the workers itself
	}
	c.waits.poke()
	return nil
}

// Close waits until the wake-ups of the dispatches that have returned are
// sent, or ctx is done. An autocommitted Dispatch or DispatchMany wakes the
// workers just after it returns, in the background; a program that
// dispatches and then closes the pool or exits at once calls Close first,
// or the workers find its last tasks only at their next poll. After Close
// the client still dispatches, reads and cancels, but sends no more
// wake-ups in the background (workers then find such tasks at their next
// poll). It does not close the pool, which the caller owns, nor stop a
// Worker built on the client (Run does that).
func (c *Client) Close(ctx context.Context) error {
	if err := c.bus.flush(ctx); err != nil {
		return fmt.Errorf("tasking: close: %w", err)
	}
	return nil
}

// Get returns the task with that id, or ErrNotFound.
func (c *Client) Get(ctx context.Context, id int64) (*Task, error) {
	if err := c.checkSchema(ctx); err != nil {
		return nil, err
	}
	return c.get(ctx, id)
}

// Wait blocks until the task is final and returns it, or returns ctx's error.
// Waits share one query per interval, however many are in progress, and
// return at once when a worker of this process finishes the task.
func (c *Client) Wait(ctx context.Context, id int64) (*Task, error) {
	t, err := c.Get(ctx, id)
	if err != nil || t.State.Final() {
		return t, err
	}
	return c.waits.wait(ctx, id)
}
