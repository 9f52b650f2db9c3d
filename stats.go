package tasking

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tasking-go/tasking/internal/fleet"
)

// Stats is a picture of the queue and the fleet, taken in one transaction
// ([Client.Stats]).
type Stats struct {
	At      time.Time       // the database's clock when it was taken
	States  map[State]int64 // tasks by state (states with none are absent)
	Names   []NameStats     // per task name, by name
	Workers []WorkerInfo    // registered workers, by name then id
}

// NameStats is what the queue holds of one task name.
type NameStats struct {
	Name   string
	States map[State]int64 // tasks of this name by state
	// OldestWaiting is how long the oldest waiting task of this name has
	// waited since its dispatch (0 when none waits). A growing age on a name
	// means its tasks are blocked on their resources, or no live worker
	// handles it (see Unhandled).
	OldestWaiting time.Duration
	// Unhandled: tasks of this name wait and no live worker handles the
	// name, so they never start (a typo in a dispatch, or a worker kind not
	// deployed).
	Unhandled bool
}

// WorkerInfo describes a registered worker instance.
type WorkerInfo struct {
	ID          int64 // the instance's id (Task.WorkerID of the tasks it claims)
	Name        string
	Host        string
	PID         int
	Locker      string   // kind of its ResourceLocker: "postgres", "redis", "memory"
	Handles     []string // task names it has handlers for, sorted
	Slots       int      // handlers it runs at once (0: registered by an older release)
	Busy        int      // its running and canceling tasks
	StartedAt   time.Time
	HeartbeatAt time.Time     // its last heartbeat
	TTL         time.Duration // declared gone this long after its last heartbeat
	// Live: its last heartbeat is younger than its TTL. A row that is not
	// live is removed by the next cleanup, which fails its running tasks.
	Live bool
}

// Stats returns the tasks by state and by name, the age of each name's
// oldest waiting task, and the registered workers with how many of their
// slots are busy. It reads the whole tasks table (one aggregate), so its
// cost grows with the number of stored tasks, final ones included: call it
// for a dashboard or a periodic gauge, not per task.
func (c *Client) Stats(ctx context.Context) (*Stats, error) {
	if err := c.checkSchema(ctx); err != nil {
		return nil, err
	}
	st := &Stats{States: map[State]int64{}}
	err := pgx.BeginTxFunc(ctx, c.pool, pgx.TxOptions{AccessMode: pgx.ReadOnly, IsoLevel: pgx.RepeatableRead}, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `SELECT now()`).Scan(&st.At); err != nil {
			return err
		}
		var err error
		if st.Names, err = c.nameStats(ctx, tx, st.States); err != nil {
			return err
		}
		st.Workers, err = c.workers(ctx, tx)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("tasking: stats: %w", err)
	}
	return st, nil
}

// nameStats counts tasks by name and state, adding them up in states.
func (c *Client) nameStats(ctx context.Context, tx pgx.Tx, states map[State]int64) ([]NameStats, error) {
	s := pgx.Identifier{c.schema}.Sanitize()
	rows, err := tx.Query(ctx, `SELECT t.name, t.state, count(*),
		       coalesce(extract(epoch FROM now() - min(t.created_at) FILTER (WHERE t.state = 'waiting')), 0),
		       t.state = 'waiting' AND NOT EXISTS (SELECT 1 FROM `+s+`.workers w
		                                           WHERE t.name = ANY (w.handles) AND `+fleet.Live+`)
		  FROM `+s+`.tasks t GROUP BY t.name, t.state ORDER BY t.name, t.state`)
	if err != nil {
		return nil, err
	}
	var out []NameStats
	var name, state string
	var n int64
	var age float64
	var unhandled bool
	_, err = pgx.ForEachRow(rows, []any{&name, &state, &n, &age, &unhandled}, func() error {
		if len(out) == 0 || out[len(out)-1].Name != name {
			out = append(out, NameStats{Name: name, States: map[State]int64{}})
		}
		ns := &out[len(out)-1]
		ns.States[State(state)] = n
		states[State(state)] += n
		if State(state) == StateWaiting {
			ns.OldestWaiting = time.Duration(age * float64(time.Second)).Round(time.Millisecond)
			ns.Unhandled = unhandled
		}
		return nil
	})
	return out, err
}

// workers reads the workers table, with each worker's busy slots.
func (c *Client) workers(ctx context.Context, db querier) ([]WorkerInfo, error) {
	s := pgx.Identifier{c.schema}.Sanitize()
	rows, err := db.Query(ctx, `SELECT w.id, w.name, w.host, w.pid, w.locker, w.handles, w.slots,
		       (SELECT count(*) FROM `+s+`.tasks t WHERE t.worker_id = w.id AND t.state IN ('running', 'canceling')),
		       w.started_at, w.heartbeat_at, w.ttl_ms, `+fleet.Live+`
		  FROM `+s+`.workers w ORDER BY w.name, w.id`)
	if err != nil {
		return nil, err
	}
	var out []WorkerInfo
	var wi WorkerInfo
	var ttl int64
	_, err = pgx.ForEachRow(rows, []any{&wi.ID, &wi.Name, &wi.Host, &wi.PID, &wi.Locker, &wi.Handles, &wi.Slots,
		&wi.Busy, &wi.StartedAt, &wi.HeartbeatAt, &ttl, &wi.Live}, func() error {
		wi.TTL = time.Duration(ttl) * time.Millisecond
		wi.Handles = sortedCopy(wi.Handles)
		out = append(out, wi)
		return nil
	})
	return out, err
}

// Workers returns the registered workers (see [WorkerInfo]), by name.
func (c *Client) Workers(ctx context.Context) ([]WorkerInfo, error) {
	if err := c.checkSchema(ctx); err != nil {
		return nil, err
	}
	ws, err := c.workers(ctx, c.pool)
	if err != nil {
		return nil, fmt.Errorf("tasking: read workers: %w", err)
	}
	return ws, nil
}

func sortedCopy(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
