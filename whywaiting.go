package tasking

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tasking-go/tasking/internal/fleet"
)

// WaitReport says why a task has not started ([Client.WhyWaiting]).
type WaitReport struct {
	Task *Task // as stored when the report was taken
	// Resources holds, for a waiting task, one entry per resource it
	// names, in the order of its Exclusive then Shared names: what it waits
	// for there. Empty for a task that is not waiting.
	Resources []ResourceWait
	// Ready: the task waits for nothing on its resources. It starts when a
	// live worker that handles its name has a free slot (unless Unhandled).
	Ready bool
	// Unhandled: the task waits and no live worker handles its name, so it
	// will not start until one does (a typo in a dispatch, or a worker kind
	// that is not running). Tasks behind it on its resources wait too.
	Unhandled bool
	// LiveWorkers is the number of live workers in the fleet.
	LiveWorkers int
}

// ResourceWait is what a waiting task waits for on one resource: the
// earlier tasks on the resource's waiting line that conflict with it, all
// of which must reach a final state before it starts (for an exclusive
// name, every earlier task naming the resource; for a shared one, the
// earlier tasks naming it exclusively).
type ResourceWait struct {
	Resource  string
	Exclusive bool // the task names the resource exclusively
	// Blocked: the task's entry on this line is blocked. When it is and
	// Ahead is empty, the tasks it waited for have finished and the
	// hand-off of the line is pending (another transaction, typically an
	// open DispatchTx, held the line when they finished): the next worker
	// step after that transaction ends hands the line on.
	Blocked bool
	Ahead   []Blocker // the first MaxBlockersShown of them, in line order
	Total   int       // how many there are
}

// HandoffPending reports whether the task's entry is blocked with no
// conflicting task ahead (see [ResourceWait.Blocked]).
func (r ResourceWait) HandoffPending() bool { return r.Blocked && r.Total == 0 }

// Blocker is an earlier task that a waiting task waits for on a resource.
type Blocker struct {
	ID        int64
	Name      string
	State     State // running or canceling: it holds the resource; waiting: it is ahead in line
	Exclusive bool  // it names the resource exclusively
	WorkerID  int64 // the worker running it, 0 if none
	CreatedAt time.Time
	StartedAt time.Time // zero unless running
}

// MaxBlockersShown is how many blockers a [ResourceWait] lists per
// resource; Total counts them all.
const MaxBlockersShown = 100

// WhyWaiting explains what the task id waits for: resource by resource, the
// earlier conflicting tasks on its waiting lines (those running, which
// hold the resource, and those waiting ahead of it), whether it is ready,
// and whether any live worker handles its name. Everything is read in one
// read-only transaction from the waiting lines (docs/design.md §3), so the
// report is consistent; a task that is not waiting gets a report with its
// state and no resources. An unknown id returns [ErrNotFound].
func (c *Client) WhyWaiting(ctx context.Context, id int64) (*WaitReport, error) {
	if err := c.checkSchema(ctx); err != nil {
		return nil, err
	}
	rep := &WaitReport{}
	err := pgx.BeginTxFunc(ctx, c.pool, pgx.TxOptions{AccessMode: pgx.ReadOnly, IsoLevel: pgx.RepeatableRead}, func(tx pgx.Tx) error {
		t, err := scanTask(tx.QueryRow(ctx, c.q.get, id))
		if err != nil {
			return err
		}
		rep.Task = t
		s := pgx.Identifier{c.schema}.Sanitize()
		var handlers int
		if err := tx.QueryRow(ctx, `SELECT count(*) FILTER (WHERE `+fleet.Live+`),
			       count(*) FILTER (WHERE `+fleet.Live+` AND $1 = ANY (w.handles))
			  FROM `+s+`.workers w`, t.Name).Scan(&rep.LiveWorkers, &handlers); err != nil {
			return err
		}
		if t.State != StateWaiting {
			return nil
		}
		rep.Unhandled = handlers == 0
		return c.explain(ctx, tx, rep)
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: id %d", ErrNotFound, id)
	}
	if err != nil {
		return nil, fmt.Errorf("tasking: explain task %d: %w", id, err)
	}
	return rep, nil
}

// explain fills in the resources of a waiting task's report.
func (c *Client) explain(ctx context.Context, tx pgx.Tx, rep *WaitReport) error {
	t := rep.Task
	s := pgx.Identifier{c.schema}.Sanitize()
	names := append(append([]string{}, t.Exclusive...), t.Shared...)
	excl := make([]bool, len(names))
	for i := range t.Exclusive {
		excl[i] = true
	}
	// One row per resource: the entry's state and the number of earlier
	// conflicting entries (an index range scan on the line).
	rows, err := tx.Query(ctx, `SELECT u.r, u.x, coalesce(l.blocked, false),
		       (SELECT count(*) FROM `+s+`.lines a WHERE a.resource = u.r AND a.task < $1 AND (u.x OR a.excl))
		  FROM unnest($2::text[], $3::boolean[]) WITH ORDINALITY AS u(r, x, o)
		  LEFT JOIN `+s+`.lines l ON l.resource = u.r AND l.task = $1
		 ORDER BY u.o`, t.ID, names, excl)
	if err != nil {
		return err
	}
	var rw ResourceWait
	_, err = pgx.ForEachRow(rows, []any{&rw.Resource, &rw.Exclusive, &rw.Blocked, &rw.Total}, func() error {
		rep.Resources = append(rep.Resources, rw)
		return nil
	})
	if err != nil {
		return err
	}
	// The first blockers of each line, with their tasks.
	rows, err = tx.Query(ctx, `SELECT u.o, t.id, t.name, t.state, a.excl, coalesce(t.worker_id, 0),
		       t.created_at, coalesce(t.started_at, 'epoch')
		  FROM unnest($2::text[], $3::boolean[]) WITH ORDINALITY AS u(r, x, o)
		  CROSS JOIN LATERAL (SELECT a.task, a.excl FROM `+s+`.lines a
		                       WHERE a.resource = u.r AND a.task < $1 AND (u.x OR a.excl)
		                       ORDER BY a.task LIMIT $4) a
		  JOIN `+s+`.tasks t ON t.id = a.task
		 ORDER BY u.o, t.id`, t.ID, names, excl, MaxBlockersShown)
	if err != nil {
		return err
	}
	var o int
	var b Blocker
	var state string
	_, err = pgx.ForEachRow(rows, []any{&o, &b.ID, &b.Name, &state, &b.Exclusive, &b.WorkerID, &b.CreatedAt, &b.StartedAt}, func() error {
		b.State = State(state)
		if b.StartedAt.Unix() == 0 {
			b.StartedAt = time.Time{}
		}
		rep.Resources[o-1].Ahead = append(rep.Resources[o-1].Ahead, b)
		return nil
	})
	if err != nil {
		return err
	}
	rep.Ready = true
	for _, r := range rep.Resources {
		if r.Blocked {
			rep.Ready = false
		}
	}
	return nil
}
