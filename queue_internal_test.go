package tasking

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking/internal/testdb"
)

// modelTask is a task as the readiness model sees it.
type modelTask struct {
	id        int64
	excl, shr []string
	state     State
	due       bool // StateRetrying: its retry time has passed
}

func (a modelTask) conflicts(b modelTask) bool {
	for _, x := range a.excl {
		if slices.Contains(b.excl, x) || slices.Contains(b.shr, x) {
			return true
		}
	}
	for _, x := range b.excl {
		if slices.Contains(a.shr, x) {
			return true
		}
	}
	return false
}

// modelReady is the definition the lines implement: a waiting task is ready
// when no earlier task that is not final conflicts with it.
func modelReady(ts []modelTask) []int64 {
	var out []int64
	for i, t := range ts {
		if t.state != StateWaiting {
			continue
		}
		ok := true
		for _, u := range ts[:i] {
			if !u.state.Final() && u.conflicts(t) {
				ok = false
				break
			}
		}
		if ok {
			out = append(out, t.id)
		}
	}
	return out
}

// TestReadyMatchesModel drives the schema's functions (dispatch, step,
// cancel, and dispatch_related, cancel_group, dispatch_immediate,
// finish_immediate) through a seeded random history of dispatches (some
// into groups), claims, finishes, cancels, group cancels and immediate
// tasks, on few names so that lines are long and tasks name several, and
// checks after every action that the ready tasks are exactly those the
// definition says, and that an immediate task is claimed exactly when the
// definition says it is ready. Replay a failure with TASKING_SEED.
func TestReadyMatchesModel(t *testing.T) {
	t.Parallel()
	rig := newModelRig(t)
	ctx, c, conn, worker, seed, rng := rig.ctx, rig.c, rig.conn, rig.worker, rig.seed, rig.rng
	name := func() string { return fmt.Sprintf("r %d", rng.IntN(5)) } // a space on purpose
	var model []modelTask
	byID := map[int64]int{}
	running := map[int64]*Task{}
	immediate := map[int64]*Task{} // claimed by dispatch_immediate, not finished
	var groups []int64
	groupOf := map[int64]int64{}
	im := &Immediate{c: c}
	var claimedN, deferredN, refusedN, groupCancels int
	defer func() {
		t.Logf("immediate: %d claimed, %d deferred, %d refused; %d group cancels", claimedN, deferredN, refusedN, groupCancels)
	}()
	specs := func() []TaskSpec {
		var specs []TaskSpec
		for j := 0; j < 1+rng.IntN(3); j++ {
			var opts []DispatchOption
			for n := rng.IntN(3); n > 0; n-- {
				opts = append(opts, Exclusive(name()))
			}
			for n := rng.IntN(3); n > 0; n-- {
				opts = append(opts, Shared(name()))
			}
			specs = append(specs, Spec("t", nil, opts...))
		}
		return specs
	}

	check := func(step int, what string) {
		t.Helper()
		rig.check(t, model, step, what)
	}

	for step := 0; step < 600; step++ {
		switch k := rng.IntN(14); {
		case k < 4: // dispatch a small batch, maybe into a group
			sp := specs()
			g := int64(0)
			if len(groups) > 0 && rng.IntN(2) == 0 {
				g = groups[rng.IntN(len(groups))]
				for i := range sp {
					sp[i].Group = g
				}
			}
			ts, err := c.DispatchMany(ctx, sp...)
			require.NoError(t, err)
			for _, tk := range ts {
				byID[tk.ID] = len(model)
				model = append(model, modelTask{id: tk.ID, excl: tk.Exclusive, shr: tk.Shared, state: StateWaiting})
				groupOf[tk.ID] = g
			}
			check(step, "dispatch")
		case k < 7: // finish some running tasks and claim up to a few
			var outs []outcome
			for id, tk := range running {
				if rng.IntN(2) == 0 {
					st := []State{StateCompleted, StateFailed}[rng.IntN(2)]
					outs = append(outs, outcome{task: tk, state: st})
					if model[byID[id]].state == StateCanceling {
						st = StateCanceled
					}
					model[byID[id]].state = st
					delete(running, id)
				}
			}
			res, err := c.step(ctx, conn, worker, outs, []string{"t"}, "{}", rng.IntN(4), 0, time.Hour, true)
			require.NoError(t, err)
			require.Len(t, res.done, len(outs))
			for _, tk := range res.claimed {
				require.Contains(t, modelReady(model), tk.ID, "seed %d: claimed a task that is not ready", seed)
				model[byID[tk.ID]].state = StateRunning
				running[tk.ID] = tk
			}
			check(step, "step")
		case k < 8: // cancel a waiting task
			var waiting []int64
			for _, m := range model {
				if m.state == StateWaiting {
					waiting = append(waiting, m.id)
				}
			}
			if len(waiting) == 0 {
				continue
			}
			id := waiting[rng.IntN(len(waiting))]
			require.NoError(t, c.Cancel(ctx, id))
			model[byID[id]].state = StateCanceled
			check(step, "cancel")
		case k < 10: // an immediate task: claimed if and only if ready
			sp := specs()[0]
			deferIt := rng.IntN(2) == 0
			b, err := prepareBatch([]TaskSpec{sp})
			require.NoError(t, err)
			tk, claimed, err := c.dispatchImmediate(ctx, b, 0, time.Hour, deferIt)
			probe := append(slices.Clone(model), modelTask{id: 1 << 62, excl: b.specs[0].Exclusive, shr: b.specs[0].Shared, state: StateWaiting})
			ready := slices.Contains(modelReady(probe), 1<<62)
			if err != nil {
				require.ErrorIs(t, err, ErrBlocked)
				require.False(t, ready || deferIt, "seed %d: immediate task refused: %v", seed, err)
				refusedN++
				check(step, "immediate refused")
				continue
			}
			require.Equal(t, ready, claimed, "seed %d, action %d: immediate task %d claimed", seed, step, tk.ID)
			byID[tk.ID] = len(model)
			m := modelTask{id: tk.ID, excl: tk.Exclusive, shr: tk.Shared, state: StateWaiting}
			if claimed {
				m.state = StateRunning
				immediate[tk.ID] = tk
				claimedN++
			} else {
				deferredN++
			}
			model = append(model, m)
			check(step, "immediate")
		case k < 11: // the caller of an immediate task finishes it
			for id, tk := range immediate {
				done, err := im.finish(ctx, tk, StateCompleted, "")
				require.NoError(t, err)
				st := StateCompleted
				if model[byID[id]].state == StateCanceling {
					st = StateCanceled
				}
				require.Equal(t, st, done.State)
				model[byID[id]].state = st
				delete(immediate, id)
				break
			}
			check(step, "finish immediate")
		case k < 12: // a new group
			g, err := c.CreateGroup(ctx)
			require.NoError(t, err)
			groups = append(groups, g.ID)
		default: // cancel a group
			if len(groups) == 0 {
				continue
			}
			g := groups[rng.IntN(len(groups))]
			require.NoError(t, c.CancelGroup(ctx, g))
			groupCancels++
			groups = slices.DeleteFunc(groups, func(x int64) bool { return x == g })
			for i, m := range model {
				if groupOf[m.id] != g {
					continue
				}
				switch m.state {
				case StateWaiting:
					model[i].state = StateCanceled
				case StateRunning:
					model[i].state = StateCanceling
				}
			}
			check(step, "cancel group")
		}
	}
}

