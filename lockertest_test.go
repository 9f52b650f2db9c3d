package tasking_test

// The ResourceLocker conformance suite (docs/design.md §7). Every implementation in
// lockerImpls runs every case of runLockerConformance; adding a locker means
// adding one entry there.

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// A lockerImpl is one ResourceLocker implementation under the suite.
type lockerImpl struct {
	name string
	// space sets up a fresh, empty lock space for one test (a schema, a key
	// namespace) and returns the locker and the session settings every worker
	// of that space shares; Worker, OnLost and a nil Logger are filled in per
	// session. Sessions of different workers in one space must see each
	// other's locks; different spaces must not.
	space func(tb testing.TB) (tasking.ResourceLocker, tasking.LockSessionConfig)
}

func lockerImpls() []lockerImpl {
	return []lockerImpl{
		{name: "memory", space: func(testing.TB) (tasking.ResourceLocker, tasking.LockSessionConfig) {
			return tasking.NewMemoryLocker(), tasking.LockSessionConfig{}
		}},
		{name: "postgres", space: func(tb testing.TB) (tasking.ResourceLocker, tasking.LockSessionConfig) {
			pool := testdb.Pool(tb, 4)
			return tasking.NewPostgresLocker(), tasking.LockSessionConfig{Pool: pool, Schema: migratedSchema(tb, pool)}
		}},
		{name: "redis", space: func(tb testing.TB) (tasking.ResourceLocker, tasking.LockSessionConfig) {
			// A fresh schema name is a fresh namespace (the default one).
			return tasking.NewRedisLocker(newRedis(tb, testdb.RedisAddr())), tasking.LockSessionConfig{Schema: testdb.Name("conf")}
		}},
	}
}

// openSession opens a session of worker in one lock space, closed when the
// test ends. A nil onLost fails the test if the session ever reports a loss.
type openSession func(t testing.TB, worker int64, onLost func([]tasking.Owner, error)) tasking.LockSession

// newSpace sets up a fresh lock space of impl.
func (impl lockerImpl) newSpace(tb testing.TB) openSession {
	tb.Helper()
	locker, base := impl.space(tb)
	return func(t testing.TB, worker int64, onLost func([]tasking.Owner, error)) tasking.LockSession {
		t.Helper()
		cfg := base
		cfg.Worker, cfg.OnLost = worker, onLost
		return openLockSession(t, locker, cfg)
	}
}

// openLockSession opens a session and closes it when the test ends.
func openLockSession(t testing.TB, locker tasking.ResourceLocker, cfg tasking.LockSessionConfig) tasking.LockSession {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quietLogger()
	}
	if cfg.OnLost == nil {
		cfg.OnLost = func(owners []tasking.Owner, cause error) {
			t.Errorf("%s session of worker %d: unexpected OnLost(%v, %v)", locker.Kind(), cfg.Worker, owners, cause)
		}
	}
	s, err := locker.Open(t.Context(), cfg)
	require.NoError(t, err)
	cs := &closeOnce{LockSession: s}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := cs.Close(ctx); err != nil {
			t.Errorf("close %s session of worker %d: %v", locker.Kind(), cfg.Worker, err)
		}
	})
	return cs
}

// closeOnce lets a test close a session early without the cleanup closing
// it again: the interface does not promise that a second Close is harmless.
type closeOnce struct {
	tasking.LockSession
	once sync.Once
	err  error
}

func (s *closeOnce) Close(ctx context.Context) error {
	s.once.Do(func() { s.err = s.LockSession.Close(ctx) })
	return s.err
}

// migratedSchema migrates a fresh schema on pool, dropped when the test ends.
func migratedSchema(tb testing.TB, pool *pgxpool.Pool) string {
	tb.Helper()
	schema := testdb.Schema(tb, pool)
	c, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()))
	require.NoError(tb, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(tb, c.Migrate(ctx))
	return schema
}

func TestLockerConformance(t *testing.T) {
	t.Parallel()
	for _, impl := range lockerImpls() {
		t.Run(impl.name, func(t *testing.T) {
			t.Parallel()
			runLockerConformance(t, impl)
		})
	}
}

