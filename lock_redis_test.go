package tasking_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/faultenv"
	"github.com/tasking-go/tasking/internal/testdb"
)

// countingHandler counts log records whose message contains substr.
type countingHandler struct {
	slog.Handler
	substr string
	n      *atomic.Int64
}

func (h countingHandler) Handle(ctx context.Context, r slog.Record) error {
	if strings.Contains(r.Message, h.substr) {
		h.n.Add(1)
	}
	return h.Handler.Handle(ctx, r)
}

func (h countingHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return countingHandler{h.Handler.WithAttrs(as), h.substr, h.n}
}

func (h countingHandler) WithGroup(g string) slog.Handler {
	return countingHandler{h.Handler.WithGroup(g), h.substr, h.n}
}

// TestRedisLocksLost: Redis forgets a running task's grant (FLUSHALL, a
// restart without persistence, or an outage longer than the lease). The
// worker cancels the handler with cause ErrLockLost, the task ends failed
// with "lock lost", "redis unreachable" is logged once per outage, and the
// worker admits tasks again by itself once Redis is back.
func TestRedisLocksLost(t *testing.T) {
	t.Parallel()
	for _, tc := range []string{"flushall", "restart", "outage"} {
		t.Run(tc, func(t *testing.T) {
			t.Parallel()
			srv := faultenv.StartRedis(t)
			rdb := newRedis(t, srv.Addr())
			var unreachable atomic.Int64
			log := slog.New(countingHandler{quietLogger().Handler(), "redis unreachable", &unreachable})
			c := newClient(t, tasking.WithLogger(log),
				tasking.WithLocker(tasking.NewRedisLocker(rdb, tasking.WithRedisLease(time.Second))))
			ctx := ctxT(t, time.Minute)

			started := make(chan struct{}, 1)
			causes := make(chan error, 1)
			w := tasking.NewWorker(c, tasking.WithSlots(4), tasking.WithPollInterval(100*time.Millisecond))
			w.Handle("hold", func(ctx context.Context, _ *tasking.Task) error {
				started <- struct{}{}
				<-ctx.Done()
				causes <- context.Cause(ctx)
				return ctx.Err()
			})
			w.Handle("quick", func(context.Context, *tasking.Task) error { return nil })
			runWorker(t, w)

			held, err := c.Dispatch(ctx, "hold", nil, tasking.Exclusive("repo:1"))
			require.NoError(t, err)
			recv(t, started, 30*time.Second)
			switch tc {
			case "flushall":
				require.NoError(t, srv.FlushAll())
			case "restart": // a crash: no goodbye to the clients, back empty
				require.NoError(t, srv.Kill())
				require.NoError(t, srv.Start())
			case "outage":
				require.NoError(t, srv.Kill())
			}
			select {
			case cause := <-causes:
				require.ErrorIs(t, cause, tasking.ErrLockLost)
			case <-ctx.Done():
				t.Fatal("handler not canceled after its grant was lost")
			}
			done, err := c.Wait(ctx, held.ID)
			require.NoError(t, err)
			require.Equal(t, tasking.StateFailed, done.State)
			require.Contains(t, done.Error, "lock lost")

			if tc == "outage" {
				require.Equal(t, int64(1), unreachable.Load(), `"redis unreachable" must be logged once per outage`)
				// While Redis is away nothing that needs a lock starts.
				blocked, err := c.Dispatch(ctx, "quick", nil, tasking.Exclusive("repo:2"))
				require.NoError(t, err)
				time.Sleep(300 * time.Millisecond)
				got, err := c.Get(ctx, blocked.ID)
				require.NoError(t, err)
				require.Equal(t, tasking.StateWaiting, got.State)
				require.NoError(t, srv.Start())
			}
			// The worker resumes by itself: the same name is free again.
			next, err := c.Dispatch(ctx, "quick", nil, tasking.Exclusive("repo:1"))
			require.NoError(t, err)
			done, err = c.Wait(ctx, next.ID)
			require.NoError(t, err)
			require.Equal(t, tasking.StateCompleted, done.State, done.Error)
		})
	}
}

