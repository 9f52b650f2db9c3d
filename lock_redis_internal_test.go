package tasking

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking/internal/testdb"
)

func testRedis(t *testing.T) rueidis.Client {
	t.Helper()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{testdb.RedisAddr()}, DisableCache: true})
	require.NoError(t, err)
	t.Cleanup(rdb.Close)
	return rdb
}

type lostRecord struct {
	mu     sync.Mutex
	owners []Owner
	causes []error
	ch     chan struct{}
}

func newLostRecord() *lostRecord { return &lostRecord{ch: make(chan struct{}, 16)} }

func (r *lostRecord) onLost(owners []Owner, cause error) {
	r.mu.Lock()
	r.owners = append(r.owners, owners...)
	r.causes = append(r.causes, cause)
	r.mu.Unlock()
	select {
	case r.ch <- struct{}{}:
	default:
	}
}

// TestRedisLeaseExpiresWhenRenewalStops: a session whose renewals stop (as
// in a paused process) keeps its grants for exactly the lease; then another
// worker gets the names, and when the first session resumes it learns from
// Redis that it lost them, reports that through OnLost, and its release
// does not touch the new holder's grant.
func TestRedisLeaseExpiresWhenRenewalStops(t *testing.T) {
	t.Parallel()
	const lease = 300 * time.Millisecond
	ns := testdb.Name("lease")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	resume := make(chan struct{})
	paused := NewRedisLocker(testRedis(t), WithRedisNamespace(ns), WithRedisLease(lease)).(*redisLocker)
	paused.beforeRenew = func() { <-resume }
	lostA := newLostRecord()
	a, err := paused.Open(ctx, LockSessionConfig{Worker: 1, Schema: "unused", OnLost: lostA.onLost})
	require.NoError(t, err)
	resumed := false
	defer func() {
		if !resumed {
			close(resume)
		}
		require.NoError(t, a.Close(context.Background()))
	}()

	healthy := NewRedisLocker(testRedis(t), WithRedisNamespace(ns), WithRedisLease(lease))
	b, err := healthy.Open(ctx, LockSessionConfig{Worker: 2, Schema: "unused"})
	require.NoError(t, err)
	defer func() { require.NoError(t, b.Close(context.Background())) }()

	ownerA := Owner{Worker: 1, Task: 10}
	sent := time.Now()
	f, err := a.TryAcquire(ctx, []LockRequest{{Owner: ownerA, Exclusive: []string{"n"}, Shared: []string{"m"}}})
	require.NoError(t, err)
	require.Positive(t, f[0])

	// B wants n exclusively and m exclusively: both wait for A's lease.
	ownerB := Owner{Worker: 2, Task: 11}
	var got time.Duration
	for {
		f, err := b.TryAcquire(ctx, []LockRequest{{Owner: ownerB, Exclusive: []string{"n", "m"}}})
		require.NoError(t, err)
		if f[0] > 0 {
			got = time.Since(sent)
			break
		}
		require.NoError(t, ctx.Err())
		time.Sleep(5 * time.Millisecond)
	}
	require.GreaterOrEqual(t, got, lease, "the lease was cut short")
	t.Logf("B was granted %v after A's acquire (lease %v)", got, lease)
	select {
	case <-lostA.ch:
		t.Fatal("OnLost called while renewal was paused")
	default:
	}

	// A resumes: its next renewal finds the grant gone and reports it.
	close(resume)
	resumed = true
	select {
	case <-lostA.ch:
	case <-ctx.Done():
		t.Fatal("OnLost not called after the renewal resumed")
	}
	lostA.mu.Lock()
	require.Equal(t, []Owner{ownerA}, lostA.owners)
	require.ErrorIs(t, lostA.causes[0], ErrLockLost)
	lostA.mu.Unlock()

	// A's release must not free B's grant (compare-and-delete).
	require.NoError(t, a.Release(ctx, []Owner{ownerA}))
	f, err = a.TryAcquire(ctx, []LockRequest{{Owner: Owner{Worker: 1, Task: 12}, Shared: []string{"n"}}})
	require.NoError(t, err)
	require.Zero(t, f[0], "B's exclusive grant must survive A's release")
}

// TestRedisLeaseCheckAfterPause: a handler that returns after its lease may
// have run out (the renewal goroutine could not run) has its grant reported
// lost before the worker decides the outcome.
func TestRedisLeaseCheckAfterPause(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resume := make(chan struct{})
	const lease = 500 * time.Millisecond // room for a loaded machine before the fresh check
	l := NewRedisLocker(testRedis(t), WithRedisNamespace(testdb.Name("pause")), WithRedisLease(lease)).(*redisLocker)
	l.beforeRenew = func() { <-resume }
	lost := newLostRecord()
	s, err := l.Open(ctx, LockSessionConfig{Worker: 1, OnLost: lost.onLost})
	require.NoError(t, err)
	defer func() { close(resume); require.NoError(t, s.Close(context.Background())) }()

	o := Owner{Worker: 1, Task: 1}
	f, err := s.TryAcquire(ctx, []LockRequest{{Owner: o, Exclusive: []string{"p"}}})
	require.NoError(t, err)
	require.Positive(t, f[0])
	lc := s.(LeaseChecker)
	lc.CheckLease(o) // fresh: nothing to report
	select {
	case <-lost.ch:
		t.Fatal("a fresh grant was reported lost")
	default:
	}
	time.Sleep(lease) // with renewal paused
	lc.CheckLease(o)
	select {
	case <-lost.ch:
	default:
		t.Fatal("an overdue grant was not reported")
	}
	require.ErrorIs(t, lost.causes[0], ErrLockLost)
}

