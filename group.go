package tasking

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Task groups: a set of tasks dispatched together, in one call or over time,
// that is waited for and canceled as one (Pulp's task groups). A group is
// done once it is marked all dispatched and every task in it is final. The
// schema's dispatch_related and cancel_group functions (schema version 4)
// keep joining, marking and canceling in one order per group.

var (
	// ErrGroupCanceled: the group was canceled, so no task may join it.
	ErrGroupCanceled = errors.New("tasking: group canceled")
	// ErrGroupClosed: the group is marked all dispatched, so no task may join
	// it, except a child of a task of the group that is not final.
	ErrGroupClosed = errors.New("tasking: group marked all dispatched")
)

// NoGroup as [TaskSpec.Group] (or [InGroup]) keeps a task out of every
// group, even when its parent is in one.
const NoGroup int64 = -1

// InGroup puts the task in group id ([Client.CreateGroup]), or in none for
// [NoGroup]. Default: the group of the task whose handler dispatches it, if
// any.
func InGroup(id int64) DispatchOption {
	return func(s *TaskSpec) { s.Group = id }
}

// Group is a task group as stored, with its tasks counted per state.
type Group struct {
	ID            int64
	CreatedAt     time.Time
	AllDispatched bool          // marked all dispatched (MarkAllDispatched, DispatchGroup, CancelGroup)
	Canceled      bool          // CancelGroup was called
	Counts        map[State]int // tasks per state; a state with none is missing
	Done          bool          // all dispatched and every task final
}

// Total is the number of tasks in the group.
func (g *Group) Total() int {
	n := 0
	for _, c := range g.Counts {
		n += c
	}
	return n
}

// CreateGroup creates an empty group. Dispatch tasks into it with [InGroup]
// (or from the handlers of its tasks, whose children join it), then call
// [Client.MarkAllDispatched]: until then the group is not done, even when
// every task in it is final.
func (c *Client) CreateGroup(ctx context.Context) (*Group, error) {
	if err := c.checkSchema(ctx); err != nil {
		return nil, err
	}
	return c.createGroup(ctx, c.pool)
}

func (c *Client) createGroup(ctx context.Context, db querier) (*Group, error) {
	g := &Group{Counts: map[State]int{}}
	if err := db.QueryRow(ctx, c.q.createGroup).Scan(&g.ID, &g.CreatedAt); err != nil {
		return nil, fmt.Errorf("tasking: create group: %w", err)
	}
	return g, nil
}

// DispatchGroup creates a group, dispatches specs into it (as DispatchMany
// does, a spec's Group is ignored) and marks it all dispatched, in one
// transaction.
func (c *Client) DispatchGroup(ctx context.Context, specs ...TaskSpec) (*Group, []*Task, error) {
	if len(specs) == 0 {
		return nil, nil, inputErr("batch", "no tasks to dispatch")
	}
	if err := c.checkSchema(ctx); err != nil {
		return nil, nil, err
	}
	var g *Group
	var tasks []*Task
	var ready bool
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		var err error
		if g, err = c.createGroup(ctx, tx); err != nil {
			return err
		}
		in := make([]TaskSpec, len(specs))
		for i, s := range specs {
			s.Group = g.ID
			in[i] = s
		}
		batch, err := prepareBatch(in)
		if err != nil {
			return err
		}
		sctx, span, trace := c.startDispatchSpan(ctx, batch.specs)
		tasks, ready, err = c.insert(sctx, tx, batch, false, trace, c.parentOf(ctx))
		endSpan(span, err)
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, c.q.markGroup, g.ID)
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	if ready && c.bus.dispatchChannel() == "" {
		c.bus.dispatched(ctx) // the commit could not wake the workers itself
	}
	g.AllDispatched = true
	g.Counts[StateWaiting] = len(tasks)
	return g, tasks, nil
}

