package tasking

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tasking-go/tasking/internal/fleet"
)

// querier is what the store needs: a pool, a connection or a transaction.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// queries holds the store's SQL for one schema. The logic that keeps the
// ordering promise lives in the schema's functions (internal/migrate/sql):
// dispatch, step, cancel, settle and handoff.
type queries struct {
	dispatch string
	traced   string // dispatch that stores the trace context ($10) with the tasks
	traces   string
	related  string // dispatch_related, for tasks with a parent or a group
	relTrace string // related that stores the trace context ($12) with the tasks
	cancel   string
	get      string
	list     string
	finals   string
	byIDs    string
	step     string
	pass     string // a chain's hand-off (chain.go)
	unclaim  string
	progress string

	purge         string
	claimPeriod   string
	lastPeriod    string
	claimPeriodic string

	createGroup string
	markGroup   string
	getGroup    string
	cancelGroup string
	groupsDone  string

	immediate         string
	immediateOwner    string
	finishImmediate   string
	unclaimImmediate  string
	progressImmediate string
	state             string
}

const taskCols = `id, name, args, exclusive, shared, state, coalesce(worker_id, 0), epoch,
	created_at, coalesce(started_at, 'epoch'), coalesce(finished_at, 'epoch'), coalesce(error, ''), result,
	coalesce(timeout_ms, 0), progress, coalesce(parent_id, 0), coalesce(group_id, 0),
	coalesce(unique_key, ''), attempt, attempt_log, coalesce(run_at, 'epoch'), retry`