// runLockerConformance runs every case against impl, each in a fresh lock
// space. Worker ids are 1, 2, 3 within a case.
func runLockerConformance(t *testing.T, impl lockerImpl) {
	cases := []struct {
		name string
		run  func(t *testing.T, open openSession)
	}{
		{"ExclusiveDeniesOtherWorker", lockExclusiveDeniesOtherWorker},
		{"SharedSharedBothGranted", lockSharedSharedBothGranted},
		{"SharedDeniesExclusive", lockSharedDeniesExclusive},
		{"ExclusiveDeniesShared", lockExclusiveDeniesShared},
		{"AllOrNothing", lockAllOrNothing},
		{"BatchResultsInOrder", lockBatchResultsInOrder},
		{"ReleaseIsOwnerChecked", lockReleaseIsOwnerChecked},
		{"ReleaseThenReacquire", lockReleaseThenReacquire},
		{"SharedTwoOwnersOneSession", lockSharedTwoOwnersOneSession},
		{"ExclusiveOnNameHeldBySameSession", lockExclusiveOnNameHeldBySameSession},
		{"FencingTokens", lockFencingTokens},
		{"CloseReleasesEverything", lockCloseReleasesEverything},
		{"ResourceNames", lockResourceNames},
		{"Batch100", lockBatch100},
		{"EmptyCalls", lockEmptyCalls},
		{"CanceledCallKeepsOtherGrants", lockCanceledCallKeepsOtherGrants},
		{"CanceledReleaseCanBeRetried", lockCanceledReleaseCanBeRetried},
		{"ConcurrentCallers", lockConcurrentCallers},
		{"ReleaseThenAcquire", lockReleaseThenAcquire},
		{"FailedReleaseThenAcquireIsReleasable", lockFailedReleaseThenAcquireIsReleasable},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			c.run(t, impl.newSpace(t))
		})
	}
}

func lockExclusiveDeniesOtherWorker(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	requireGrant(t, a, exclReq(lockOwner(1, 1), "x"))
	requireDeny(t, b, exclReq(lockOwner(2, 1), "x"))
	requireDeny(t, b, sharedReq(lockOwner(2, 2), "x"))
	// The denials took nothing and left the holder's grant alone.
	requireNamesTaken(t, b, 2, "x")
	lockRelease(t, a, lockOwner(1, 1))
	requireGrant(t, b, exclReq(lockOwner(2, 3), "x"))
	requireNamesTaken(t, a, 1, "x")
}

func lockSharedSharedBothGranted(t *testing.T, open openSession) {
	a, b, c := open(t, 1, nil), open(t, 2, nil), open(t, 3, nil)
	requireGrant(t, a, sharedReq(lockOwner(1, 1), "s"))
	requireGrant(t, b, sharedReq(lockOwner(2, 1), "s"))
	requireGrant(t, c, sharedReq(lockOwner(3, 1), "s", "t"))
	requireDeny(t, c, exclReq(lockOwner(3, 2), "s"))
}

func lockSharedDeniesExclusive(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	requireGrant(t, a, sharedReq(lockOwner(1, 1), "s"))
	requireDeny(t, b, exclReq(lockOwner(2, 1), "s"))
	requireDeny(t, b, tasking.LockRequest{Owner: lockOwner(2, 2), Exclusive: []string{"s"}, Shared: []string{"t"}})
	requireNamesFree(t, b, 2, "t")
	lockRelease(t, a, lockOwner(1, 1))
	requireGrant(t, b, exclReq(lockOwner(2, 3), "s"))
}

func lockExclusiveDeniesShared(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	requireGrant(t, a, exclReq(lockOwner(1, 1), "x", "y"))
	requireDeny(t, b, sharedReq(lockOwner(2, 1), "y"))
	requireDeny(t, b, sharedReq(lockOwner(2, 2), "free", "x"))
	requireDeny(t, b, tasking.LockRequest{Owner: lockOwner(2, 3), Exclusive: []string{"free"}, Shared: []string{"x"}})
	requireNamesFree(t, b, 2, "free")
	lockRelease(t, a, lockOwner(1, 1))
	requireGrant(t, b, sharedReq(lockOwner(2, 4), "x", "y"))
}