// TestRedisFreeWorker: cleanup frees every grant of a gone worker from its
// registry, and nothing of other workers.
func TestRedisFreeWorker(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	schema := testdb.Name("free")
	l := NewRedisLocker(testRedis(t)).(*redisLocker) // namespace from the schema
	gone, err := l.Open(ctx, LockSessionConfig{Worker: 7, Schema: schema})
	require.NoError(t, err)
	other, err := l.Open(ctx, LockSessionConfig{Worker: 8, Schema: schema})
	require.NoError(t, err)
	defer func() { require.NoError(t, other.Close(context.Background())) }()

	f, err := gone.TryAcquire(ctx, []LockRequest{
		{Owner: Owner{7, 1}, Exclusive: []string{"a", "b c"}},
		{Owner: Owner{7, 2}, Shared: []string{"s{}"}},
	})
	require.NoError(t, err)
	require.True(t, f[0] > 0 && f[1] > 0)
	f, err = other.TryAcquire(ctx, []LockRequest{{Owner: Owner{8, 3}, Exclusive: []string{"d"}}, {Owner: Owner{8, 4}, Shared: []string{"s{}"}}})
	require.NoError(t, err)
	require.True(t, f[0] > 0 && f[1] > 0)
	// The gone worker stops renewing without releasing anything.
	gs := gone.(*redisSession)
	close(gs.stop)
	gs.wg.Wait()

	require.NoError(t, l.freeWorker(ctx, schema, 7))
	probe, err := l.Open(ctx, LockSessionConfig{Worker: 9, Schema: schema})
	require.NoError(t, err)
	defer func() { require.NoError(t, probe.Close(context.Background())) }()
	f, err = probe.TryAcquire(ctx, []LockRequest{
		{Owner: Owner{9, 1}, Exclusive: []string{"a", "b c"}}, // freed
		{Owner: Owner{9, 2}, Exclusive: []string{"d"}},        // still worker 8's
		{Owner: Owner{9, 3}, Exclusive: []string{"s{}"}},      // worker 8 still shares it
	})
	require.NoError(t, err)
	require.Positive(t, f[0])
	require.Zero(t, f[1])
	require.Zero(t, f[2])
	n, err := l.rdb.Do(ctx, l.rdb.B().Exists().Key(registryKey(redisTag(schema), 7)).Build()).AsInt64()
	require.NoError(t, err)
	require.Zero(t, n, "the gone worker's registry must be empty")
	require.NoError(t, l.freeWorker(ctx, schema, 7), "freeing twice is a no-op")
}

// TestRedisRenewFreesWhatALostOwnerStillHolds: an owner that lost one of its
// names (here its key was deleted, as after a lost lease taken over) is
// reported lost by the next renewal, and that renewal frees its other names
// at once, exclusive and shared, rather than holding them for the rest of
// the lease.
func TestRedisRenewFreesWhatALostOwnerStillHolds(t *testing.T) {
	t.Parallel()
	ns := testdb.Name("renewfree")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rdb := testRedis(t)
	l := NewRedisLocker(rdb, WithRedisNamespace(ns), WithRedisLease(time.Minute), WithRedisRenewInterval(50*time.Second))
	lost := newLostRecord()
	a, err := l.Open(ctx, LockSessionConfig{Worker: 1, Schema: "unused", OnLost: lost.onLost})
	require.NoError(t, err)
	defer func() { require.NoError(t, a.Close(context.Background())) }()
	b, err := l.Open(ctx, LockSessionConfig{Worker: 2, Schema: "unused"})
	require.NoError(t, err)
	defer func() { require.NoError(t, b.Close(context.Background())) }()

	ownerA := Owner{Worker: 1, Task: 10}
	f, err := a.TryAcquire(ctx, []LockRequest{{Owner: ownerA, Exclusive: []string{"p", "q"}, Shared: []string{"r"}}})
	require.NoError(t, err)
	require.Positive(t, f[0])
	require.NoError(t, rdb.Do(ctx, rdb.B().Del().Key(redisTag(ns)+"x:p").Build()).Error())

	require.NoError(t, a.(*redisSession).renewOnce())
	lost.mu.Lock()
	require.Equal(t, []Owner{ownerA}, lost.owners)
	lost.mu.Unlock()

	f, err = b.TryAcquire(ctx, []LockRequest{{Owner: Owner{Worker: 2, Task: 11}, Exclusive: []string{"q", "r"}}})
	require.NoError(t, err)
	require.Positive(t, f[0], "q and r were freed by the renewal, not held for the minute-long lease")
}
