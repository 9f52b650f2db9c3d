package tasking_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
)

func TestDispatchRunWait(t *testing.T) {
	t.Parallel()
	c := newClient(t)
	ctx := ctxT(t, 30*time.Second)

	type args struct{ N int }
	w := tasking.NewWorker(c, tasking.WithSlots(4))
	tasking.HandleFunc(w, "double", func(ctx context.Context, a args) error {
		return tasking.TaskFromContext(ctx).SetResult(a.N * 2)
	})
	runWorker(t, w)

	task, err := c.Dispatch(ctx, "double", args{N: 21}, tasking.Exclusive("x"), tasking.Shared("y", "x"))
	require.NoError(t, err)
	require.Equal(t, []string{"x"}, task.Exclusive)
	require.Equal(t, []string{"y"}, task.Shared)
	done, err := c.Wait(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State, done.Error)
	require.JSONEq(t, "42", string(done.Result))
	require.False(t, done.StartedAt.IsZero())
	require.False(t, done.FinishedAt.IsZero())
}