// TestRedisFences: fencing tokens grow strictly within a namespace, across
// sessions and clients, and across Redis losing its data.
func TestRedisFences(t *testing.T) {
	t.Parallel()
	srv := faultenv.StartRedis(t)
	ctx := ctxT(t, 30*time.Second)
	ns := testdb.Name("fence")
	var sessions []tasking.LockSession
	for i := int64(1); i <= 3; i++ {
		l := tasking.NewRedisLocker(newRedis(t, srv.Addr()), tasking.WithRedisNamespace(ns))
		s, err := l.Open(ctx, tasking.LockSessionConfig{Worker: i})
		require.NoError(t, err)
		t.Cleanup(func() { require.NoError(t, s.Close(context.Background())) })
		sessions = append(sessions, s)
	}
	var last int64
	task := int64(0)
	for round := 0; round < 40; round++ {
		if round == 20 {
			require.NoError(t, srv.FlushAll())
		}
		s := sessions[round%len(sessions)]
		var reqs []tasking.LockRequest
		for j := 0; j < 5; j++ {
			task++
			reqs = append(reqs, tasking.LockRequest{
				Owner:     tasking.Owner{Worker: int64(round%len(sessions)) + 1, Task: task},
				Exclusive: []string{fmt.Sprintf("e%d", task)}, Shared: []string{"common"},
			})
		}
		fences, err := s.TryAcquire(ctx, reqs)
		require.NoError(t, err)
		for _, f := range fences {
			require.Greater(t, f, last, "round %d: fence did not grow", round)
			last = f
		}
		owners := make([]tasking.Owner, len(reqs))
		for j, r := range reqs {
			owners[j] = r.Owner
		}
		require.NoError(t, s.Release(ctx, owners))
	}

	// Concurrent grants never share a token.
	seen := make(map[int64]bool)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, s := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 50; j++ {
				o := tasking.Owner{Worker: int64(i) + 1, Task: int64(1000*(i+1) + j)}
				fences, err := s.TryAcquire(ctx, []tasking.LockRequest{{Owner: o, Shared: []string{"x"}}})
				if err != nil || fences[0] == 0 {
					t.Errorf("grant %v: %v %v", o, fences, err)
					return
				}
				mu.Lock()
				if seen[fences[0]] {
					t.Errorf("token %d handed out twice", fences[0])
				}
				seen[fences[0]] = true
				mu.Unlock()
				_ = s.Release(ctx, []tasking.Owner{o})
			}
		}()
	}
	wg.Wait()
}

// weirdNames are resource names Redis keys must carry verbatim.
var weirdNames = []string{
	"with space", "{brace}", "}{", "{", "}", "a:b:c", "x:y", "ünïcødé 日本語 🚀",
	strings.Repeat("é", tasking.MaxResourceNameLen/2), // 1 KiB
}

// recordingRedis passes commands through and keeps the scripts' keys.
type recordingRedis struct {
	rueidis.Client
	mu      sync.Mutex
	scripts [][]string // keys of each EVAL/EVALSHA
}

func (r *recordingRedis) record(cmd rueidis.Completed) {
	args := cmd.Commands()
	if len(args) < 3 || (args[0] != "EVALSHA" && args[0] != "EVAL") {
		return
	}
	var n int
	fmt.Sscan(args[2], &n)
	r.mu.Lock()
	r.scripts = append(r.scripts, append([]string(nil), args[3:3+n]...))
	r.mu.Unlock()
}

func (r *recordingRedis) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	r.record(cmd)
	return r.Client.Do(ctx, cmd)
}

func (r *recordingRedis) DoMulti(ctx context.Context, cmds ...rueidis.Completed) []rueidis.RedisResult {
	for _, c := range cmds {
		r.record(c)
	}
	return r.Client.DoMulti(ctx, cmds...)
}

