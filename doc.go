// Package tasking runs background tasks that declare the resources they
// touch, on a fleet of workers, in PostgreSQL.
//
// Tasks that conflict (one names a resource exclusively that the other names
// at all) run one after another, in dispatch order. Everything else runs in
// parallel on as many workers as there are. Run-time resource locks live in
// a pluggable [ResourceLocker]: PostgreSQL advisory locks by default, or
// Redis to take the lock traffic off the database.
//
// # Define a handler
//
// A handler is a plain function. [HandleFunc] decodes the task's JSON args
// into a struct for you:
//
//	type SyncArgs struct{ Repo string }
//
//	w := tasking.NewWorker(client, tasking.WithSlots(32))
//	tasking.HandleFunc(w, "sync", func(ctx context.Context, a SyncArgs) error {
//		return syncRepository(ctx, a.Repo)
//	})
//
// The running [Task] is available from the context ([TaskFromContext]): its
// id, its fencing token, and [Task.SetResult] to store a JSON result. An
// error fails the task with its text; a panic fails it with the panic value
// and stack, and the worker carries on.
//
// # Dispatch with resources
//
// Create a [Client] over your *pgxpool.Pool, migrate once, and dispatch:
//
//	client, err := tasking.New(pool)
//	err = client.Migrate(ctx)
//	task, err := client.Dispatch(ctx, "sync", SyncArgs{Repo: "a"},
//		tasking.Exclusive("repo:a"), tasking.Shared("remote:cdn"))
//
// Two tasks conflict when some resource is exclusive in one and named by the
// other. The promise:
//
//   - Conflicting tasks never run at the same time.
//   - Conflicting tasks start in dispatch order, each after the earlier one
//     is final; a shared task queued behind a waiting exclusive one waits.
//   - A dispatch that returned before another was called gets a smaller id;
//     for conflicting tasks commit order equals id order, even with
//     [Client.DispatchTx] in the caller's transaction.
//   - Every task ends in exactly one final state (completed, failed,
//     canceled) and its handler runs at most once.
//   - A blocked task never holds up non-conflicting tasks behind it.
//
// Resource names are normalised: duplicates are dropped and a name given both
// exclusive and shared becomes exclusive. [Client.DispatchMany] stores a
// batch in one round trip. [Client.Wait] blocks until a task is final;
// [Client.List] shows, for example, what waits on a resource.
//
// # Unique dispatch
//
// [Unique] gives a task a key; while a task yet to run has the key, another
// dispatch with it adds nothing and returns that task, with
// [Task.Existing] set. A running task does not count, so a stream of
// "sync repository 42" requests keeps at most one sync queued behind the
// running one:
//
//	task, err := client.Dispatch(ctx, "sync", SyncArgs{Repo: "42"},
//		tasking.Exclusive("repo:42"), tasking.Unique("sync:repo:42"))
//
// Concurrent dispatchers with one key, [Client.DispatchTx] and
// [Client.DispatchMany] included, get one task between them.
//
// # Scheduled tasks
//
// [RunAt] (or [RunAfter]) dispatches a task that must not start before a
// time; until then it is in [StateScheduled], and workers wake up when it
// is due. It takes its place in line when it is dispatched, like any
// task: later conflicting tasks wait until it has run. A task scheduled for
// next week on a busy resource therefore holds that resource's later tasks
// for a week; schedule on resources nothing else needs meanwhile, or
// dispatch nearer the time.
//
// # Run workers
//
// [Worker.Run] blocks until its context is done, then shuts down gracefully
// (see [WithShutdownGrace]). Run as many workers, in as many processes, as
// you like; each has its own slots and its own lock session. A task whose
// name no running worker handles stays waiting, and keeps its place in line
// on its resources.
//
// # Pick a locker
//
// The default [NewPostgresLocker] needs nothing but the database: each worker
// holds its locks on its own connection. [NewRedisLocker] keeps locks
// in Redis with leases and fencing tokens, and wakes workers over Redis
// pub/sub, so PostgreSQL only sees task reads and writes. Swapping is one
// option:
//
//	client, err := tasking.New(pool, tasking.WithLocker(tasking.NewRedisLocker(rdb)))
//
// With Redis, call [Client.Notify] after committing a transaction that used
// [Client.DispatchTx]: Redis cannot see that commit, so the workers would
// otherwise find the task on their next poll.
//
// Every worker of a fleet must use the same kind of locker; a worker refuses
// to start while live workers use another ([ErrLockerMismatch]).
// [NewMemoryLocker] suits tests and single-process services.
//
// # Cancel, time out
//
// [Client.Cancel] cancels a waiting task at once. A running task becomes
// canceling: its worker is told within milliseconds and cancels the
// handler's context with cause [ErrCanceled]; the task ends canceled. A
// deadline per task ([Timeout]) or per handler ([HandlerTimeout]) cancels the
// context with cause [ErrTimeout] and fails the task with "timeout".
// Handlers should return promptly once their context is done;
// context.Cause(ctx) tells why.
//
// # Task groups
//
// A group is a set of tasks waited for and canceled as one (Pulp's task
// groups). [Client.DispatchGroup] creates one, fills it and marks it all
// dispatched in one transaction; or fill it over time: [Client.CreateGroup],
// dispatch with [InGroup], then [Client.MarkAllDispatched]. A group is done
// when it is marked all dispatched and every task in it is final.
// [Client.GetGroup] reads its state and its tasks counted per state,
// [Client.WaitGroup] waits until it is done, and [Client.CancelGroup]
// cancels it: its waiting tasks at once, its running ones as [Client.Cancel]
// does, and no task joins it any more ([ErrGroupCanceled]). A group marked
// all dispatched takes no new tasks ([ErrGroupClosed]), except the children
// of its tasks that still run. Grouping changes nothing about order: tasks
// of a group conflict with each other, and with tasks outside it, by their
// resources alone.
//
// # Child tasks
//
// A task dispatched with the context of a running handler (or one derived
// from it) records the handler's task as its [Task.Parent], with every
// Dispatch function, and joins that task's group unless [InGroup] says
// otherwise ([NoGroup] for none). [ListFilter] selects by Parent and by
// Group:
//
//	tasking.HandleFunc(w, "sync", func(ctx context.Context, repo string) error {
//		_, err := client.Dispatch(ctx, "publish", repo, tasking.Exclusive("repo:"+repo))
//		return err
//	})
//	children, _, err := client.List(ctx, tasking.ListFilter{Parent: sync.ID})
//
// # Report progress
//
// A handler reports how far it has got with [Task.ReportProgress]: one or
// more named reports, each with a message, done and total counts and a
// state ([Progress], Pulp's progress reports). [Client.Get] and
// [Client.List] show them in [Task.Progress] while the task runs. Call it
// as often as you like: the worker writes the latest reports of all its
// tasks in one statement, at most every 250 ms, and the last reports of a
// task go to the database with its final state, never after it.
//
// # Immediate tasks
//
// An [Immediate] runs a task in the caller's process, now, when nothing
// earlier conflicts with it (Pulp's immediate dispatch): [Immediate.Run]
// dispatches it, takes its locks through the client's locker, runs the
// handler in the calling goroutine with a deadline ([Timeout], default
// [DefaultImmediateTimeout]), records the final state like a worker does,
// and returns the final task. When an earlier task that is not final
// conflicts with it, it returns a [*BlockedError] naming what it waits
// behind (nothing is recorded), or, with [DeferIfBlocked], leaves the task
// waiting for the workers. Either way the order is the queue's: an
// immediate task never overtakes an earlier conflicting task, and a later
// one waits for it. [Client.Cancel] reaches the handler within about half a
// second. If the caller dies while it runs, the fleet's cleanup fails the
// task once its deadline plus [WithImmediateTTL] has passed (a worker must
// run somewhere in the fleet for that).
//
//	im := tasking.NewImmediate(client)
//	defer im.Close(ctx)
//	task, err := im.Run(ctx, "rename", args, rename, tasking.Exclusive("repo:a"))
//
// # Failures
//
// Workers send heartbeats; a worker missed for a TTL ([WithHeartbeatTTL]) is
// declared gone by whichever live worker runs the cleanup first: its
// running tasks fail with "worker lost" and its locks are freed. A worker
// that was only paused and comes back finds its handlers canceled (cause
// [ErrWorkerLost]). A worker that loses its locks (its connection died,
// a Redis lease ran out) cancels the affected handlers (cause [ErrLockLost])
// and fails their tasks with "lock lost". In both cases another task may
// already hold the resources when the old handler notices: the fencing token
// ([Task.Fence]) lets side effects refuse a stale holder.
//
// An interrupted task fails, and its handler ran at most once, unless its
// retry policy says otherwise (RetryPolicy.Interrupted, below).
//
// # Retries
//
// A handler's failures (an error, a panic, a timeout) can be retried under
// a [RetryPolicy]: attempts, and a backoff that doubles with jitter.
// [HandlerRetry] sets it for a handler, [Retry] for one task; [NoRetry]
// wraps an error that another attempt cannot fix.
//
//	w.Handle("upload", upload, tasking.HandlerRetry(tasking.RetryPolicy{Attempts: 5, Backoff: time.Second}))
//
// Between attempts the task is in [StateRetrying] and keeps its place in
// line: tasks dispatched after it that conflict with it wait until it is
// final, as they would while it runs, and tasks that conflict with nothing
// run meanwhile. [Task.Attempt] numbers the runs, and [Task.Attempts] keeps
// every failed one's error and times. Workers wake up when a retry is due.
// Cancel ends a task waiting for its retry at once. For idempotent
// handlers, RetryPolicy.Interrupted also puts back in line, at its place,
// a task interrupted by a graceful shutdown, lost locks or a lost worker.
//
// # Periodic tasks
//
// [WithPeriodic] registers a schedule on a worker, [Every] for fixed
// intervals or [Cron] for a cron expression:
//
//	daily, err := tasking.Cron("0 3 * * *") // 03:00 UTC
//	w := tasking.NewWorker(client, tasking.WithPeriodic("nightly-gc", daily,
//		tasking.Spec("gc", nil, tasking.Exclusive("storage"))))
//
// Register it on as many workers as you like: each period's task is
// dispatched exactly once across the fleet (the worker whose transaction
// moves the schedule's stored last period forward dispatches it, in that
// transaction), with no leader. Periods missed while no such worker ran are
// coalesced into one task, for the latest of them, when a worker starts.
//
// # Keep the table small
//
// Final tasks stay in the database until purged. [Client.Purge] deletes
// final tasks that finished before a time, by state, in small batches of
// short transactions that never hold up dispatches or workers.
// [WithRetention] makes the fleet do it: once per period (stored in the
// database) the worker that wins the cleanup of dead workers purges, per
// final state, what is older than its retention:
//
//	w := tasking.NewWorker(client, tasking.WithRetention(tasking.Retention{
//		Completed: 24 * time.Hour, Failed: 7 * 24 * time.Hour, Canceled: 24 * time.Hour,
//	}))
//
// # Hooks
//
// [WithMiddleware] wraps every handler of a worker in your own code (tracing,
// logging, metrics, a panic policy): each [Middleware] gets the next handler
// and the task. [WithErrorHandler] is told of every task that fails on the
// worker, with the error itself: the handler's own, a [*PanicError] for a
// panic, or the library's reason (timeout, lock lost, shutdown...).
//
// # Stats and workers
//
// [Client.Stats] returns, in one read-only transaction, the tasks by state
// and by name, how long each name's oldest waiting task has waited, the
// names whose waiting tasks no live worker handles, and the registered
// workers ([WorkerInfo]: name, host, locker kind, busy and total slots,
// handled names, last heartbeat, live or not). [Client.Workers] reads the
// workers alone.
//
// # Why is a task waiting?
//
// [Client.WhyWaiting] answers for one task, resource by resource: the
// earlier conflicting tasks on its waiting lines, running (holding the
// resource) or waiting ahead of it, read from the lines themselves; whether
// it is ready and only waits for a slot; and whether no live worker
// handles its name, so that it will not start at all. A blocked entry with
// nothing ahead means the hand-off of that line is pending behind an open
// [Client.DispatchTx] transaction.
//
// # OpenTelemetry
//
// Give the client a MeterProvider ([WithMeterProvider]) for metrics (tasks
// dispatched, started and finished by name and final state, wait and run
// time histograms, waiting tasks and the oldest one's age by name, grants
// held and refused by locker, worker steps, wake-ups) and a TracerProvider
// ([WithTracerProvider]) for a span per dispatch and one per run of a
// handler, linked to its dispatch's span through the trace context stored
// with the task. The handler's context carries the run span. Without them
// nothing is recorded, sent or stored.
//
// # Dashboard
//
// Package [github.com/tasking-go/tasking/dashboard] serves all of the above
// as an http.Handler to mount in a service's mux: server-rendered pages and
// a JSON API, read-only unless the host enables cancel.
//
// # Shut down
//
// Cancel the context given to Run, or call [Worker.Stop] with a deadline.
// The worker stops admitting, lets running handlers finish for the grace
// period, then cancels their contexts with cause [ErrShutdown]; those tasks
// end failed with a reason saying so. Final states are written before locks
// are released.
//
// A program that only dispatches and then exits calls [Client.Close] before
// closing its pool: an autocommitted dispatch wakes the workers just after
// it returns, in the background, and Close waits for those wake-ups.
package tasking