func newQueries(schema string) queries {
	s := pgx.Identifier{schema}.Sanitize()
	lastPeriod, claimPeriodic := periodicSQL(s)
	return queries{
		lastPeriod:    lastPeriod,
		claimPeriodic: claimPeriodic,
		dispatch:      `SELECT id, created_at, ready, existing FROM ` + s + `.dispatch($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
		traced: `WITH d AS (SELECT id, created_at, ready, existing FROM ` + s + `.dispatch($1, $2, $3, $4, $5, $6, $7, $8, $9)),
			tr AS (INSERT INTO ` + s + `.task_traces (task, parent) SELECT id, $10 FROM d WHERE existing IS NULL)
			SELECT id, created_at, ready, existing FROM d`,
		traces: `SELECT task, parent FROM ` + s + `.task_traces WHERE task = ANY ($1)`,
		related: `SELECT id, created_at, ready, existing, coalesce(group_id, 0)
			FROM ` + s + `.dispatch_related($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`,
		relTrace: `WITH d AS (SELECT id, created_at, ready, existing, coalesce(group_id, 0) AS g
			                FROM ` + s + `.dispatch_related($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)),
			tr AS (INSERT INTO ` + s + `.task_traces (task, parent) SELECT id, $12 FROM d WHERE existing IS NULL)
			SELECT id, created_at, ready, existing, g FROM d`,
		cancel: `SELECT state, ready FROM ` + s + `.cancel($1, $2)`,
		get:    `SELECT ` + taskCols + ` FROM ` + s + `.tasks WHERE id = $1`,
		list: `SELECT ` + taskCols + ` FROM ` + s + `.tasks
			WHERE id > $1 AND ($2 = '' OR state = $2) AND ($3 = '' OR name = $3)
			  AND ($4 = '' OR $4 = ANY(exclusive) OR $4 = ANY(shared))
			  AND ($6 = 0 OR parent_id = $6) AND ($7 = 0 OR group_id = $7)
			ORDER BY id LIMIT $5`,
		finals: `SELECT ` + taskCols + ` FROM ` + s + `.tasks
			WHERE id = ANY($1) AND state IN ('completed', 'failed', 'canceled')`,
		purge:       purgeSQL(s),
		claimPeriod: fleet.ClaimPeriodSQL(s),
		byIDs:       `SELECT ` + taskCols + ` FROM ` + s + `.tasks WHERE id = ANY($1)`,
		step: `SELECT kind, id, name, args, exclusive, shared, epoch, created_at, started_at, timeout_ms, attempt, retry, unique_key, run_at
			FROM ` + s + `.step($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)`,
		pass: `SELECT ` + s + `.pass($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
		// Progress reports of running tasks (progress.go), guarded by
		// worker, epoch and state like every write of a worker.
		progress: `UPDATE ` + s + `.tasks t SET progress = v.p::jsonb
			FROM unnest($2::bigint[], $3::int[], $4::text[]) AS v(id, epoch, p)
			WHERE t.id = v.id AND t.worker_id = $1 AND t.epoch = v.epoch AND t.state IN ('running', 'canceling')`,

		createGroup: `INSERT INTO ` + s + `.groups DEFAULT VALUES RETURNING id, created_at`,
		markGroup:   `UPDATE ` + s + `.groups SET all_dispatched = true WHERE id = $1`,
		getGroup: `SELECT g.id, g.created_at, g.all_dispatched, g.canceled,
			       coalesce(c.states, '{}'), coalesce(c.counts, '{}')
			  FROM ` + s + `.groups g
			  LEFT JOIN LATERAL (SELECT array_agg(x.state) AS states, array_agg(x.n) AS counts
			                       FROM (SELECT t.state, count(*) AS n FROM ` + s + `.tasks t
			                              WHERE t.group_id = g.id GROUP BY t.state) x) c ON true
			 WHERE g.id = $1`,
		cancelGroup: `SELECT id, state, ready FROM ` + s + `.cancel_group($1, $2)`,

		immediate: `SELECT id, created_at, group_id, claimed, epoch, started_at
			FROM ` + s + `.dispatch_immediate($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`,
		immediateOwner:  `SELECT -nextval('` + s + `.immediate_seq')`,
		finishImmediate: `SELECT state, finished_at, ready FROM ` + s + `.finish_immediate($1, $2, $3, $4, $5, $6, $7)`,
		unclaimImmediate: `UPDATE ` + s + `.tasks SET state = 'waiting', started_at = NULL, lease_until = NULL
			WHERE id = $1 AND epoch = $2 AND worker_id IS NULL AND state = 'running'`,
		state: `SELECT state FROM ` + s + `.tasks WHERE id = $1`,
		progressImmediate: `UPDATE ` + s + `.tasks SET progress = $3::jsonb
			WHERE id = $1 AND epoch = $2 AND worker_id IS NULL AND state IN ('running', 'canceling')`,
		groupsDone: `SELECT g.id FROM ` + s + `.groups g
			WHERE g.id = ANY($1) AND g.all_dispatched
			  AND NOT EXISTS (SELECT 1 FROM ` + s + `.tasks t
			                   WHERE t.group_id = g.id AND t.state IN ('waiting', 'scheduled', 'retrying', 'running', 'canceling'))`,
		// Puts back tasks this worker claimed but will not run (their locks
		// were refused, or the step's reply was lost), guarded by owner and
		// epoch. Their line entries never left: they keep their place. The
		// claim did not run the handler, so it is not an attempt. Returns
		// the ids it put back.
		unclaim: `UPDATE ` + s + `.tasks t SET state = 'waiting', worker_id = NULL, started_at = NULL, attempt = t.attempt - 1
			FROM unnest($2::bigint[], $3::int[]) AS v(id, epoch)
			WHERE t.id = v.id AND t.epoch = v.epoch AND t.worker_id = $1 AND t.state = 'running'
			RETURNING t.id`,
	}
}

// runKey is the PostgreSQL locker's run-time key for a resource.
func runKey(schema, name string) int64 { return hashKey("tasking/run", schema, name) }

// hashKey maps (space, namespace, name) to 64 bits with SHA-256, so distinct
// names collide only by astronomically bad luck.
func hashKey(space, ns, name string) int64 {
	h := sha256.New()
	var n [4]byte
	for _, part := range []string{space, ns, name} {
		binary.BigEndian.PutUint32(n[:], uint32(len(part)))
		h.Write(n[:])
		h.Write([]byte(part))
	}
	var sum [sha256.Size]byte
	return int64(binary.BigEndian.Uint64(h.Sum(sum[:0])))
}

// insert runs the dispatch function (dispatch_related for tasks with a
// parent or a group). ready: some task was ready at once. trace, when not
// empty, is the trace context stored with the tasks; parent is the id of
// the task whose handler dispatches them, 0 if none. A task whose unique
// key an earlier task of the batch has is not sent: it gets that task (see
// Unique).
func (c *Client) insert(ctx context.Context, db querier, b *preparedBatch, autocommit bool, trace string, parent int64) (tasks []*Task, ready bool, err error) {
	var send []int        // indexes into b.specs of the tasks sent
	same := map[int]int{} // index of a task folded into an earlier one of the batch -> that one
	first := map[string]int{}
	for i, s := range b.specs {
		if s.Unique != "" {
			if j, ok := first[s.Unique]; ok {
				same[i] = j
				continue
			}
			first[s.Unique] = i
		}
		send = append(send, i)
	}
	n := len(send)
	names, args, uniq := make([]string, n), make([]string, n), make([]string, n)
	retries := make([]*string, n)
	runAt := make([]*time.Time, n)
	excl, shared := make([][]string, n), make([][]string, n)
	timeouts := make([]int64, n)
	groups := make([]int64, n)
	related := parent != 0
	for k, i := range send {
		s := b.specs[i]
		names[k], excl[k], shared[k], args[k], uniq[k] = s.Name, s.Exclusive, s.Shared, string(b.args[i]), s.Unique
		timeouts[k] = s.Timeout.Milliseconds()
		retries[k] = encodeRetry(s.Retry)
		if !s.RunAt.IsZero() {
			runAt[k] = &s.RunAt
		}
		groups[k] = s.Group
		related = related || s.Group > 0
	}
	exclJSON, _ := json.Marshal(excl)
	sharedJSON, _ := json.Marshal(shared)
	channel := c.bus.dispatchChannel()
	if autocommit {
		channel = c.bus.autocommitChannel()
	}
	var rows pgx.Rows
	switch {
	case related && trace != "":
		rows, err = db.Query(ctx, c.q.relTrace, names, args, string(exclJSON), string(sharedJSON), timeouts, channel,
			parent, groups, uniq, retries, runAt, trace)
	case related:
		rows, err = db.Query(ctx, c.q.related, names, args, string(exclJSON), string(sharedJSON), timeouts, channel,
			parent, groups, uniq, retries, runAt)
	case trace != "":
		rows, err = db.Query(ctx, c.q.traced, names, args, string(exclJSON), string(sharedJSON), timeouts, channel,
			uniq, retries, runAt, trace)
	default:
		rows, err = db.Query(ctx, c.q.dispatch, names, args, string(exclJSON), string(sharedJSON), timeouts, channel,
			uniq, retries, runAt)
	}
	if err != nil {
		return nil, false, dispatchErr(err)
	}
	type inserted struct {
		id      int64
		created time.Time
		group   int64
	}
	var got []inserted
	existing := map[int]int64{} // position in send -> the waiting task with its key
	for rows.Next() {
		var r inserted
		var rd bool
		var pos *int32
		dest := []any{&r.id, &r.created, &rd, &pos}
		if related {
			dest = append(dest, &r.group)
		}
		if err := rows.Scan(dest...); err != nil {
			rows.Close()
			return nil, false, fmt.Errorf("tasking: dispatch: %w", err)
		}
		if pos != nil {
			existing[int(*pos)-1] = r.id
			continue
		}
		ready = ready || rd
		got = append(got, r)
	}
	if err := rows.Err(); err != nil {
		return nil, false, dispatchErr(err)
	}
	if len(got)+len(existing) != n {
		return nil, false, fmt.Errorf("tasking: dispatch: inserted %d tasks and found %d, expected %d", len(got), len(existing), n)
	}
	var found map[int64]*Task
	if len(existing) > 0 {
		if found, err = c.byIDs(ctx, db, slices.Collect(maps.Values(existing))); err != nil {
			return nil, false, fmt.Errorf("tasking: dispatch: read the waiting tasks with the same unique keys: %w", err)
		}
	}
	// IDs were drawn in batch order.
	sort.Slice(got, func(i, j int) bool { return got[i].id < got[j].id })
	tasks = make([]*Task, len(b.specs))
	for k, i := range send {
		if id, ok := existing[k]; ok {
			t, ok := found[id]
			if !ok {
				// Only a purge removes a waiting task's row.
				return nil, false, fmt.Errorf("tasking: dispatch: the waiting task %d with unique key %q is gone", id, b.specs[i].Unique)
			}
			t.Existing = true
			tasks[i] = t
			continue
		}
		r := got[0]
		got = got[1:]
		s := b.specs[i]
		tasks[i] = &Task{
			ID: r.id, Name: s.Name, Args: b.args[i], Exclusive: s.Exclusive, Shared: s.Shared,
			State: StateWaiting, CreatedAt: r.created, Timeout: s.Timeout, Parent: parent, Group: r.group,
			UniqueKey: s.Unique, Retry: s.Retry,
		}
		if s.RunAt.After(r.created) {
			tasks[i].State, tasks[i].RunAt = StateScheduled, s.RunAt
		}
	}
	for i, j := range same {
		t := *tasks[j]
		t.Existing = true
		tasks[i] = &t
	}
	return tasks, ready, nil
}

// byIDs reads the tasks with those ids on db.
func (c *Client) byIDs(ctx context.Context, db querier, ids []int64) (map[int64]*Task, error) {
	rows, err := db.Query(ctx, c.q.byIDs, ids)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := make(map[int64]*Task, len(ids))
	for rows.Next() {
		t, err := scanTask(rows)
		if err != nil {
			return nil, err
		}
		out[t.ID] = t
	}
	return out, rows.Err()
}

// dispatchErr reports a data exception (SQLSTATE class 22) from the insert
// as bad args: the names were checked before, so only args that JSON allows
// and jsonb refuses (a number out of numeric's range) get here.
func dispatchErr(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && strings.HasPrefix(pgErr.Code, "22") {
		return &InputError{Field: "args", Problem: "PostgreSQL cannot store them: " + pgErr.Message}
	}
	if err := groupErr(err); err != nil {
		return err
	}
	return fmt.Errorf("tasking: dispatch: %w", err)
}

func scanTask(row pgx.Row) (*Task, error) {
	t := &Task{}
	var state string
	var args, result []byte
	var timeoutMS int64
	var progress, log, retry []byte
	err := row.Scan(&t.ID, &t.Name, &args, &t.Exclusive, &t.Shared, &state, &t.WorkerID, &t.Epoch,
		&t.CreatedAt, &t.StartedAt, &t.FinishedAt, &t.Error, &result, &timeoutMS, &progress, &t.Parent, &t.Group,
		&t.UniqueKey, &t.Attempt, &log, &t.RunAt, &retry)
	if err != nil {
		return nil, err
	}
	if progress != nil {
		if err := json.Unmarshal(progress, &t.Progress); err != nil {
			return nil, fmt.Errorf("progress of task %d: %w", t.ID, err)
		}
	}
	if err := json.Unmarshal(log, &t.Attempts); err != nil {
		return nil, fmt.Errorf("attempt log of task %d: %w", t.ID, err)
	}
	t.Retry = decodeRetry(retry)
	if t.RunAt.Unix() == 0 {
		t.RunAt = time.Time{}
	}
	t.State = State(state)
	t.Timeout = time.Duration(timeoutMS) * time.Millisecond
	t.Args = args
	t.Result = result
	if t.StartedAt.Unix() == 0 {
		t.StartedAt = time.Time{}
	}
	if t.FinishedAt.Unix() == 0 {
		t.FinishedAt = time.Time{}
	}
	return t, nil
}

func (c *Client) get(ctx context.Context, id int64) (*Task, error) {
	t, err := scanTask(c.pool.QueryRow(ctx, c.q.get, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: id %d", ErrNotFound, id)
	}
	if err != nil {
		return nil, fmt.Errorf("tasking: get task %d: %w", id, err)
	}
	return t, nil
}

// finals returns those of ids that are in a final state.
func (c *Client) finals(ctx context.Context, ids []int64) ([]*Task, error) {
	rows, err := c.pool.Query(ctx, c.q.finals, ids)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Task
	for rows.Next() {
		t, err := scanTask(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

// stepResult is what one step did.
type stepResult struct {
	done      map[int64]bool // outcomes written (the others were no longer this worker's)
	claimed   []*Task
	chained   []*Task   // claimed behind tasks of claimed on their lines, in id order (chain.go)
	left      int       // tasks that became ready and were not claimed by this step
	handoffs  bool      // handoffs were left for a later step
	nextRetry time.Time // when the earliest retry or scheduled task is due, zero for none
}

// step runs one worker step on conn (see step.go and the step function).
// Only tasks that need no locks are claimed when locks is false; up to
// chain tasks are claimed behind the claimed ones on their lines
// (chain.go).
func (c *Client) step(ctx context.Context, conn *workerConn, worker int64, outs []outcome, names []string, policies string, free, chain int, fresh time.Duration, locks bool) (stepResult, error) {
	n := len(outs)
	ids, epochs := make([]int64, n), make([]int32, n)
	states, errs, results, progress := make([]string, n), make([]string, n), make([]*string, n), make([]*string, n)
	delays := make([]int64, n)
	for i, o := range outs {
		ids[i], epochs[i], states[i], errs[i] = o.task.ID, int32(o.task.Epoch), string(o.state), o.err
		delays[i] = o.delay.Milliseconds()
		if r := o.task.takeResult(); r != nil {
			s := string(r)
			results[i] = &s
		}
		if o.progress != nil {
			s := string(o.progress)
			progress[i] = &s
		}
	}
	res := stepResult{done: make(map[int64]bool, n)}
	err := conn.use(ctx, func(conn *pgx.Conn) error {
		rows, err := conn.Query(ctx, c.q.step, worker, ids, epochs, states, errs, results, names, free, fresh.Milliseconds(), locks,
			progress, delays, policies, chain)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var kind byte
			var id int64
			var name *string
			var args []byte
			var excl, shared []string
			var epoch *int32
			var created, started *time.Time
			var timeout *int64
			var attempt *int32
			var retry []byte
			var unique *string
			var runAt *time.Time
			if err := rows.Scan(&kind, &id, &name, &args, &excl, &shared, &epoch, &created, &started, &timeout,
				&attempt, &retry, &unique, &runAt); err != nil {
				return err
			}
			switch kind {
			case 'f':
				res.done[id] = true
			case 'c', 'n':
				t := &Task{
					ID: id, Name: *name, Args: args, Exclusive: excl, Shared: shared,
					State: StateRunning, WorkerID: worker, Epoch: int(*epoch), CreatedAt: *created,
					StartedAt: *started, Timeout: time.Duration(*timeout) * time.Millisecond,
					Attempt: int(*attempt), Retry: decodeRetry(retry),
				}
				if unique != nil {
					t.UniqueKey = *unique
				}
				if runAt != nil {
					t.RunAt = *runAt
				}
				if kind == 'c' {
					res.claimed = append(res.claimed, t)
				} else {
					res.chained = append(res.chained, t)
				}
			case 's':
				res.left = int(id)
				res.handoffs = epoch != nil && *epoch > 0
				if created != nil {
					res.nextRetry = *created
				}
			}
		}
		if err := rows.Err(); err != nil {
			return err
		}
		slices.SortFunc(res.chained, func(a, b *Task) int { return cmp.Compare(a.ID, b.ID) })
		return nil
	})
	return res, err
}

// ListFilter selects tasks for [Client.List]. Zero fields match everything.
type ListFilter struct {
	State    State  // only tasks in this state
	Name     string // only tasks with this name
	Resource string // only tasks naming this resource, in either mode
	Parent   int64  // only the tasks dispatched by this task's handler
	Group    int64  // only the tasks in this group
	After    int64  // cursor: only tasks with a larger id (pass the previous page's next)
	Limit    int    // page size; default 100, at most 10,000
}

// List returns tasks matching f in id (dispatch) order, and the cursor for
// the next page, 0 when there are no more. Listing the waiting tasks that
// name a resource shows what is queued on it, in the order it will run.
func (c *Client) List(ctx context.Context, f ListFilter) ([]*Task, int64, error) {
	if err := checkListFilter(f); err != nil {
		return nil, 0, err
	}
	if f.Limit == 0 {
		f.Limit = 100
	}
	if f.Limit < 0 || f.Limit > 10000 {
		return nil, 0, inputErr("limit", "%d, need 1 to 10000", f.Limit)
	}
	switch f.State {
	case "", StateWaiting, StateScheduled, StateRetrying, StateRunning, StateCanceling, StateCompleted, StateFailed, StateCanceled:
	default:
		return nil, 0, inputErr("state", "unknown state %q", f.State)
	}
	if err := c.checkSchema(ctx); err != nil {
		return nil, 0, err
	}
	rows, err := c.pool.Query(ctx, c.q.list, f.After, string(f.State), f.Name, f.Resource, f.Limit+1, f.Parent, f.Group)
	if err != nil {
		return nil, 0, fmt.Errorf("tasking: list tasks: %w", err)
	}
	defer rows.Close()
	var out []*Task
	for rows.Next() {
		t, err := scanTask(rows)
		if err != nil {
			return nil, 0, fmt.Errorf("tasking: list tasks: %w", err)
		}
		out = append(out, t)
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("tasking: list tasks: %w", err)
	}
	var next int64
	if len(out) > f.Limit {
		out = out[:f.Limit]
		next = out[len(out)-1].ID
	}
	return out, next, nil
}
