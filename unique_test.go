package tasking_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// lineEntries counts the waiting-line entries of a task.
func lineEntries(t testing.TB, c *tasking.Client, id int64) int {
	t.Helper()
	pool := testdb.Pool(t, 1)
	var n int
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM `+
		pgx.Identifier{c.Schema()}.Sanitize()+`.lines WHERE task = $1`, id).Scan(&n))
	return n
}

// TestUniqueOneWaitingBehindRunning: the "one waiting sync per repository"
// case. A running task with the key does not count; the first dispatch
// behind it adds a task, the next ones return it, and once it has started
// a new one is added again.
func TestUniqueOneWaitingBehindRunning(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	started := make(chan int64, 4)
	release := make(chan struct{}, 4)
	w := tasking.NewWorker(c, tasking.WithSlots(4))
	w.Handle("sync", func(ctx context.Context, tk *tasking.Task) error {
		started <- tk.ID
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	})
	runWorker(t, w)

	sync := func(args any) *tasking.Task {
		t.Helper()
		tk, err := c.Dispatch(ctx, "sync", args, tasking.Exclusive("repo:1"), tasking.Unique("sync:1"))
		require.NoError(t, err)
		return tk
	}
	first := sync(map[string]int{"n": 1})
	require.False(t, first.Existing)
	require.Equal(t, "sync:1", first.UniqueKey)
	require.Equal(t, first.ID, recv(t, started, 10*time.Second))

	second := sync(map[string]int{"n": 2})
	require.False(t, second.Existing, "a running task does not count")
	for i := 3; i < 6; i++ {
		again := sync(map[string]int{"n": i})
		require.True(t, again.Existing)
		require.Equal(t, second.ID, again.ID)
		require.JSONEq(t, `{"n":2}`, string(again.Args), "the waiting task is returned as stored")
		require.Equal(t, tasking.StateWaiting, again.State)
		require.Zero(t, lineEntries(t, c, 0))
	}
	// Nothing of the skipped dispatches was stored: one entry per task.
	require.Equal(t, 1, lineEntries(t, c, second.ID))
	all, _, err := c.List(ctx, tasking.ListFilter{Name: "sync"})
	require.NoError(t, err)
	require.Len(t, all, 2)

	// Another key, or none, is not affected.
	other, err := c.Dispatch(ctx, "sync", nil, tasking.Exclusive("repo:1"), tasking.Unique("sync:2"))
	require.NoError(t, err)
	require.False(t, other.Existing)

	release <- struct{}{}
	require.Equal(t, second.ID, recv(t, started, 10*time.Second))
	third := sync(nil)
	require.False(t, third.Existing, "the waiting task started: a new one is added")
	for range 3 {
		release <- struct{}{}
	}
	for _, id := range []int64{first.ID, second.ID, other.ID, third.ID} {
		got, err := c.Wait(ctx, id)
		require.NoError(t, err)
		require.Equal(t, tasking.StateCompleted, got.State)
	}
}

// TestUniqueConcurrentDispatchers: many dispatchers with one key, at once,
// some in DispatchTx and some in batches, get one task between them.
func TestUniqueConcurrentDispatchers(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 60*time.Second)
	pool := testdb.Pool(t, 20)
	const dispatchers, rounds = 16, 10
	for round := range rounds {
		key := "k" + string(rune('a'+round))
		ids := make([]int64, dispatchers)
		news := make([]bool, dispatchers)
		var wg sync.WaitGroup
		startGate := make(chan struct{})
		for i := range dispatchers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-startGate
				var tk *tasking.Task
				var err error
				switch i % 3 {
				case 0:
					tk, err = c.Dispatch(ctx, "job", nil, tasking.Exclusive("r"), tasking.Unique(key))
				case 1:
					err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
						tk, err = c.DispatchTx(ctx, tx, "job", nil, tasking.Shared("r"), tasking.Unique(key))
						return err
					})
				default:
					var ts []*tasking.Task
					ts, err = c.DispatchMany(ctx, tasking.Spec("job", nil, tasking.Unique(key)),
						tasking.Spec("other", nil, tasking.Exclusive("r")))
					if err == nil {
						tk = ts[0]
					}
				}
				if err != nil {
					t.Errorf("dispatch: %v", err)
					return
				}
				ids[i], news[i] = tk.ID, !tk.Existing
			}()
		}
		close(startGate)
		wg.Wait()
		added := 0
		for i := range dispatchers {
			require.Equal(t, ids[0], ids[i], "round %d: every dispatcher gets the one task", round)
			if news[i] {
				added++
			}
		}
		require.Equal(t, 1, added, "round %d: exactly one dispatcher added the task", round)
		waiting, _, err := c.List(ctx, tasking.ListFilter{Name: "job", State: tasking.StateWaiting, After: ids[0] - 1})
		require.NoError(t, err)
		require.Len(t, waiting, 1)
	}
}

// TestUniqueTxHoldsKey: a DispatchTx with a key holds it until its
// transaction ends: a concurrent dispatch with the key waits, and gets the
// task if the transaction commits, or adds its own after a rollback.
func TestUniqueTxHoldsKey(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	pool := testdb.Pool(t, 4)
	for _, commit := range []bool{true, false} {
		key := "commit"
		if !commit {
			key = "rollback"
		}
		tx, err := pool.Begin(ctx)
		require.NoError(t, err)
		defer func() { _ = tx.Rollback(context.Background()) }() // on failure: the schema's drop would wait for it
		inTx, err := c.DispatchTx(ctx, tx, "job", nil, tasking.Unique(key))
		require.NoError(t, err)
		got := make(chan *tasking.Task, 1)
		go func() {
			tk, err := c.Dispatch(ctx, "job", nil, tasking.Unique(key))
			if err != nil {
				t.Errorf("dispatch: %v", err)
			}
			got <- tk
		}()
		// The dispatch waits on the key's lock while the transaction is open.
		require.Eventually(t, func() bool {
			var n int
			err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted`).Scan(&n)
			return err == nil && n > 0
		}, 10*time.Second, 5*time.Millisecond)
		select {
		case <-got:
			t.Fatal("the dispatch did not wait for the transaction holding the key")
		default:
		}
		if commit {
			require.NoError(t, tx.Commit(ctx))
		} else {
			require.NoError(t, tx.Rollback(ctx))
		}
		tk := recv(t, got, 10*time.Second)
		require.NotNil(t, tk)
		if commit {
			require.True(t, tk.Existing)
			require.Equal(t, inTx.ID, tk.ID)
		} else {
			require.False(t, tk.Existing)
			require.NotEqual(t, inTx.ID, tk.ID)
		}
	}
}

