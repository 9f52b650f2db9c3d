package tasking

import "context"

// Exported for the external tests only (this file is compiled into tests).

// WorkerAppName is the application_name of a worker's PostgreSQL
// connection, which tests use to find and kill exactly that connection.
var WorkerAppName = workerAppName

// NotifyChannel is the NOTIFY channel of a schema, which tests LISTEN on.
var NotifyChannel = notifyChannel

// SyncBuffer is a bytes.Buffer safe for concurrent writers, for test logs.
type SyncBuffer = syncBuffer

// ReleaseThenAcquire is a session's release of owners and acquire of reqs in
// one call (PostgreSQL: one statement; Redis: one script call), which the
// worker uses after a step.
func ReleaseThenAcquire(ctx context.Context, s LockSession, owners []Owner, reqs []LockRequest) ([]int64, error) {
	return s.(releaseAcquirer).releaseThenAcquire(ctx, owners, reqs)
}

// CanReleaseThenAcquire reports whether s has ReleaseThenAcquire.
func CanReleaseThenAcquire(s LockSession) bool {
	_, ok := s.(releaseAcquirer)
	return ok
}