// crc16 is CRC-16/XMODEM, the checksum of Redis Cluster's key slots.
func crc16(b []byte) uint16 {
	var crc uint16
	for _, c := range b {
		crc ^= uint16(c) << 8
		for i := 0; i < 8; i++ {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}

// keySlot is Redis Cluster's slot of a key: the CRC of its hash tag (the
// part between the first '{' and the next '}', if not empty) or of the key.
func keySlot(key string) uint16 {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	return crc16([]byte(key)) % 16384
}

func TestKeySlot(t *testing.T) {
	t.Parallel()
	require.Equal(t, uint16(0x31C3), crc16([]byte("123456789")))
	// Slots as CLUSTER KEYSLOT reports them.
	require.Equal(t, uint16(12182), keySlot("foo"))
	require.Equal(t, uint16(5061), keySlot("bar"))
	require.Equal(t, keySlot("{user1000}.following"), keySlot("{user1000}.followers"))
	require.Equal(t, keySlot("foo{}{bar}"), crc16([]byte("foo{}{bar}"))%16384)
}

// TestRedisScriptKeysShareASlot: every key of every script call (acquire,
// renew, release, close) hashes to one cluster slot, whatever the names and
// the namespace hold.
func TestRedisScriptKeysShareASlot(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t, 30*time.Second)
	for _, ns := range []string{testdb.Name("slot"), testdb.Name("sl}o{t")} {
		rec := &recordingRedis{Client: newRedis(t, testdb.RedisAddr())}
		renewed := make(chan struct{})
		l := tasking.NewRedisLocker(rec, tasking.WithRedisNamespace(ns),
			tasking.WithRedisLease(300*time.Millisecond), tasking.WithRedisRenewInterval(20*time.Millisecond))
		s, err := l.Open(ctx, tasking.LockSessionConfig{Worker: 1})
		require.NoError(t, err)
		var reqs []tasking.LockRequest
		for i, n := range weirdNames {
			reqs = append(reqs, tasking.LockRequest{Owner: tasking.Owner{Worker: 1, Task: int64(i)}, Exclusive: []string{n}, Shared: []string{"s" + n}})
		}
		fences, err := s.TryAcquire(ctx, reqs)
		require.NoError(t, err)
		for i, f := range fences {
			require.Positive(t, f, "name %q", weirdNames[i])
		}
		go func() { // let renewals run
			for {
				rec.mu.Lock()
				n := len(rec.scripts)
				rec.mu.Unlock()
				if n >= 3 {
					close(renewed)
					return
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
		recv(t, renewed, 30*time.Second)
		require.NoError(t, s.Release(ctx, []tasking.Owner{reqs[0].Owner}))
		require.NoError(t, s.Close(ctx))

		rec.mu.Lock()
		require.GreaterOrEqual(t, len(rec.scripts), 4)
		for _, keys := range rec.scripts {
			require.NotEmpty(t, keys)
			slot := keySlot(keys[0])
			for _, k := range keys {
				require.Equal(t, slot, keySlot(k), "key %q", k)
			}
		}
		rec.mu.Unlock()
	}
}

// TestRedisResourceNames: names with spaces, braces, colons, unicode and
// 1 KiB of text lock as themselves: distinct names never alias, equal names
// conflict.
func TestRedisResourceNames(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t, 30*time.Second)
	l := tasking.NewRedisLocker(newRedis(t, testdb.RedisAddr()), tasking.WithRedisNamespace(testdb.Name("names")))
	a, err := l.Open(ctx, tasking.LockSessionConfig{Worker: 1})
	require.NoError(t, err)
	defer a.Close(context.Background())
	b, err := l.Open(ctx, tasking.LockSessionConfig{Worker: 2})
	require.NoError(t, err)
	defer b.Close(context.Background())

	var reqs []tasking.LockRequest
	for i, n := range weirdNames {
		reqs = append(reqs, tasking.LockRequest{Owner: tasking.Owner{Worker: 1, Task: int64(i)}, Exclusive: []string{n}})
	}
	fences, err := a.TryAcquire(ctx, reqs)
	require.NoError(t, err)
	for i, f := range fences {
		require.Positive(t, f, "name %q", weirdNames[i])
	}
	for i, n := range weirdNames {
		// The same name conflicts, in either mode; a near miss does not.
		f, err := b.TryAcquire(ctx, []tasking.LockRequest{
			{Owner: tasking.Owner{Worker: 2, Task: int64(3 * i)}, Shared: []string{n}},
			{Owner: tasking.Owner{Worker: 2, Task: int64(3*i + 1)}, Exclusive: []string{n + " "}},
			{Owner: tasking.Owner{Worker: 2, Task: int64(3*i + 2)}, Exclusive: []string{"x:" + n}},
		})
		require.NoError(t, err)
		require.Zero(t, f[0], "name %q", n)
		require.Positive(t, f[1], "name %q", n)
		require.Positive(t, f[2], "name %q", n)
	}
}

// TestRedisUnreachableAtOpen: a worker whose Redis is gone fails to start
// with an error naming the address.
func TestRedisUnreachableAtOpen(t *testing.T) {
	t.Parallel()
	srv := faultenv.StartRedis(t)
	rdb := newRedis(t, srv.Addr())
	require.NoError(t, srv.Kill())
	c := newClient(t, tasking.WithLocker(tasking.NewRedisLocker(rdb)))
	w := tasking.NewWorker(c)
	w.Handle("t", func(context.Context, *tasking.Task) error { return nil })
	err := w.Run(ctxT(t, 30*time.Second))
	require.Error(t, err)
	require.Contains(t, err.Error(), "redis at "+srv.Addr()+" unreachable")

	var inErr *tasking.InputError
	w2 := tasking.NewWorker(newClient(t, tasking.WithLocker(tasking.NewRedisLocker(nil))))
	w2.Handle("t", func(context.Context, *tasking.Task) error { return nil })
	require.ErrorAs(t, w2.Run(ctxT(t, 30*time.Second)), &inErr)
}

// TestRedisNotifyAfterDispatchTx: with the Redis locker a DispatchTx commit
// wakes nobody; Notify after the commit does.
func TestRedisNotifyAfterDispatchTx(t *testing.T) {
	t.Parallel()
	c := newClient(t, tasking.WithLocker(tasking.NewRedisLocker(newRedis(t, testdb.RedisAddr()))))
	ctx := ctxT(t, 30*time.Second)
	ran := make(chan struct{}, 1)
	w := tasking.NewWorker(c, tasking.WithPollInterval(time.Hour))
	w.Handle("t", func(context.Context, *tasking.Task) error { ran <- struct{}{}; return nil })
	runWorker(t, w)
	// A plain Dispatch publishes a wake-up.
	first, err := c.Dispatch(ctx, "t", nil)
	require.NoError(t, err)
	recv(t, ran, 30*time.Second)
	_, err = c.Wait(ctx, first.ID)
	require.NoError(t, err)
	// The slot freed by the first task starts one more admission cycle;
	// nothing signals when it is over, so give it time to run out.
	time.Sleep(100 * time.Millisecond)

	pool := testdb.Pool(t, 2)
	var id int64
	require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		task, err := c.DispatchTx(ctx, tx, "t", nil, tasking.Exclusive("r"))
		id = task.ID
		return err
	}))
	select {
	case <-ran:
		t.Fatal("a DispatchTx commit woke the worker; Notify would be needless")
	case <-time.After(300 * time.Millisecond):
	}
	require.NoError(t, c.Notify(ctx))
	select {
	case <-ran:
	case <-ctx.Done():
		t.Fatal("Notify did not wake the worker")
	}
	done, err := c.Wait(ctx, id)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State)
}