// TestUniqueInBatch: a key repeated in one batch gives one task; the
// skipped ones take no place in line, so what follows is not held up.
func TestUniqueInBatch(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	ts, err := c.DispatchMany(ctx,
		tasking.Spec("a", 1, tasking.Exclusive("r"), tasking.Unique("u")),
		tasking.Spec("a", 2, tasking.Exclusive("r"), tasking.Unique("u")),
		tasking.Spec("b", 3, tasking.Exclusive("r")),
		tasking.Spec("a", 4, tasking.Exclusive("r"), tasking.Unique("v")),
	)
	require.NoError(t, err)
	require.Len(t, ts, 4)
	require.False(t, ts[0].Existing)
	require.True(t, ts[1].Existing)
	require.Equal(t, ts[0].ID, ts[1].ID)
	require.False(t, ts[2].Existing)
	require.False(t, ts[3].Existing)
	require.Less(t, ts[0].ID, ts[2].ID)
	require.Less(t, ts[2].ID, ts[3].ID)
	// Again: everything keyed is waiting already.
	again, err := c.DispatchMany(ctx,
		tasking.Spec("a", 5, tasking.Exclusive("r"), tasking.Unique("v")),
		tasking.Spec("a", 6, tasking.Exclusive("r"), tasking.Unique("u")))
	require.NoError(t, err)
	require.Equal(t, ts[3].ID, again[0].ID)
	require.Equal(t, ts[0].ID, again[1].ID)
	require.True(t, again[0].Existing && again[1].Existing)

	// Run them: in id order, one at a time, and nothing is left behind.
	var mu sync.Mutex
	var order []int64
	w := tasking.NewWorker(c)
	h := func(_ context.Context, tk *tasking.Task) error {
		mu.Lock()
		order = append(order, tk.ID)
		mu.Unlock()
		return nil
	}
	w.Handle("a", h)
	w.Handle("b", h)
	runWorker(t, w)
	for _, tk := range []*tasking.Task{ts[0], ts[2], ts[3]} {
		got, err := c.Wait(ctx, tk.ID)
		require.NoError(t, err)
		require.Equal(t, tasking.StateCompleted, got.State)
	}
	mu.Lock()
	require.Equal(t, []int64{ts[0].ID, ts[2].ID, ts[3].ID}, order)
	mu.Unlock()
}

func TestUniqueBadKey(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 10*time.Second)
	for _, k := range []string{"", "a\x00b", "\xff", string(make([]byte, tasking.MaxResourceNameLen+1))} {
		_, err := c.Dispatch(ctx, "job", nil, tasking.Unique(k))
		var in *tasking.InputError
		require.ErrorAs(t, err, &in, "key %q", k)
		require.Equal(t, "unique key", in.Field)
	}
}

// TestUniqueCountsScheduledAndRetrying: a scheduled task, and one waiting
// for its retry, are yet to run: a dispatch with their key returns them.
func TestUniqueCountsScheduledAndRetrying(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	w := tasking.NewWorker(c)
	w.Handle("fail", func(context.Context, *tasking.Task) error { return errors.New("boom") },
		tasking.HandlerRetry(tasking.RetryPolicy{Attempts: 2, Backoff: time.Hour}))
	runWorker(t, w)

	later, err := c.Dispatch(ctx, "report", nil, tasking.RunAfter(time.Hour), tasking.Unique("report"))
	require.NoError(t, err)
	again, err := c.Dispatch(ctx, "report", nil, tasking.Unique("report"))
	require.NoError(t, err)
	require.True(t, again.Existing)
	require.Equal(t, later.ID, again.ID)
	require.Equal(t, tasking.StateScheduled, again.State)

	failing, err := c.Dispatch(ctx, "fail", nil, tasking.Unique("fail"))
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		got, err := c.Get(ctx, failing.ID)
		return err == nil && got.State == tasking.StateRetrying
	}, 10*time.Second, 5*time.Millisecond)
	again, err = c.Dispatch(ctx, "fail", nil, tasking.Unique("fail"))
	require.NoError(t, err)
	require.True(t, again.Existing)
	require.Equal(t, failing.ID, again.ID)
}