// MarkAllDispatched marks the group all dispatched: it is done once every
// task in it is final. Dispatches into the group that are in flight commit
// first; later ones fail with [ErrGroupClosed], except those of the
// handlers of the group's tasks that are not final (their children still
// join). Marking it again does nothing; an unknown id returns [ErrNotFound].
func (c *Client) MarkAllDispatched(ctx context.Context, id int64) error {
	if err := c.checkSchema(ctx); err != nil {
		return err
	}
	tag, err := c.pool.Exec(ctx, c.q.markGroup, id)
	if err != nil {
		return fmt.Errorf("tasking: mark group %d all dispatched: %w", id, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%w: group %d", ErrNotFound, id)
	}
	c.waits.poke()
	return nil
}

// GetGroup returns the group with its tasks counted per state, or
// [ErrNotFound].
func (c *Client) GetGroup(ctx context.Context, id int64) (*Group, error) {
	if err := c.checkSchema(ctx); err != nil {
		return nil, err
	}
	return c.getGroup(ctx, id)
}

func (c *Client) getGroup(ctx context.Context, id int64) (*Group, error) {
	g := &Group{Counts: map[State]int{}}
	var states []string
	var counts []int64
	err := c.pool.QueryRow(ctx, c.q.getGroup, id).Scan(&g.ID, &g.CreatedAt, &g.AllDispatched, &g.Canceled, &states, &counts)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: group %d", ErrNotFound, id)
	}
	if err != nil {
		return nil, fmt.Errorf("tasking: get group %d: %w", id, err)
	}
	open := 0
	for i, s := range states {
		g.Counts[State(s)] = int(counts[i])
		if !State(s).Final() {
			open += int(counts[i])
		}
	}
	g.Done = g.AllDispatched && open == 0
	return g, nil
}

// WaitGroup blocks until the group is done (marked all dispatched, every
// task final) and returns it, or returns ctx's error. It waits the way
// [Client.Wait] does: one shared query per interval for all waits, at once
// when a worker of this process finishes a task.
func (c *Client) WaitGroup(ctx context.Context, id int64) (*Group, error) {
	g, err := c.GetGroup(ctx, id)
	if err != nil || g.Done {
		return g, err
	}
	return c.waits.waitGroup(ctx, id)
}

// CancelGroup cancels the group: it is marked canceled and all dispatched,
// so no task joins it any more ([ErrGroupCanceled]); its waiting tasks
// become canceled at once and its running ones canceling, exactly as
// [Client.Cancel] does for each (their workers are told, the handlers'
// contexts are canceled with cause [ErrCanceled], they end canceled). Tasks
// already final stay as they are. Canceling a group again cancels what
// joined meanwhile: nothing. An unknown id returns [ErrNotFound].
func (c *Client) CancelGroup(ctx context.Context, id int64) error {
	if _, err := c.GetGroup(ctx, id); err != nil {
		return err
	}
	ready := 0
	var canceling []int64
	// A group cancel locks several tasks; a worker's step finishing two of
	// them in another order can deadlock with it (PostgreSQL then aborts
	// one). The step retries, and so does this: it is idempotent.
	err := retryConflict(ctx, func() error {
		ready, canceling = 0, canceling[:0]
		rows, err := c.pool.Query(ctx, c.q.cancelGroup, id, c.bus.dispatchChannel())
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var tid int64
			var state string
			var r int
			if err := rows.Scan(&tid, &state, &r); err != nil {
				return err
			}
			ready += r
			if State(state) == StateCanceling {
				canceling = append(canceling, tid)
			}
		}
		return rows.Err()
	})
	if err != nil {
		return fmt.Errorf("tasking: cancel group %d: %w", id, err)
	}
	for _, tid := range canceling {
		c.bus.canceled(ctx, tid)
	}
	if ready > 0 && c.bus.dispatchChannel() == "" {
		c.bus.released(ctx) // the cancel statement could not wake the workers itself
	}
	c.waits.poke()
	return nil
}

// groupErr turns the errors dispatch_related raises into the package's.
func groupErr(err error) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return nil
	}
	switch pgErr.Code {
	case "TG001", "TG004":
		return fmt.Errorf("%w: %s", ErrNotFound, pgErr.Message)
	case "TG002":
		return fmt.Errorf("%w: %s", ErrGroupCanceled, pgErr.Message)
	case "TG003":
		return fmt.Errorf("%w: %s", ErrGroupClosed, pgErr.Message)
	}
	return nil
}

// doneGroups returns those of ids that are done.
func (c *Client) doneGroups(ctx context.Context, ids []int64) ([]*Group, error) {
	rows, err := c.pool.Query(ctx, c.q.groupsDone, ids)
	if err != nil {
		return nil, err
	}
	done, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, err
	}
	out := make([]*Group, 0, len(done))
	for _, id := range done {
		g, err := c.getGroup(ctx, id)
		if err != nil {
			return nil, err
		}
		out = append(out, g)
	}
	return out, nil
}
