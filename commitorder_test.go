package tasking_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// TestCommitOrderBlocksConflictingDispatch: while one transaction holds an
// uncommitted dispatch, a conflicting dispatch waits for it and then draws a
// larger id; a non-conflicting (shared/shared) one does not wait.
func TestCommitOrderBlocksConflictingDispatch(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	pool := testdb.Pool(t, 5)
	ctx := ctxT(t, 30*time.Second)

	tx1, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer tx1.Rollback(ctx)
	a, err := c.DispatchTx(ctx, tx1, "t", nil, tasking.Exclusive("x"), tasking.Shared("y"))
	require.NoError(t, err)

	// Shared y does not conflict with shared y: no wait.
	s, err := c.Dispatch(ctx, "t", nil, tasking.Shared("y"))
	require.NoError(t, err)
	require.Greater(t, s.ID, a.ID)

	// Exclusive x conflicts: it must wait for tx1.
	tx2, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer tx2.Rollback(ctx)
	var pid2 uint32
	require.NoError(t, tx2.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid2))
	type res struct {
		task *tasking.Task
		err  error
	}
	got := make(chan res, 1)
	go func() {
		b, err := c.DispatchTx(ctx, tx2, "t", nil, tasking.Exclusive("x"))
		got <- res{b, err}
	}()
	// Wait until tx2's backend is blocked on the advisory lock.
	require.Eventually(t, func() bool {
		var waiting bool
		err := pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks
			WHERE pid = $1 AND locktype = 'advisory' AND NOT granted)`, pid2).Scan(&waiting)
		return err == nil && waiting
	}, 10*time.Second, 5*time.Millisecond)
	select {
	case r := <-got:
		t.Fatalf("conflicting dispatch returned before the first committed: %+v", r)
	default:
	}
	require.NoError(t, tx1.Commit(ctx))
	r := recv(t, got, 30*time.Second)
	require.NoError(t, r.err)
	require.Greater(t, r.task.ID, a.ID, "the later commit must have the larger id")
	require.NoError(t, tx2.Commit(ctx))
}

// TestCommitOrderObserved: many dispatchers commit conflicting tasks with
// random delays while an observer keeps reading the queue. Every snapshot
// must be prefix-closed: whenever a task is visible, every conflicting task
// with a smaller id is visible too (P3).
func TestCommitOrderObserved(t *testing.T) {
	t.Parallel()
	seed := testSeed(t)
	c := newClient(t)
	pool := testdb.Pool(t, 12)
	ctx := ctxT(t, 60*time.Second)
	const dispatchers, perDispatcher = 8, 40

	var snapshots [][]int64
	stop := make(chan struct{})
	observed := make(chan struct{})
	go func() {
		defer close(observed)
		for {
			select {
			case <-stop:
				return
			default:
			}
			var ids []int64
			err := pool.QueryRow(ctx, fmt.Sprintf(`SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM %s.tasks`,
				pgx.Identifier{c.Schema()}.Sanitize())).Scan(&ids)
			if err != nil {
				return
			}
			snapshots = append(snapshots, ids)
		}
	}()

	var wg sync.WaitGroup
	for d := 0; d < dispatchers; d++ {
		wg.Add(1)
		go func(d int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(d)))
			for i := 0; i < perDispatcher; i++ {
				err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					opt := tasking.Exclusive("x")
					if rng.IntN(2) == 0 {
						opt = tasking.Shared("x", "y") // conflicts with exclusive x only
					}
					if _, err := c.DispatchTx(ctx, tx, "t", nil, opt, tasking.Exclusive(fmt.Sprintf("own-%d-%d", d, i))); err != nil {
						return err
					}
					time.Sleep(time.Duration(rng.IntN(1500)) * time.Microsecond)
					return nil
				})
				if err != nil {
					t.Errorf("dispatch: %v", err)
					return
				}
			}
		}(d)
	}
	wg.Wait()
	close(stop)
	recv(t, observed, 30*time.Second)

	all := readAll(t, pool, c.Schema())
	require.Len(t, all, dispatchers*perDispatcher)
	byID := make(map[int64]*tasking.Task, len(all))
	for _, task := range all {
		byID[task.ID] = task
	}
	require.Greater(t, len(snapshots), 10, "observer saw too few snapshots")
	for _, snap := range snapshots {
		visible := make(map[int64]bool, len(snap))
		for _, id := range snap {
			visible[id] = true
		}
		for _, id := range snap {
			for _, earlier := range all {
				if earlier.ID >= id {
					break
				}
				if !visible[earlier.ID] && conflicts(earlier, byID[id]) {
					t.Fatalf("seed %d: task %d visible while earlier conflicting task %d was not", seed, id, earlier.ID)
				}
			}
		}
	}
	t.Logf("%d snapshots checked", len(snapshots))
}

// TestBlockedHead: a long task holds "hot"; 500 tasks wait behind it; 1,000
// tasks on other names dispatched after them must all finish while the head
// still waits (P6).
func TestBlockedHead(t *testing.T) {
	t.Parallel()
	for _, lc := range lockerCases {
		t.Run(lc.name, func(t *testing.T) {
			t.Parallel()
			c := newClient(t, tasking.WithLocker(lc.new(t)()))
			ctx := ctxT(t, 2*time.Minute)
			release := make(chan struct{})
			started := make(chan struct{})
			var once sync.Once
			w := tasking.NewWorker(c, tasking.WithSlots(16))
			w.Handle("long", func(ctx context.Context, _ *tasking.Task) error {
				once.Do(func() { close(started) })
				select {
				case <-release:
				case <-ctx.Done():
				}
				return nil
			})
			w.Handle("quick", func(context.Context, *tasking.Task) error { return nil })
			runWorker(t, w)
			defer close(release)

			long, err := c.Dispatch(ctx, "long", nil, tasking.Exclusive("hot"))
			require.NoError(t, err)
			recv(t, started, 30*time.Second)
			var specs []tasking.TaskSpec
			for i := 0; i < 500; i++ {
				specs = append(specs, tasking.Spec("quick", nil, tasking.Exclusive("hot")))
			}
			blocked, err := c.DispatchMany(ctx, specs...)
			require.NoError(t, err)
			specs = specs[:0]
			for i := 0; i < 1000; i++ {
				specs = append(specs, tasking.Spec("quick", nil, tasking.Exclusive(fmt.Sprintf("cold-%d", i)), tasking.Shared("common")))
			}
			free, err := c.DispatchMany(ctx, specs...)
			require.NoError(t, err)

			for _, task := range free {
				done, err := c.Wait(ctx, task.ID)
				require.NoError(t, err)
				require.Equal(t, tasking.StateCompleted, done.State)
			}
			head, err := c.Get(ctx, long.ID)
			require.NoError(t, err)
			require.Equal(t, tasking.StateRunning, head.State)
			waiting, _, err := c.List(ctx, tasking.ListFilter{State: tasking.StateWaiting, Resource: "hot", Limit: 1000})
			require.NoError(t, err)
			require.Len(t, waiting, len(blocked), "the blocked tasks must all still wait")
		})
	}
}

// TestDispatchManyResources: a batch naming far more resources than the
// server's lock table holds per connection still dispatches (it orders
// itself with one schema-wide lock), and it still orders against a
// concurrent conflicting dispatch.
func TestDispatchManyResources(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	pool := testdb.Pool(t, 4)
	ctx := ctxT(t, 60*time.Second)
	specs := make([]tasking.TaskSpec, 5000)
	for i := range specs {
		specs[i] = tasking.Spec("t", nil, tasking.Exclusive(fmt.Sprintf("own-%d", i)))
	}

	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	first, err := c.DispatchTx(ctx, tx, "t", nil, tasking.Exclusive("own-7"))
	require.NoError(t, err)
	got := make(chan []*tasking.Task, 1)
	go func() {
		ts, err := c.DispatchMany(ctx, specs...)
		if err != nil {
			t.Errorf("DispatchMany: %v", err)
		}
		got <- ts
	}()
	select {
	case <-got:
		t.Fatal("the big batch did not wait for the open conflicting dispatch")
	case <-time.After(100 * time.Millisecond): // it must be waiting
	}
	require.NoError(t, tx.Commit(ctx))
	ts := recv(t, got, 30*time.Second)
	require.Len(t, ts, len(specs))
	require.Greater(t, ts[0].ID, first.ID)

	// In a transaction we can look at: such a batch holds one advisory
	// lock, not one per resource.
	tx2, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer tx2.Rollback(ctx)
	_, err = c.DispatchManyTx(ctx, tx2, specs...)
	require.NoError(t, err)
	var held int
	require.NoError(t, tx2.QueryRow(ctx, `SELECT count(*) FROM pg_locks
		WHERE pid = pg_backend_pid() AND locktype = 'advisory'`).Scan(&held))
	require.Equal(t, 1, held)
}
