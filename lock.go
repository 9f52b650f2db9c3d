package tasking

import (
	"context"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
)

// A ResourceLocker holds the run-time resource locks of a fleet of workers.
//
// The waiting lines (docs/design.md) already guarantee that the tasks a
// worker asks for in one call never conflict with each other, nor with any
// task running on a live worker; the locker is what keeps a worker that was
// declared lost while it still runs from overlapping its successor, and it
// hands out fencing tokens. Every Worker opens its own LockSession; grants belong to an
// [Owner] (worker instance and task), never to a worker name alone.
//
// Implementations: [NewPostgresLocker] (the default), [NewRedisLocker] and
// [NewMemoryLocker]. All of them pass the same conformance suite. Every worker
// of a fleet must use the same kind of locker: two kinds do not see each
// other's locks, so mixing them would let conflicting tasks run together. A
// worker refuses to start while live workers use another kind
// ([ErrLockerMismatch]).
type ResourceLocker interface {
	// Kind names the implementation ("postgres", "redis", "memory").
	// Workers with different kinds refuse to share a fleet.
	Kind() string

	// Open starts a session for one Worker run. The session is closed by the
	// worker when it stops; grants still held then are released.
	Open(ctx context.Context, cfg LockSessionConfig) (LockSession, error)
}

// LockSessionConfig is what a Worker tells its locker when it opens a session.
type LockSessionConfig struct {
	// Worker is the worker instance's id, unique for every run of a Worker.
	Worker int64
	// Pool is the client's pool; the PostgreSQL locker takes its connection
	// settings from it.
	Pool *pgxpool.Pool
	// Schema is the client's schema.
	Schema string
	// Logger receives the session's diagnostics.
	Logger *slog.Logger
	// OnLost is called, from any goroutine, with the owners whose grants the
	// session has lost (connection gone, lease expired). The worker cancels
	// those tasks and fails them with [ErrLockLost]. It must not block.
	OnLost func(owners []Owner, cause error)

	// conn is the worker's own connection, on which the PostgreSQL locker
	// holds its session locks (one connection per worker process).
	conn *workerConn
}

// LockSession is one Worker's connection to a ResourceLocker.
// Its methods may be called from several goroutines.
type LockSession interface {
	// TryAcquire tries every request without waiting. fences[i] is the
	// fencing token of request i when it was granted all of its names, or 0
	// when it was granted none of them. Requests in one call never conflict
	// with each other. On error, the state of the requests is unknown; the
	// caller releases their owners.
	TryAcquire(ctx context.Context, reqs []LockRequest) (fences []int64, err error)

	// Release drops the grants of owners. Owners holding nothing are ignored,
	// and a grant held by another owner is never touched.
	Release(ctx context.Context, owners []Owner) error

	// Close releases everything the session holds and frees its resources.
	Close(ctx context.Context) error
}

// A LeaseChecker is a LockSession whose grants are leases that can run out
// before the session notices, for example while the process was paused (the
// Redis locker). The worker calls CheckLease when a handler returns, before
// it writes the task's final state; if the lease may have run out, the
// session reports the grant through OnLost, and the task fails with
// [ErrLockLost] instead of completing.
type LeaseChecker interface {
	CheckLease(o Owner)
}

// A WorkerFreer is a LockSession that can free the grants of worker
// instances that cleanup declared gone, at once, rather than when their
// leases run out or their connections close. The worker that ran the
// cleanup calls it with the gone instances' ids (of the session's schema).
// Grants of other owners must never be touched.
type WorkerFreer interface {
	FreeWorkers(ctx context.Context, workers []int64) error
}

// Owner identifies the holder of a grant: one task run by one worker instance.
type Owner struct {
	Worker int64
	Task   int64
}

// LockRequest asks for all of a task's resources at once.
type LockRequest struct {
	Owner     Owner
	Exclusive []string
	Shared    []string
}