// TestReadyMatchesModelTime drives the schema's functions (dispatch, step,
// cancel) through a seeded random history of dispatches, claims, finishes,
// failed attempts to retry (at once or later: a task waiting for its retry
// is not final, so it keeps blocking what conflicts with it), scheduled
// tasks (they stand in line at their dispatch position, and become
// claimable only once due) and cancels, on few names so that lines are long and tasks name several,
// and checks after every action that the ready tasks are exactly those the
// definition says. Replay a failure with TASKING_SEED.
func TestReadyMatchesModelTime(t *testing.T) {
	t.Parallel()
	rig := newModelRig(t)
	ctx, pool, c, conn, worker, seed, rng := rig.ctx, rig.pool, rig.c, rig.conn, rig.worker, rig.seed, rig.rng
	name := func() string { return fmt.Sprintf("r %d", rng.IntN(5)) } // a space on purpose
	var model []modelTask
	byID := map[int64]int{}
	running := map[int64]*Task{}

	check := func(step int, what string) {
		t.Helper()
		rig.check(t, model, step, what)
	}

	for step := 0; step < 400; step++ {
		switch k := rng.IntN(10); {
		case k < 4: // dispatch a small batch
			var specs []TaskSpec
			for j := 0; j < 1+rng.IntN(3); j++ {
				var opts []DispatchOption
				for n := rng.IntN(3); n > 0; n-- {
					opts = append(opts, Exclusive(name()))
				}
				for n := rng.IntN(3); n > 0; n-- {
					opts = append(opts, Shared(name()))
				}
				if rng.IntN(5) == 0 { // scheduled: due when an action says so
					opts = append(opts, RunAfter(time.Hour))
				}
				specs = append(specs, Spec("t", nil, opts...))
			}
			ts, err := c.DispatchMany(ctx, specs...)
			require.NoError(t, err)
			for _, tk := range ts {
				byID[tk.ID] = len(model)
				model = append(model, modelTask{id: tk.ID, excl: tk.Exclusive, shr: tk.Shared, state: tk.State})
			}
			check(step, "dispatch")
		case k < 7: // finish some running tasks (some to retry, now or later) and claim up to a few
			var outs []outcome
			for id, tk := range running {
				if rng.IntN(2) == 0 {
					o := outcome{task: tk, state: []State{StateCompleted, StateFailed, StateRetrying, StateRetrying}[rng.IntN(4)]}
					m := &model[byID[id]]
					m.state = o.state
					if o.state == StateRetrying {
						o.err = "again"
						if rng.IntN(2) == 0 {
							o.delay = time.Hour
						} else {
							m.due = true
						}
					}
					outs = append(outs, o)
					delete(running, id)
				}
			}
			res, err := c.step(ctx, conn, worker, outs, []string{"t"}, "{}", rng.IntN(4), 0, time.Hour, true)
			require.NoError(t, err)
			require.Len(t, res.done, len(outs))
			// The step put the due retries and scheduled tasks back in line
			// before it claimed.
			for i := range model {
				if (model[i].state == StateRetrying || model[i].state == StateScheduled) && model[i].due {
					model[i].state, model[i].due = StateWaiting, false
				}
			}
			for _, tk := range res.claimed {
				require.Contains(t, modelReady(model), tk.ID, "seed %d: claimed a task that is not ready", seed)
				model[byID[tk.ID]].state = StateRunning
				running[tk.ID] = tk
			}
			check(step, "step")
		case k == 7: // a retry or a scheduled task becomes due (the next step puts it back in line)
			var later []int64
			for _, m := range model {
				if (m.state == StateRetrying || m.state == StateScheduled) && !m.due {
					later = append(later, m.id)
				}
			}
			if len(later) == 0 {
				continue
			}
			id := later[rng.IntN(len(later))]
			_, err := pool.Exec(ctx, `UPDATE `+pgIdent(c.schema)+`.tasks SET run_at = now() - interval '1 second' WHERE id = $1`, id)
			require.NoError(t, err)
			model[byID[id]].due = true
			check(step, "retry due")
		default: // cancel a waiting task, or one waiting for a retry
			var waiting []int64
			for _, m := range model {
				if m.state == StateWaiting || m.state == StateRetrying || m.state == StateScheduled {
					waiting = append(waiting, m.id)
				}
			}
			if len(waiting) == 0 {
				continue
			}
			id := waiting[rng.IntN(len(waiting))]
			require.NoError(t, c.Cancel(ctx, id))
			model[byID[id]].state = StateCanceled
			check(step, "cancel")
		}
	}
}

