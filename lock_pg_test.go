package tasking_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// When the server ends the lock connection, every grant on it is lost: the
// session reports exactly those owners, their names are free for others,
// and the session reconnects on its next call.
func TestPostgresLockerConnectionLost(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 4)
	schema := migratedSchema(t, pool)
	locker := tasking.NewPostgresLocker(tasking.WithPostgresLockCheckInterval(50 * time.Millisecond))
	// The lock connection's application_name carries its worker id; an id no
	// parallel test uses singles out its backend.
	wa := 1e12 + rand.Int64N(1e12)

	type loss struct {
		owners []tasking.Owner
		cause  error
	}
	lost := make(chan loss, 8)
	a := openLockSession(t, locker, tasking.LockSessionConfig{
		Worker: wa, Pool: pool, Schema: schema,
		OnLost: func(owners []tasking.Owner, cause error) {
			select {
			case lost <- loss{slices.Clone(owners), cause}:
			default:
				t.Errorf("OnLost called too often: %v, %v", owners, cause)
			}
		},
	})
	b := openLockSession(t, locker, tasking.LockSessionConfig{Worker: 2, Pool: pool, Schema: schema})

	requireGrant(t, a, exclReq(lockOwner(wa, 1), "a1", "a2"))
	requireGrant(t, a, sharedReq(lockOwner(wa, 2), "s"))
	requireGrant(t, a, sharedReq(lockOwner(wa, 3), "s")) // granted from the session's own table
	requireGrant(t, a, exclReq(lockOwner(wa, 4), "gone"))
	lockRelease(t, a, lockOwner(wa, 4)) // released before the loss: not lost
	requireGrant(t, b, exclReq(lockOwner(2, 1), "b"))
	requireDeny(t, a, exclReq(lockOwner(wa, 5), "a3", "b")) // denied: not lost

	waitLoss := func(want ...tasking.Owner) {
		t.Helper()
		select {
		case l := <-lost:
			require.ElementsMatch(t, want, l.owners)
			require.ErrorIs(t, l.cause, tasking.ErrLockLost)
		case <-t.Context().Done():
			t.Fatal("test ended before OnLost")
		case <-time.After(30 * time.Second):
			t.Fatal("OnLost not called 30s after the lock connection was terminated")
		}
	}

	pid := terminateLockBackend(t, pool, wa)
	waitLoss(lockOwner(wa, 1), lockOwner(wa, 2), lockOwner(wa, 3))
	requireNamesFree(t, b, 2, "a1", "a2", "s", "a3", "gone")

	// The next call reconnects. The session's own table is empty too: were
	// the lost shared grants still in it, an exclusive "s" would be denied.
	requireGrant(t, a, exclReq(lockOwner(wa, 6), "s"))
	requireGrant(t, a, exclReq(lockOwner(wa, 7), "a1"))
	// Held on the server again, and B's grant survived.
	requireNamesTaken(t, b, 2, "s", "a1")
	requireDeny(t, a, exclReq(lockOwner(wa, 8), "b"))
	// Releasing the lost owners has nothing left to do.
	lockRelease(t, a, lockOwner(wa, 1), lockOwner(wa, 2), lockOwner(wa, 3))
	requireNamesTaken(t, b, 2, "s", "a1")
	require.Empty(t, lost, "a single loss reported more than once")

	// The new connection is watched as well.
	pid2 := terminateLockBackend(t, pool, wa)
	require.NotEqual(t, pid, pid2)
	waitLoss(lockOwner(wa, 6), lockOwner(wa, 7))
	requireNamesFree(t, b, 2, "s", "a1")
	require.Empty(t, lost)
}

// terminateLockBackend ends the lock connection of worker: the one backend
// holding advisory locks whose application_name names the worker. It waits
// until the backend is gone and returns its pid.
func terminateLockBackend(t testing.TB, pool *pgxpool.Pool, worker int64) int32 {
	t.Helper()
	rows, err := pool.Query(t.Context(), `
		SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
		 WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
		   AND a.application_name ~ ('\m' || $1::bigint || '\M')`, worker)
	require.NoError(t, err)
	var pids []int32
	for rows.Next() {
		var pid int32
		require.NoError(t, rows.Scan(&pid))
		pids = append(pids, pid)
	}
	require.NoError(t, rows.Err())
	require.Len(t, pids, 1, "backends holding advisory locks whose application_name names worker %d", worker)
	// With a timeout, pg_terminate_backend waits until the backend has
	// exited, so its locks are gone when it returns.
	var ok bool
	require.NoError(t, pool.QueryRow(t.Context(), "SELECT pg_terminate_backend($1, 10000)", pids[0]).Scan(&ok))
	require.True(t, ok, "terminate backend %d", pids[0])
	return pids[0]
}