func lockAllOrNothing(t *testing.T, open openSession) {
	a, b, c := open(t, 1, nil), open(t, 2, nil), open(t, 3, nil)
	requireGrant(t, b, exclReq(lockOwner(2, 1), "bx"))
	requireGrant(t, b, sharedReq(lockOwner(2, 2), "bs"))

	// The free name comes first, so an implementation that takes names one
	// by one has taken it before it meets the held one.
	requireDeny(t, a, exclReq(lockOwner(1, 1), "a1", "bx"))
	requireDeny(t, a, tasking.LockRequest{Owner: lockOwner(1, 2), Exclusive: []string{"a2"}, Shared: []string{"bx"}})
	requireDeny(t, a, tasking.LockRequest{Owner: lockOwner(1, 3), Exclusive: []string{"bs"}, Shared: []string{"a3"}})
	requireDeny(t, a, exclReq(lockOwner(1, 4), "a4", "a5", "bs"))

	requireNamesFree(t, c, 3, "a1", "a2", "a3", "a4", "a5")
	requireNamesFree(t, a, 1, "a1", "a2", "a3", "a4", "a5")
	// B's grants were not touched either.
	requireNamesTaken(t, c, 3, "bx", "bs")
	requireGrant(t, c, sharedReq(lockOwner(3, 1), "bs"))
}

func lockBatchResultsInOrder(t *testing.T, open openSession) {
	a, b, c := open(t, 1, nil), open(t, 2, nil), open(t, 3, nil)
	requireGrant(t, b, exclReq(lockOwner(2, 1), "hx1", "hx2"))
	requireGrant(t, b, sharedReq(lockOwner(2, 2), "hs1", "hs2", "hs3"))

	// No two requests of the batch conflict with each other (the contract);
	// request i is task i+1.
	fences := lockTry(t, a,
		exclReq(lockOwner(1, 1), "f1"),
		exclReq(lockOwner(1, 2), "hx1"), // exclusive elsewhere
		sharedReq(lockOwner(1, 3), "hs1"),
		tasking.LockRequest{Owner: lockOwner(1, 4), Exclusive: []string{"f2"}, Shared: []string{"hx2"}}, // exclusive elsewhere
		exclReq(lockOwner(1, 5), "f3", "hs3"), // shared elsewhere
		tasking.LockRequest{Owner: lockOwner(1, 6), Exclusive: []string{"f4"}, Shared: []string{"hs1", "f5"}},
		sharedReq(lockOwner(1, 7), "f5", "hs2"),
	)
	granted := []bool{true, false, true, false, false, true, true}
	for i, want := range granted {
		if want {
			require.Positive(t, fences[i], "request %d: want granted; fences %v", i, fences)
		} else {
			require.Zero(t, fences[i], "request %d: want denied; fences %v", i, fences)
		}
	}
	requireNamesTaken(t, c, 3, "f1", "f4", "f5")
	requireNamesFree(t, c, 3, "f2", "f3")
	// Each granted request got its own grant: releasing some keeps the others.
	lockRelease(t, a, lockOwner(1, 1), lockOwner(1, 6))
	requireNamesFree(t, c, 3, "f1", "f4")
	requireNamesTaken(t, c, 3, "f5")
	lockRelease(t, a, lockOwner(1, 7))
	requireNamesFree(t, c, 3, "f5")
	// A's shared grant on hs1 went with lockOwner(1, 6) or stays with lockOwner(1, 3):
	// either way B's grant still holds it.
	lockRelease(t, b, lockOwner(2, 2))
	requireNamesTaken(t, c, 3, "hs1")
	lockRelease(t, a, lockOwner(1, 3))
	requireNamesFree(t, c, 3, "hs1", "hs2", "hs3")
}

func lockReleaseIsOwnerChecked(t *testing.T, open openSession) {
	a, b, c := open(t, 1, nil), open(t, 2, nil), open(t, 3, nil)
	requireGrant(t, a, exclReq(lockOwner(1, 1), "ax"))
	requireGrant(t, a, sharedReq(lockOwner(1, 2), "as"))
	requireGrant(t, b, exclReq(lockOwner(2, 1), "bx")) // the same task as A's first, another worker

	// Owners that hold nothing, among them owners of the same tasks as the
	// grants but of a worker that holds nothing.
	lockRelease(t, a, lockOwner(1, 99), lockOwner(3, 1), lockOwner(3, 2))
	lockRelease(t, b, lockOwner(2, 99), lockOwner(3, 1))
	lockRelease(t, c, lockOwner(3, 1), lockOwner(3, 2))
	requireNamesTaken(t, c, 3, "ax", "as", "bx")

	// Another worker's owners, through the wrong session: a session
	// releases only its own grants.
	lockRelease(t, b, lockOwner(1, 1), lockOwner(1, 2))
	lockRelease(t, a, lockOwner(2, 1))
	lockRelease(t, c, lockOwner(1, 1), lockOwner(1, 2), lockOwner(2, 1))
	requireNamesTaken(t, c, 3, "ax", "as", "bx")

	// An owner that was denied holds nothing either.
	requireDeny(t, c, exclReq(lockOwner(3, 1), "c1", "ax"))
	lockRelease(t, c, lockOwner(3, 1))
	requireNamesTaken(t, b, 2, "ax", "as")

	// The right owner through the right session does release.
	lockRelease(t, a, lockOwner(1, 1), lockOwner(1, 2))
	lockRelease(t, b, lockOwner(2, 1))
	requireNamesFree(t, c, 3, "ax", "as", "bx", "c1")
}

