package tasking_test

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// periodsOf returns the period starts of the tasks dispatched for a
// periodic schedule, from their unique keys, sorted.
func periodsOf(t testing.TB, c *tasking.Client, name string) []time.Time {
	t.Helper()
	ts, _, err := c.List(context.Background(), tasking.ListFilter{Limit: 10000})
	require.NoError(t, err)
	var out []time.Time
	prefix := "tasking/periodic/" + name + "/"
	for _, tk := range ts {
		if rest, ok := strings.CutPrefix(tk.UniqueKey, prefix); ok {
			p, err := time.Parse(time.RFC3339Nano, rest)
			require.NoError(t, err)
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Before(out[j]) })
	return out
}

// TestPeriodicOncePerPeriod: four workers register one schedule; every
// period is dispatched exactly once, none is skipped.
func TestPeriodicOncePerPeriod(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ran := make(chan struct{}, 100)
	for range 4 {
		w := tasking.NewWorker(c, tasking.WithPeriodic("tick", tasking.Every(time.Second), tasking.Spec("tick", nil)))
		w.Handle("tick", func(context.Context, *tasking.Task) error { ran <- struct{}{}; return nil })
		runWorker(t, w)
	}
	for range 3 {
		recv(t, ran, 10*time.Second)
	}
	ps := periodsOf(t, c, "tick")
	require.GreaterOrEqual(t, len(ps), 3)
	for i := 1; i < len(ps); i++ {
		require.Equal(t, time.Second, ps[i].Sub(ps[i-1]), "periods %v: each once, none skipped", ps)
	}
	ts, _, err := c.List(context.Background(), tasking.ListFilter{Name: "tick"})
	require.NoError(t, err)
	require.Len(t, ts, len(ps))
	for _, tk := range ts {
		p, _ := time.Parse(time.RFC3339Nano, strings.TrimPrefix(tk.UniqueKey, "tasking/periodic/tick/"))
		require.False(t, tk.CreatedAt.Before(p.Add(-100*time.Millisecond)), "dispatched before its period (allowing for clock skew)")
	}
}

// TestPeriodicCatchUp: periods missed while no worker ran give one task,
// for the latest of them, however many workers start; a schedule never
// dispatched before waits for its next period.
func TestPeriodicCatchUp(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	pool := testdb.Pool(t, 2)
	now := time.Now().UTC()
	_, err := pool.Exec(ctx, `INSERT INTO `+pgx.Identifier{c.Schema()}.Sanitize()+`.periodic (name, last_period)
		VALUES ('report', $1)`, now.Truncate(time.Hour).Add(-5*time.Hour))
	require.NoError(t, err)
	hourly, err := tasking.Cron("@hourly")
	require.NoError(t, err)
	for range 3 {
		w := tasking.NewWorker(c,
			tasking.WithPeriodic("report", tasking.Every(time.Hour), tasking.Spec("report", nil, tasking.Exclusive("r"))),
			tasking.WithPeriodic("fresh", hourly, tasking.Spec("report", nil)))
		w.Handle("other", func(context.Context, *tasking.Task) error { return nil })
		runWorker(t, w)
	}
	require.Eventually(t, func() bool { return len(periodsOf(t, c, "report")) > 0 }, 10*time.Second, 5*time.Millisecond)
	time.Sleep(500 * time.Millisecond) // the other workers' catch-up must not add one
	ps := periodsOf(t, c, "report")
	require.Len(t, ps, 1)
	require.True(t, ps[0].Equal(now.Truncate(time.Hour)), "the latest missed period: got %v", ps[0])
	require.Empty(t, periodsOf(t, c, "fresh"))
	tk, _, err := c.List(ctx, tasking.ListFilter{Name: "report"})
	require.NoError(t, err)
	require.Equal(t, []string{"r"}, tk[0].Exclusive, "the task is dispatched as specified")
}

func TestPeriodicBadInput(t *testing.T) {
	t.Parallel()
	_, err := tasking.Cron("every tuesday")
	require.ErrorIs(t, err, tasking.ErrInvalidInput)
	c := newClient(t)
	for _, o := range []tasking.WorkerOption{
		tasking.WithPeriodic("p", tasking.Every(10*time.Millisecond), tasking.Spec("x", nil)),
		tasking.WithPeriodic("p", nil, tasking.Spec("x", nil)),
		tasking.WithPeriodic("", tasking.Every(time.Hour), tasking.Spec("x", nil)),
		tasking.WithPeriodic("p", tasking.Every(time.Hour), tasking.Spec("", nil)),
		tasking.WithPeriodic("p", tasking.Every(time.Hour), tasking.Spec("x", nil, tasking.Unique("k"))),
	} {
		w := tasking.NewWorker(c, o)
		w.Handle("x", func(context.Context, *tasking.Task) error { return nil })
		require.ErrorIs(t, w.Run(ctxT(t, 10*time.Second)), tasking.ErrInvalidInput)
	}
	w := tasking.NewWorker(c, tasking.WithPeriodic("p", tasking.Every(time.Hour), tasking.Spec("x", nil)),
		tasking.WithPeriodic("p", tasking.Every(time.Hour), tasking.Spec("x", nil)))
	w.Handle("x", func(context.Context, *tasking.Task) error { return nil })
	require.ErrorIs(t, w.Run(ctxT(t, 10*time.Second)), tasking.ErrInvalidInput)
}

// TestPeriodicProcesses: three worker processes (internal/faultworker)
// register one schedule; each period is dispatched once among them.
func TestPeriodicProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts worker processes; skipped with -short")
	}
	bin := buildFaultWorker(t)
	t.Setenv("FAULTWORKER_PERIODIC", "1s") // the children read their flags' defaults from it
	pool := testdb.Pool(t, 4)
	fx := &faultRun{
		t: t, sc: faultScenario{name: "periodic", locker: "postgres"}, seed: testSeed(t), bin: bin, dir: faultDir(t),
		schema: testdb.Schema(t, pool), dsn: testdb.DatabaseURL(), slots: 2, pool: pool,
	}
	var err error
	fx.client, err = tasking.New(pool, tasking.WithSchema(fx.schema), tasking.WithLogger(quietLogger()))
	require.NoError(t, err)
	require.NoError(t, fx.client.Migrate(ctxT(t, 30*time.Second)))
	t.Cleanup(fx.killAll) // whatever happens, no process outlives the test
	for slot := range 3 {
		fx.startProc(slot, fmt.Sprintf("w%d", slot))
	}
	require.Eventually(t, func() bool {
		done, _, err := fx.client.List(context.Background(), tasking.ListFilter{State: tasking.StateCompleted})
		return err == nil && len(done) >= 3
	}, 30*time.Second, 20*time.Millisecond, "three periods ran")
	fx.stopFleet()
	ps := periodsOf(t, fx.client, "tick")
	require.GreaterOrEqual(t, len(ps), 3)
	for i := 1; i < len(ps); i++ {
		require.Equal(t, time.Second, ps[i].Sub(ps[i-1]), "periods %v: each once, none skipped", ps)
	}
	all, _, err := fx.client.List(context.Background(), tasking.ListFilter{Limit: 1000})
	require.NoError(t, err)
	require.Len(t, all, len(ps), "no task but the periods'")
}