// TestRedisCluster runs a worker against a one-node Redis Cluster through
// rueidis's cluster client, which refuses commands whose keys span slots:
// scripts, renewals, releases and pub/sub wake-ups all work there.
func TestRedisCluster(t *testing.T) {
	t.Parallel()
	srv := faultenv.StartRedis(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
	ctx := ctxT(t, time.Minute)
	admin, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr()}, DisableCache: true, ForceSingleClient: true})
	require.NoError(t, err)
	defer admin.Close()
	require.NoError(t, admin.Do(ctx, admin.B().Arbitrary("CLUSTER", "ADDSLOTSRANGE").Args("0", "16383").Build()).Error())
	for {
		info, err := admin.Do(ctx, admin.B().ClusterInfo().Build()).ToString()
		require.NoError(t, err)
		if strings.Contains(info, "cluster_state:ok") {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	rdb := newRedis(t, srv.Addr())
	require.Equal(t, rueidis.ClientModeCluster, rdb.Mode())

	c := newClient(t, tasking.WithLocker(tasking.NewRedisLocker(rdb,
		tasking.WithRedisLease(time.Second), tasking.WithRedisRenewInterval(50*time.Millisecond))))
	w := tasking.NewWorker(c, tasking.WithSlots(4), tasking.WithPollInterval(time.Hour)) // wake-ups only
	w.Handle("t", func(context.Context, *tasking.Task) error {
		time.Sleep(60 * time.Millisecond) // through a renewal
		return nil
	})
	runWorker(t, w)
	var specs []tasking.TaskSpec
	for _, n := range weirdNames {
		specs = append(specs, tasking.Spec("t", nil, tasking.Exclusive(n), tasking.Shared("common")))
	}
	tasks, err := c.DispatchMany(ctx, specs...)
	require.NoError(t, err)
	for _, task := range tasks {
		done, err := c.Wait(ctx, task.ID)
		require.NoError(t, err)
		require.Equal(t, tasking.StateCompleted, done.State, done.Error)
	}
}

// TestRedisCancel: with the Redis locker a cancel reaches the running
// task's worker over Redis pub/sub (the workers do not LISTEN, and polling
// is off here).
func TestRedisCancel(t *testing.T) {
	t.Parallel()
	c := newClient(t, tasking.WithLocker(tasking.NewRedisLocker(newRedis(t, testdb.RedisAddr()))))
	ctx := ctxT(t, 30*time.Second)
	started := make(chan struct{})
	causes := make(chan error, 1)
	w := tasking.NewWorker(c, tasking.WithPollInterval(time.Hour))
	w.Handle("block", func(ctx context.Context, _ *tasking.Task) error {
		close(started)
		<-ctx.Done()
		causes <- context.Cause(ctx)
		return nil
	})
	runWorker(t, w)
	task, err := c.Dispatch(ctx, "block", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	recv(t, started, 30*time.Second)
	require.NoError(t, c.Cancel(ctx, task.ID))
	select {
	case cause := <-causes:
		require.ErrorIs(t, cause, tasking.ErrCanceled)
	case <-time.After(5 * time.Second):
		t.Fatal("the cancel did not reach the handler")
	}
	got, err := c.Wait(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, got.State)
}

// TestRedisCleanupFreesDeadWorkersGrants: cleanup of a dead worker frees its
// Redis grants at once, without waiting for the leases (here they would
// never run out: the dead worker's session still renews them, as a hung
// process's might).
func TestRedisCleanupFreesDeadWorkersGrants(t *testing.T) {
	t.Parallel()
	locker := tasking.NewRedisLocker(newRedis(t, testdb.RedisAddr()))
	c := newClient(t, tasking.WithLocker(locker))
	pool := testdb.Pool(t, 2)
	ctx := ctxT(t, 30*time.Second)
	dead := ghostWorker(t, pool, c.Schema(), "redis")
	held, err := c.Dispatch(ctx, "t", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	ownTask(t, pool, c.Schema(), dead, held.ID, tasking.StateRunning)
	ghost, err := locker.Open(ctx, tasking.LockSessionConfig{Worker: dead, Schema: c.Schema(), Logger: quietLogger(),
		OnLost: func([]tasking.Owner, error) {}})
	require.NoError(t, err)
	defer ghost.Close(context.Background())
	f, err := ghost.TryAcquire(ctx, []tasking.LockRequest{{Owner: tasking.Owner{Worker: dead, Task: held.ID}, Exclusive: []string{"x"}}})
	require.NoError(t, err)
	require.Positive(t, f[0])
	next, err := c.Dispatch(ctx, "t", nil, tasking.Exclusive("x"))
	require.NoError(t, err)

	w := tasking.NewWorker(c, tasking.WithHeartbeatTTL(300*time.Millisecond))
	w.Handle("t", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)
	got, err := c.Wait(ctx, held.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateFailed, got.State)
	require.Equal(t, "worker lost", got.Error)
	got, err = c.Wait(ctx, next.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State, "the task behind the dead one runs")
}

// TestRedisHungDoesNotBlockDispatch: when Redis stops answering, Dispatch
// and Cancel return once their database write has committed; the wake-up
// goes out in the background (the workers find the task on their next
// poll), instead of holding the caller for seconds.
func TestRedisHungDoesNotBlockDispatch(t *testing.T) {
	t.Parallel()
	srv := faultenv.StartRedis(t)
	rdb := newRedis(t, srv.Addr())
	c := newClient(t, tasking.WithLocker(tasking.NewRedisLocker(rdb)))
	ctx := ctxT(t, time.Minute)
	_, err := c.Dispatch(ctx, "t", nil) // warm: the schema check and the connections
	require.NoError(t, err)

	require.NoError(t, syscall.Kill(srv.PID(), syscall.SIGSTOP))
	defer func() { _ = syscall.Kill(srv.PID(), syscall.SIGCONT) }()
	t0 := time.Now()
	task, err := c.Dispatch(ctx, "t", nil, tasking.Exclusive("r"))
	require.NoError(t, err)
	require.NoError(t, c.Cancel(ctx, task.ID))
	require.Less(t, time.Since(t0), time.Second, "Dispatch and Cancel waited for a hung Redis")
}