func lockReleaseThenReacquire(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	for round := range 3 {
		requireGrant(t, a, tasking.LockRequest{Owner: lockOwner(1, 1), Exclusive: []string{"x"}, Shared: []string{"s"}})
		requireNamesTaken(t, b, 2, "x", "s")
		lockRelease(t, a, lockOwner(1, 1))
		requireNamesFree(t, b, 2, "x", "s")
		// The other worker takes them in turn, then gives them back.
		requireGrant(t, b, exclReq(lockOwner(2, int64(round)+1), "x", "s"))
		requireNamesTaken(t, a, 1, "x", "s")
		lockRelease(t, b, lockOwner(2, int64(round)+1))
	}
}

func lockSharedTwoOwnersOneSession(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	// x: the owners ask in separate calls; y: in one batch.
	requireGrant(t, a, sharedReq(lockOwner(1, 1), "x"))
	requireGrant(t, a, sharedReq(lockOwner(1, 2), "x"))
	fences := lockTry(t, a, sharedReq(lockOwner(1, 3), "y"), sharedReq(lockOwner(1, 4), "y"))
	require.Positive(t, fences[0])
	require.Positive(t, fences[1])
	requireDeny(t, b, exclReq(lockOwner(2, 1), "x"))
	requireDeny(t, b, exclReq(lockOwner(2, 2), "y"))

	lockRelease(t, a, lockOwner(1, 1), lockOwner(1, 3))
	requireDeny(t, b, exclReq(lockOwner(2, 3), "x"))
	requireDeny(t, b, exclReq(lockOwner(2, 4), "y"))
	requireGrant(t, b, sharedReq(lockOwner(2, 5), "x", "y")) // still shared, not exclusive
	lockRelease(t, b, lockOwner(2, 5))

	lockRelease(t, a, lockOwner(1, 2), lockOwner(1, 4))
	requireGrant(t, b, exclReq(lockOwner(2, 6), "x", "y"))
}

// PostgreSQL advisory locks are re-entrant per session, and a session never
// conflicts with itself on the server: the locker must catch these itself.
func lockExclusiveOnNameHeldBySameSession(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	requireGrant(t, a, sharedReq(lockOwner(1, 1), "s"))
	requireGrant(t, a, exclReq(lockOwner(1, 2), "x"))

	requireDeny(t, a, exclReq(lockOwner(1, 3), "s"))
	requireDeny(t, a, exclReq(lockOwner(1, 4), "x"))
	requireDeny(t, a, sharedReq(lockOwner(1, 5), "x"))
	requireDeny(t, a, tasking.LockRequest{Owner: lockOwner(1, 6), Exclusive: []string{"free"}, Shared: []string{"x"}})
	requireDeny(t, a, exclReq(lockOwner(1, 7), "free", "s"))
	// In one batch with an unrelated grant.
	fences := lockTry(t, a, exclReq(lockOwner(1, 8), "other"), exclReq(lockOwner(1, 9), "x"))
	require.Positive(t, fences[0])
	require.Zero(t, fences[1])
	lockRelease(t, a, lockOwner(1, 8))

	// Nothing changed: the denied owners hold nothing, the grants stand.
	lockRelease(t, a, lockOwner(1, 3), lockOwner(1, 4), lockOwner(1, 5), lockOwner(1, 6), lockOwner(1, 7), lockOwner(1, 9))
	requireNamesFree(t, b, 2, "free", "other")
	requireNamesTaken(t, b, 2, "s", "x")
	lockRelease(t, a, lockOwner(1, 1))
	requireNamesTaken(t, b, 2, "x")
	requireNamesFree(t, b, 2, "s")
	lockRelease(t, a, lockOwner(1, 2))
	requireNamesFree(t, b, 2, "x")
}