// A lock batch that fails on the server after taking some of its locks must
// not leave them held: session-level advisory locks survive the error of
// the statement that took them, and a name the session holds on the server
// but not in its own table is never unlocked again while the session
// lives. The failure here is the fence sequence running out; in production
// it is the server's lock table filling up ("out of shared memory") or a
// statement_timeout, neither of which closes the connection.
func TestPostgresLockerFailedBatchLeavesNothingHeld(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 4)
	schema := migratedSchema(t, pool)
	locker := tasking.NewPostgresLocker()
	a := openLockSession(t, locker, tasking.LockSessionConfig{Worker: 1, Pool: pool, Schema: schema})
	b := openLockSession(t, locker, tasking.LockSessionConfig{Worker: 2, Pool: pool, Schema: schema})

	fenceSeq := pgx.Identifier{schema, "fence_seq"}.Sanitize()
	_, err := pool.Exec(t.Context(), "SELECT setval($1::regclass, 9223372036854775807)", fenceSeq)
	require.NoError(t, err)
	_, err = a.TryAcquire(t.Context(), []tasking.LockRequest{exclReq(lockOwner(1, 1), "x", "y")})
	require.Error(t, err)
	_, err = pool.Exec(t.Context(), "SELECT setval($1::regclass, 1000)", fenceSeq)
	require.NoError(t, err)

	lockRelease(t, a, lockOwner(1, 1)) // as the worker does after a failed acquire
	requireNamesFree(t, b, 2, "x", "y")
	requireGrant(t, a, exclReq(lockOwner(1, 2), "x"))
	requireNamesTaken(t, b, 2, "x")
	lockRelease(t, a, lockOwner(1, 2))
	requireNamesFree(t, b, 2, "x")
}

// A worker releases the grants of the tasks a step finished and acquires
// those of the tasks it claimed in one lock_batch call: the released names
// are free for others unless a claimed task took them, a claimed task may
// take what a finished one held (with a new fencing token), a denied
// request leaves the release done, and a call with nothing to acquire
// still releases.
// A release-and-acquire that fails before it reaches the server (here: its
// context is already done) still leaves the released names free: the
// session's table forgot them, so the server must not keep them either.
func TestPostgresLockerReleaseThenAcquireFails(t *testing.T) {
	t.Parallel()
	a, b := twoPostgresSessions(t)
	inner := a.(*closeOnce).LockSession
	done, cancel := context.WithCancel(t.Context())
	cancel()

	requireGrant(t, a, exclReq(lockOwner(1, 1), "x"))
	requireGrant(t, a, exclReq(lockOwner(1, 2), "q"))
	_, err := tasking.ReleaseThenAcquire(done, inner, []tasking.Owner{lockOwner(1, 1)}, []tasking.LockRequest{exclReq(lockOwner(1, 3), "z")})
	require.Error(t, err)
	requireNamesFree(t, b, 2, "x", "z")
	_, err = tasking.ReleaseThenAcquire(done, inner, []tasking.Owner{lockOwner(1, 2)}, nil)
	require.Error(t, err)
	requireNamesFree(t, b, 2, "q")
	// The session goes on.
	requireGrant(t, a, exclReq(lockOwner(1, 4), "x", "q"))
	requireNamesTaken(t, b, 2, "x", "q")
}

// twoPostgresSessions opens the PostgreSQL locker sessions of workers 1 and
// 2 on a fresh schema.
func twoPostgresSessions(t *testing.T) (a, b tasking.LockSession) {
	pool := testdb.Pool(t, 4)
	schema := migratedSchema(t, pool)
	locker := tasking.NewPostgresLocker()
	a = openLockSession(t, locker, tasking.LockSessionConfig{Worker: 1, Pool: pool, Schema: schema})
	b = openLockSession(t, locker, tasking.LockSessionConfig{Worker: 2, Pool: pool, Schema: schema})
	return a, b
}
