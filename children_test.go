package tasking_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
)

// TestChildTasks: tasks dispatched from a running handler record it as
// their parent and join its group, unless told otherwise, whichever
// Dispatch function they use; List filters by parent and by group.
func TestChildTasks(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	c := e.c
	ctx := ctxT(t, 30*time.Second)
	children := make(chan []*tasking.Task, 1)
	w := tasking.NewWorker(c, tasking.WithSlots(4))
	w.Handle("sync", func(ctx context.Context, task *tasking.Task) error {
		var got []*tasking.Task
		pub, err := c.Dispatch(ctx, "publish", nil, tasking.Exclusive("pub"))
		if err != nil {
			return err
		}
		got = append(got, pub)
		// A context derived from the handler's carries the task too.
		sub, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		many, err := c.DispatchMany(sub, tasking.Spec("publish", nil),
			tasking.Spec("publish", nil, tasking.InGroup(tasking.NoGroup)))
		if err != nil {
			return err
		}
		got = append(got, many...)
		err = pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
			inTx, err := c.DispatchTx(ctx, tx, "publish", nil)
			got = append(got, inTx)
			return err
		})
		if err != nil {
			return err
		}
		children <- got
		return nil
	})
	w.Handle("publish", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)

	g, err := c.CreateGroup(ctx)
	require.NoError(t, err)
	parent, err := c.Dispatch(ctx, "sync", nil, tasking.InGroup(g.ID), tasking.Exclusive("repo"))
	require.NoError(t, err)
	require.Equal(t, g.ID, parent.Group)
	require.Zero(t, parent.Parent, "dispatched outside a handler")
	got := recv(t, children, 20*time.Second)
	require.Len(t, got, 4)
	wantGroup := []int64{g.ID, g.ID, 0, g.ID}
	for i, child := range got {
		require.Equal(t, parent.ID, child.Parent, "child %d", i)
		require.Equal(t, wantGroup[i], child.Group, "child %d", i)
		stored, err := c.Wait(ctx, child.ID)
		require.NoError(t, err)
		require.Equal(t, parent.ID, stored.Parent)
		require.Equal(t, wantGroup[i], stored.Group)
		require.Equal(t, tasking.StateCompleted, stored.State, stored.Error)
	}

	ids := func(ts []*tasking.Task) []int64 {
		var out []int64
		for _, t := range ts {
			out = append(out, t.ID)
		}
		return out
	}
	byParent, _, err := c.List(ctx, tasking.ListFilter{Parent: parent.ID})
	require.NoError(t, err)
	require.Equal(t, ids(got), ids(byParent))
	byGroup, _, err := c.List(ctx, tasking.ListFilter{Group: g.ID})
	require.NoError(t, err)
	require.Equal(t, []int64{parent.ID, got[0].ID, got[1].ID, got[3].ID}, ids(byGroup))
	both, _, err := c.List(ctx, tasking.ListFilter{Parent: parent.ID, Group: g.ID, State: tasking.StateCompleted})
	require.NoError(t, err)
	require.Equal(t, []int64{got[0].ID, got[1].ID, got[3].ID}, ids(both))
}

// TestChildrenJoinClosedGroup: a group marked all dispatched refuses new
// tasks, except the children of its tasks that still run: the group is not
// done while they run, and their children are part of their work.
func TestChildrenJoinClosedGroup(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	g, err := c.CreateGroup(ctx)
	require.NoError(t, err)
	marked := make(chan struct{})
	child := make(chan *tasking.Task, 1)
	w := tasking.NewWorker(c)
	w.Handle("parent", func(ctx context.Context, task *tasking.Task) error {
		select {
		case <-marked:
		case <-ctx.Done():
			return ctx.Err()
		}
		ch, err := c.Dispatch(ctx, "child", nil)
		if err != nil {
			return err
		}
		child <- ch
		return nil
	})
	w.Handle("child", func(context.Context, *tasking.Task) error { return nil })
	runWorker(t, w)
	parent, err := c.Dispatch(ctx, "parent", nil, tasking.InGroup(g.ID))
	require.NoError(t, err)
	require.NoError(t, c.MarkAllDispatched(ctx, g.ID))
	_, err = c.Dispatch(ctx, "child", nil, tasking.InGroup(g.ID))
	require.ErrorIs(t, err, tasking.ErrGroupClosed)
	close(marked)
	ch := recv(t, child, 20*time.Second)
	require.Equal(t, g.ID, ch.Group)
	require.Equal(t, parent.ID, ch.Parent)
	done, err := c.WaitGroup(ctx, g.ID)
	require.NoError(t, err)
	require.True(t, done.Done)
	require.Equal(t, map[tasking.State]int{tasking.StateCompleted: 2}, done.Counts)
}

// TestChildOfAnotherSchema: a handler that dispatches into another schema's
// client records no parent there (the parent's id means nothing in it).
func TestChildOfAnotherSchema(t *testing.T) {
	t.Parallel()
	a, b := newClient(t), newClient(t)
	ctx := ctxT(t, 30*time.Second)
	got := make(chan *tasking.Task, 1)
	w := tasking.NewWorker(a)
	w.Handle("forward", func(ctx context.Context, _ *tasking.Task) error {
		task, err := b.Dispatch(ctx, "elsewhere", nil)
		if err != nil {
			return err
		}
		got <- task
		return nil
	})
	runWorker(t, w)
	task, err := a.Dispatch(ctx, "forward", nil)
	require.NoError(t, err)
	done, err := a.Wait(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State, done.Error)
	other := recv(t, got, time.Second)
	require.Zero(t, other.Parent)
}

func TestGroupInvalid(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)
	_, err := c.Dispatch(ctx, "x", nil, tasking.InGroup(-2))
	require.ErrorIs(t, err, tasking.ErrInvalidInput)
	_, err = c.Dispatch(ctx, "x", nil, tasking.InGroup(1<<40))
	require.ErrorIs(t, err, tasking.ErrNotFound)
	_, _, err = c.List(ctx, tasking.ListFilter{Group: tasking.NoGroup})
	require.ErrorIs(t, err, tasking.ErrInvalidInput)
	_, _, err = c.List(ctx, tasking.ListFilter{Parent: -1})
	require.ErrorIs(t, err, tasking.ErrInvalidInput)
	_, err = c.GetGroup(ctx, 1<<40)
	require.ErrorIs(t, err, tasking.ErrNotFound)
	_, err = c.WaitGroup(ctx, 1<<40)
	require.ErrorIs(t, err, tasking.ErrNotFound)
	require.ErrorIs(t, c.CancelGroup(ctx, 1<<40), tasking.ErrNotFound)
	require.ErrorIs(t, c.MarkAllDispatched(ctx, 1<<40), tasking.ErrNotFound)
	_, _, err = c.DispatchGroup(ctx)
	require.ErrorIs(t, err, tasking.ErrInvalidInput)
	// Nothing was written by the refused dispatches.
	ts, _, err := c.List(ctx, tasking.ListFilter{})
	require.NoError(t, err)
	require.Empty(t, ts)
}