func lockFencingTokens(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	var last int64
	next := func(f int64, what string) {
		t.Helper()
		require.Greater(t, f, last, "%s: fence %d after %d", what, f, last)
		last = f
	}
	next(requireGrant(t, a, exclReq(lockOwner(1, 1), "f1")), "first grant")
	next(requireGrant(t, b, exclReq(lockOwner(2, 1), "f2")), "other session")
	requireDeny(t, b, exclReq(lockOwner(2, 2), "f1")) // fence 0
	next(requireGrant(t, a, sharedReq(lockOwner(1, 2), "s")), "shared")
	// A shared name this session already holds may be granted without the
	// server; it still gets a fresh token.
	next(requireGrant(t, a, sharedReq(lockOwner(1, 3), "s")), "shared again, same session")
	next(requireGrant(t, b, sharedReq(lockOwner(2, 3), "s")), "shared, other session")

	fences := lockTry(t, a, exclReq(lockOwner(1, 4), "g1"), exclReq(lockOwner(1, 5), "f2"), sharedReq(lockOwner(1, 6), "s", "g2"))
	require.Zero(t, fences[1], "denied request")
	require.Greater(t, fences[0], last)
	require.Greater(t, fences[2], last)
	require.NotEqual(t, fences[0], fences[2])
	last = max(fences[0], fences[2])

	next(requireGrant(t, b, exclReq(lockOwner(2, 4), "g3")), "after a batch")
	lockRelease(t, a, lockOwner(1, 1))
	next(requireGrant(t, b, exclReq(lockOwner(2, 5), "f1")), "a released name")
	lockRelease(t, b, lockOwner(2, 5))
	next(requireGrant(t, a, exclReq(lockOwner(1, 1), "f1")), "the same owner again")
}

func lockCloseReleasesEverything(t *testing.T, open openSession) {
	a, b, c := open(t, 1, nil), open(t, 2, nil), open(t, 3, nil)
	requireGrant(t, a, exclReq(lockOwner(1, 1), "x", "y"))
	requireGrant(t, a, sharedReq(lockOwner(1, 2), "s"))
	requireGrant(t, a, sharedReq(lockOwner(1, 3), "s", "t"))
	requireGrant(t, b, sharedReq(lockOwner(2, 1), "t"))
	requireDeny(t, a, exclReq(lockOwner(1, 4), "z", "t"))

	require.NoError(t, a.Close(t.Context()))
	requireNamesFree(t, c, 3, "x", "y", "s", "z")
	requireNamesTaken(t, c, 3, "t") // B's shared grant is B's
	requireGrant(t, c, sharedReq(lockOwner(3, 1), "t"))
	lockRelease(t, b, lockOwner(2, 1))
	lockRelease(t, c, lockOwner(3, 1))
	requireNamesFree(t, c, 3, "t")
}

func lockResourceNames(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	names := []string{
		"with space",
		" padded ",
		"{braces}",
		"{tag}:key",
		"a:b:c",
		"ünïcødé ✓ 資源 🔒",
		`quote' "double" back\slash`,
		"%_*?[]()$1;--",
		strings.Repeat("n", 1024),
		strings.Repeat("é", 512), // 1 KiB of two-byte runes
	}
	// Names that differ from those by little must not collide with them.
	near := []string{
		"with  space",
		"padded",
		"{braces",
		"{tag}:key:",
		"a:b",
		"ünïcødé ✓ 資源",
		`quote' "double" back\\slash`,
		"%_*?[]()$1;-",
		strings.Repeat("n", 1023) + "m",
		strings.Repeat("é", 511) + "e",
	}
	reqs := make([]tasking.LockRequest, len(names))
	for i, n := range names {
		reqs[i] = exclReq(lockOwner(1, int64(i)+1), n)
	}
	for i, f := range lockTry(t, a, reqs...) {
		require.Positive(t, f, "%q denied", names[i])
	}
	requireNamesTaken(t, b, 2, names...)
	for i, n := range names {
		requireDeny(t, b, sharedReq(lockOwner(2, int64(i)+1), n))
	}
	requireNamesFree(t, b, 2, near...)

	lockRelease(t, a, ownersOf(reqs)...)
	requireGrant(t, b, sharedReq(lockOwner(2, 100), names...))
	requireDeny(t, a, exclReq(lockOwner(1, 100), names[len(names)-1]))
	requireGrant(t, a, sharedReq(lockOwner(1, 101), names...))
}