// modelRig is what both readiness model tests drive: a migrated schema, a
// worker connection and a registered worker, and a seeded random source.
type modelRig struct {
	ctx    context.Context
	pool   *pgxpool.Pool
	c      *Client
	conn   *workerConn
	worker int64 // steps claim only for a worker with a fresh heartbeat
	seed   uint64
	rng    *rand.Rand
}

func newModelRig(t *testing.T) *modelRig {
	t.Helper()
	r := &modelRig{pool: testdb.Pool(t, 4)}
	var err error
	r.c, err = New(r.pool, WithSchema(testdb.Schema(t, r.pool)))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	r.ctx = ctx
	require.NoError(t, r.c.Migrate(ctx))
	r.conn = newWorkerConn(r.pool, "model test")
	t.Cleanup(func() { r.conn.close(context.Background()) })
	require.NoError(t, r.pool.QueryRow(ctx, `INSERT INTO `+pgIdent(r.c.schema)+`.workers (name, host, pid, locker)
		VALUES ('model', 'h', 1, 'memory') RETURNING id`).Scan(&r.worker))
	r.seed = testdb.Seed(t)
	r.rng = rand.New(rand.NewPCG(r.seed, 7))
	return r
}

// check compares the ready tasks in the database with the model's, after
// action step, and that no hand-off was left for later (nothing runs
// concurrently here).
func (r *modelRig) check(t *testing.T, model []modelTask, step int, what string) {
	t.Helper()
	rows, err := r.pool.Query(r.ctx, `SELECT id FROM `+pgIdent(r.c.schema)+`.tasks
		WHERE state = 'waiting' AND blockers = 0 ORDER BY id`)
	require.NoError(t, err)
	defer rows.Close()
	var got []int64 // nil when none, as modelReady's
	for rows.Next() {
		var id int64
		require.NoError(t, rows.Scan(&id))
		got = append(got, id)
	}
	require.NoError(t, rows.Err())
	require.Equal(t, modelReady(model), got, "seed %d, action %d (%s): ready tasks", r.seed, step, what)
	var left int
	require.NoError(t, r.pool.QueryRow(r.ctx, `SELECT count(*) FROM `+pgIdent(r.c.schema)+`.handoffs`).Scan(&left))
	require.Zero(t, left, "handoffs left for later with no concurrent transaction")
}

func pgIdent(s string) string { return pgx.Identifier{s}.Sanitize() }