func lockBatch100(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	const n = 100
	reqsA, reqsB := lockBatch(1, n), lockBatch(2, n)
	fences := lockTry(t, a, reqsA...)
	seen := make(map[int64]bool, n)
	for i, f := range fences {
		require.Positive(t, f, "request %d denied", i)
		require.False(t, seen[f], "fence %d given twice", f)
		seen[f] = true
	}
	for i, f := range lockTry(t, b, reqsB...) {
		require.Zero(t, f, "request %d granted, want denied", i)
	}
	requireGrant(t, b, sharedReq(lockOwner(2, 1000), "s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"))
	lockRelease(t, b, lockOwner(2, 1000))

	lockRelease(t, a, ownersOf(reqsA)...)
	for i, f := range lockTry(t, b, reqsB...) {
		require.Positive(t, f, "request %d denied after release", i)
	}
	requireNamesTaken(t, a, 1, "e000", "e099", "s0", "s9")
	lockRelease(t, b, ownersOf(reqsB)...)
	requireNamesFree(t, a, 1, "e000", "e099", "s0", "s9")
}

func lockEmptyCalls(t *testing.T, open openSession) {
	a := open(t, 1, nil)
	fences, err := a.TryAcquire(t.Context(), nil)
	require.NoError(t, err)
	require.Empty(t, fences)
	require.NoError(t, a.Release(t.Context(), nil))
	requireGrant(t, a, exclReq(lockOwner(1, 1), "x"))
	require.NoError(t, a.Release(t.Context(), nil))
	requireNamesTaken(t, open(t, 2, nil), 2, "x")
}

// A call whose context is already done fails without costing the session
// its other grants: a worker's shutdown must not turn into "lock lost" for
// the tasks still running.
func lockCanceledCallKeepsOtherGrants(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	requireGrant(t, a, exclReq(lockOwner(1, 1), "x"))
	requireGrant(t, a, sharedReq(lockOwner(1, 2), "s"))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := a.TryAcquire(ctx, []tasking.LockRequest{exclReq(lockOwner(1, 3), "y")})
	require.ErrorIs(t, err, context.Canceled)
	lockRelease(t, a, lockOwner(1, 3)) // as the worker does after a failed acquire
	requireNamesTaken(t, b, 2, "x", "s")
	requireNamesFree(t, b, 2, "y")
	requireGrant(t, a, exclReq(lockOwner(1, 4), "z"))
}

// A Release whose context is already done may fail, but must leave the
// owner's grants releasable: a retry frees them. (A locker that forgets the
// grants locally while the server still holds them leaks the names until
// the session closes.)
func lockCanceledReleaseCanBeRetried(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	requireGrant(t, a, exclReq(lockOwner(1, 1), "x"))
	requireGrant(t, a, sharedReq(lockOwner(1, 2), "s"))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	err := a.Release(ctx, []tasking.Owner{lockOwner(1, 1), lockOwner(1, 2)})
	if err != nil {
		require.ErrorIs(t, err, context.Canceled)
	}
	lockRelease(t, a, lockOwner(1, 1), lockOwner(1, 2))
	requireNamesFree(t, b, 2, "x", "s")
}

// ConcurrentCallers: several goroutines per session, two sessions, readers
// and writers of one name, until each kind has been granted often enough.
// No two writers, and no writer and reader, ever hold it together.
func lockConcurrentCallers(t *testing.T, open openSession) {
	sessions := []tasking.LockSession{open(t, 1, nil), open(t, 2, nil)}
	const perSession, target = 4, 25
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var writers, readers, writeGrants, readGrants atomic.Int64
	var task atomic.Int64
	var wg sync.WaitGroup
	for si, s := range sessions {
		worker := int64(si) + 1
		for g := range perSession {
			write := g%2 == 0
			wg.Go(func() {
				for ctx.Err() == nil && (writeGrants.Load() < target || readGrants.Load() < target) {
					o := tasking.Owner{Worker: worker, Task: task.Add(1)}
					r := tasking.LockRequest{Owner: o, Shared: []string{"hot"}}
					if write {
						r = tasking.LockRequest{Owner: o, Exclusive: []string{"hot"}, Shared: []string{"warm"}}
					}
					fences, err := s.TryAcquire(ctx, []tasking.LockRequest{r})
					if err != nil {
						if ctx.Err() == nil {
							t.Errorf("TryAcquire: %v", err)
						}
						return
					}
					if fences[0] > 0 {
						if write {
							if w := writers.Add(1); w != 1 || readers.Load() != 0 {
								t.Errorf("writer granted beside %d writers and %d readers", w-1, readers.Load())
							}
							runtime.Gosched()
							writers.Add(-1)
							writeGrants.Add(1)
						} else {
							readers.Add(1)
							if w := writers.Load(); w != 0 {
								t.Errorf("reader granted beside %d writers", w)
							}
							runtime.Gosched()
							readers.Add(-1)
							readGrants.Add(1)
						}
					}
					if err := s.Release(context.WithoutCancel(ctx), []tasking.Owner{o}); err != nil {
						t.Errorf("Release: %v", err)
						return
					}
					runtime.Gosched()
				}
			})
		}
	}
	wg.Wait()
	require.NoError(t, ctx.Err(), "%d writer and %d reader grants in 30s, want %d of each",
		writeGrants.Load(), readGrants.Load(), target)
	requireNamesFree(t, sessions[0], 1, "hot", "warm")
}

// lockBatch returns n requests of worker, each exclusive on its own name
// (e000...) and shared on one of ten (s0...s9).
// releaseThenAcquirer returns the session under s, skipping the test if it
// has no release-and-acquire in one call (the memory locker).
func releaseThenAcquirer(t *testing.T, s tasking.LockSession) tasking.LockSession {
	t.Helper()
	inner := s.(*closeOnce).LockSession
	if !tasking.CanReleaseThenAcquire(inner) {
		t.Skip("no release-and-acquire in one call")
	}
	return inner
}

// The worker's call after a step: the finished tasks' grants go first, so a
// claimed task may get what a finished one held, in the same call.
func lockReleaseThenAcquire(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	inner := releaseThenAcquirer(t, a)
	both := func(owners []tasking.Owner, reqs ...tasking.LockRequest) []int64 {
		t.Helper()
		fences, err := tasking.ReleaseThenAcquire(t.Context(), inner, owners, reqs)
		require.NoError(t, err)
		require.Len(t, fences, len(reqs))
		return fences
	}

	fx := requireGrant(t, a, exclReq(lockOwner(1, 1), "x", "y"))
	requireGrant(t, a, sharedReq(lockOwner(1, 2), "s"))
	requireGrant(t, b, exclReq(lockOwner(2, 1), "b"))

	got := both([]tasking.Owner{lockOwner(1, 1)},
		exclReq(lockOwner(1, 3), "x"),      // what the finished task held
		sharedReq(lockOwner(1, 4), "s"),    // shared with a running task of this session
		exclReq(lockOwner(1, 5), "z"),      // new
		exclReq(lockOwner(1, 6), "w", "b")) // held by the other worker: denied
	require.Greater(t, got[0], fx, "a new grant on x draws a newer fencing token")
	require.Positive(t, got[1])
	require.Positive(t, got[2])
	require.Zero(t, got[3])
	requireNamesFree(t, b, 2, "y", "w")
	requireNamesTaken(t, b, 2, "x", "s", "z")

	// Nothing to acquire: the release still happens.
	require.Empty(t, both([]tasking.Owner{lockOwner(1, 3), lockOwner(1, 2)}))
	requireNamesFree(t, b, 2, "x")
	requireNamesTaken(t, b, 2, "s", "z") // owner (1, 4) still holds s
	// Another worker's owner is not released by this session.
	require.Empty(t, both([]tasking.Owner{lockOwner(2, 1)}))
	requireNamesTaken(t, a, 1, "b")
	lockRelease(t, a, lockOwner(1, 4), lockOwner(1, 5))
	requireNamesFree(t, b, 2, "s", "z")
}

// A release-and-acquire that fails (here: its context is already done)
// leaves nothing held for good: a Release of the owners it released and of
// its requests frees every name, as the worker does after a failed call,
// and the session goes on.
func lockFailedReleaseThenAcquireIsReleasable(t *testing.T, open openSession) {
	a, b := open(t, 1, nil), open(t, 2, nil)
	inner := releaseThenAcquirer(t, a)
	done, cancel := context.WithCancel(t.Context())
	cancel()

	requireGrant(t, a, exclReq(lockOwner(1, 1), "x"))
	requireGrant(t, a, sharedReq(lockOwner(1, 2), "s"))
	_, err := tasking.ReleaseThenAcquire(done, inner, []tasking.Owner{lockOwner(1, 1), lockOwner(1, 2)},
		[]tasking.LockRequest{exclReq(lockOwner(1, 3), "z")})
	require.Error(t, err)
	lockRelease(t, a, lockOwner(1, 1), lockOwner(1, 2), lockOwner(1, 3))
	requireNamesFree(t, b, 2, "x", "s", "z")
	requireGrant(t, a, exclReq(lockOwner(1, 4), "x", "z"))
	requireNamesTaken(t, b, 2, "x", "z")
}

func lockBatch(worker int64, n int) []tasking.LockRequest {
	reqs := make([]tasking.LockRequest, n)
	for i := range reqs {
		reqs[i] = tasking.LockRequest{
			Owner:     lockOwner(worker, int64(i)+1),
			Exclusive: []string{fmt.Sprintf("e%03d", i)},
			Shared:    []string{fmt.Sprintf("s%d", i%10)},
		}
	}
	return reqs
}

func ownersOf(reqs []tasking.LockRequest) []tasking.Owner {
	out := make([]tasking.Owner, len(reqs))
	for i, r := range reqs {
		out[i] = r.Owner
	}
	return out
}

func lockOwner(worker, task int64) tasking.Owner { return tasking.Owner{Worker: worker, Task: task} }

func exclReq(o tasking.Owner, names ...string) tasking.LockRequest {
	return tasking.LockRequest{Owner: o, Exclusive: names}
}

func sharedReq(o tasking.Owner, names ...string) tasking.LockRequest {
	return tasking.LockRequest{Owner: o, Shared: names}
}

func lockTry(t testing.TB, s tasking.LockSession, reqs ...tasking.LockRequest) []int64 {
	t.Helper()
	fences, err := s.TryAcquire(t.Context(), reqs)
	require.NoError(t, err)
	require.Len(t, fences, len(reqs))
	return fences
}

func requireGrant(t testing.TB, s tasking.LockSession, r tasking.LockRequest) int64 {
	t.Helper()
	f := lockTry(t, s, r)[0]
	require.Positive(t, f, "%+v denied, want granted", r)
	return f
}

func requireDeny(t testing.TB, s tasking.LockSession, r tasking.LockRequest) {
	t.Helper()
	f := lockTry(t, s, r)[0]
	require.Zero(t, f, "%+v granted (fence %d), want denied", r, f)
}

func lockRelease(t testing.TB, s tasking.LockSession, owners ...tasking.Owner) {
	t.Helper()
	require.NoError(t, s.Release(t.Context(), owners))
}

// probeTask numbers the owners of probes, far from the tasks a case names.
var probeTask atomic.Int64

func probeOwner(worker int64) tasking.Owner {
	return tasking.Owner{Worker: worker, Task: 1<<40 + probeTask.Add(1)}
}

// requireFree checks that probe's worker can take each name exclusively,
// and gives it back.
func requireNamesFree(t testing.TB, probe tasking.LockSession, worker int64, names ...string) {
	t.Helper()
	for _, n := range names {
		o := probeOwner(worker)
		f := lockTry(t, probe, exclReq(o, n))[0]
		lockRelease(t, probe, o)
		require.Positive(t, f, "%.40q: held, want free for worker %d", n, worker)
	}
}

// requireTaken checks that probe's worker can take none of names
// exclusively: someone holds each, in some mode.
func requireNamesTaken(t testing.TB, probe tasking.LockSession, worker int64, names ...string) {
	t.Helper()
	for _, n := range names {
		o := probeOwner(worker)
		f := lockTry(t, probe, exclReq(o, n))[0]
		if f > 0 {
			lockRelease(t, probe, o)
		}
		require.Zero(t, f, "%.40q: free for worker %d, want held", n, worker)
	}
}

// BenchmarkLockerAcquireRelease: one session grants and releases a batch of
// 80 requests, each exclusive on its own name and shared on one of ten.
func BenchmarkLockerAcquireRelease(b *testing.B) {
	for _, impl := range lockerImpls() {
		b.Run(impl.name, func(b *testing.B) {
			s := impl.newSpace(b)(b, 1, nil)
			const batch = 80
			reqs := lockBatch(1, batch)
			owners := ownersOf(reqs)
			ctx := b.Context()
			for b.Loop() {
				fences, err := s.TryAcquire(ctx, reqs)
				if err != nil {
					b.Fatal(err)
				}
				for i, f := range fences {
					if f == 0 {
						b.Fatalf("request %d denied", i)
					}
				}
				if err := s.Release(ctx, owners); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "requests/s")
		})
	}
}
