package tasking

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tasking-go/tasking/internal/admit"
)

// querier is what the store needs: a pool, a connection or a transaction.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// queries holds the store's SQL for one schema.
type queries struct {
	dispatch     string
	cancel       string
	cancelNotify string
	get          string
	list         string
	finals       string
	scan         string
	window       string
	unclaim      string
	claim        string
	finish       string
	lock         string
	unlock       string
	unlockNotify string
}

const taskCols = `id, name, args, exclusive, shared, state, coalesce(worker_id, 0), epoch,
	created_at, coalesce(started_at, 'epoch'), coalesce(finished_at, 'epoch'), coalesce(error, ''), result,
	coalesce(timeout_ms, 0)`

func newQueries(schema string) queries {
	s := pgx.Identifier{schema}.Sanitize()
	return queries{
		dispatch: `SELECT id, created_at FROM ` + s + `.dispatch($1, $2, $3, $4, $5, $6, $7, $8)`,
		// Waiting: canceled at once. Running: canceling, and its worker is
		// told: cancelNotify NOTIFYs in the same statement for workers that
		// LISTEN; with other buses the client signals after it.
		cancel: `UPDATE ` + s + `.tasks
			SET state = CASE state WHEN 'waiting' THEN 'canceled' ELSE 'canceling' END,
			    finished_at = CASE state WHEN 'waiting' THEN clock_timestamp() END
			WHERE id = $1 AND state IN ('waiting', 'running')
			RETURNING state`,
		cancelNotify: `WITH u AS (
				UPDATE ` + s + `.tasks
				SET state = CASE state WHEN 'waiting' THEN 'canceled' ELSE 'canceling' END,
				    finished_at = CASE state WHEN 'waiting' THEN clock_timestamp() END
				WHERE id = $1 AND state IN ('waiting', 'running')
				RETURNING id, state
			)
			SELECT u.state FROM u, LATERAL (SELECT pg_notify($2, 'c' || u.id)
				WHERE u.state = 'canceling') n`,
		get: `SELECT ` + taskCols + ` FROM ` + s + `.tasks WHERE id = $1`,
		list: `SELECT ` + taskCols + ` FROM ` + s + `.tasks
			WHERE id > $1 AND ($2 = '' OR state = $2) AND ($3 = '' OR name = $3)
			  AND ($4 = '' OR $4 = ANY(exclusive) OR $4 = ANY(shared))
			ORDER BY id LIMIT $5`,
		finals: `SELECT ` + taskCols + ` FROM ` + s + `.tasks
			WHERE id = ANY($1) AND state IN ('completed', 'failed', 'canceled')`,
		// Deeper pages skip, on the server, waiting tasks that the walk
		// would pass over without learning anything: tasks that
		// conflict with the names already taken ($x: taken exclusively, $a:
		// taken in any mode) and whose own names are all taken already, in
		// the same mode or a stronger one. Adding such a task's names to the
		// taken sets changes nothing, and it is no candidate, so skipping it
		// leaves the walk's outcome exactly as it was; but a blocked head of
		// thousands of tasks on a busy resource no longer travels to the
		// worker on every cycle (DESIGN §5.7).
		window: `SELECT id, name, exclusive, shared FROM ` + s + `.tasks
			WHERE state = 'waiting' AND (exclusive <> '{}' OR shared <> '{}') AND id > $1
			  AND NOT (exclusive <@ $3::text[] AND shared <@ $4::text[]
			           AND (exclusive && $4::text[] OR shared && $3::text[]))
			ORDER BY id LIMIT $2`,
		// The first page of a scan reads the running tasks that hold
		// resources (their names start out taken) and the oldest waiting
		// tasks that name resources, in one statement and so one snapshot:
		// a task claimed in between cannot slip through both reads. It
		// reads a bounded page, so its cost never grows with a blocked head.
		//
		// ORDER BY makes the running branch a plain index scan, which marks
		// the index entries of finished tasks dead as it passes them; a
		// bitmap scan would read them again on every cycle until a vacuum.
		scan: `(SELECT true, id, name, exclusive, shared FROM ` + s + `.tasks
			WHERE state IN ('running', 'canceling') AND (exclusive <> '{}' OR shared <> '{}')
			ORDER BY id)
			UNION ALL
			(SELECT false, id, name, exclusive, shared FROM ` + s + `.tasks
			WHERE state = 'waiting' AND (exclusive <> '{}' OR shared <> '{}')
			ORDER BY id LIMIT $1)`,
		// Puts back tasks this worker claimed but never started (the claim's
		// reply was lost), guarded by owner and epoch.
		unclaim: `UPDATE ` + s + `.tasks t SET state = 'waiting', worker_id = NULL, started_at = NULL
			FROM unnest($2::bigint[], $3::int[]) AS v(id, epoch)
			WHERE t.id = v.id AND t.epoch = v.epoch AND t.worker_id = $1 AND t.state = 'running'`,
		// One claim moves the granted tasks ($2) and up to $4 tasks without
		// resources, oldest first, that this worker handles ($3). Tasks
		// without resources conflict with nothing, so any worker may take any
		// of them; SKIP LOCKED leaves a row another worker is claiming right
		// now to that worker instead of making both wait. The ids go in as
		// an array so that the update looks them up by primary key (a join
		// turns into a sequential scan once the table is small).
		claim: `WITH granted AS (
				SELECT id FROM ` + s + `.tasks WHERE id = ANY($2) AND state = 'waiting'
				FOR UPDATE SKIP LOCKED
			), free AS (
				SELECT id FROM ` + s + `.tasks
				WHERE state = 'waiting' AND exclusive = '{}' AND shared = '{}' AND name = ANY($3)
				ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED
			)
			UPDATE ` + s + `.tasks t
			SET state = 'running', worker_id = $1, epoch = t.epoch + 1, started_at = clock_timestamp()
			WHERE t.id = ANY (ARRAY(SELECT id FROM granted UNION ALL SELECT id FROM free))
			RETURNING t.id, t.name, t.exclusive, t.shared, t.args, t.epoch, t.created_at, t.started_at,
				coalesce(t.timeout_ms, 0)`,
		// Guarded by worker and epoch: a late write from a worker that lost
		// its claim changes nothing. A canceling task ends canceled. The
		// worker guard is written so that no index can serve it: the
		// planner would otherwise pick tasks_worker_idx, which every claim
		// fills with entries that stay dead until a vacuum, and each finish
		// would wade through them; the primary key finds the rows directly.
		finish: `UPDATE ` + s + `.tasks t
			SET state = CASE WHEN t.state = 'canceling' THEN 'canceled' ELSE v.state END,
			    finished_at = clock_timestamp(), error = nullif(v.error, ''), result = v.result
			FROM unnest($2::bigint[], $3::int[], $4::text[], $5::text[], $6::jsonb[]) AS v(id, epoch, state, error, result)
			WHERE t.id = v.id AND t.worker_id IS NOT DISTINCT FROM $1 AND t.epoch = v.epoch
			  AND t.state IN ('running', 'canceling')
			RETURNING t.id`,
		lock:   `SELECT req, fence FROM ` + s + `.lock_batch($1, $2, $3, $4, $5)`,
		unlock: `SELECT count(*) FROM ` + s + `.lock_batch($1, $2, '{}', '{}', '{}')`,
		// The NOTIFY goes out at the end of the statement that released.
		unlockNotify: `SELECT pg_notify($3, 'r') FROM (SELECT count(*) FROM ` + s +
			`.lock_batch($1, $2, '{}', '{}', '{}')) x`,
	}
}

// dispatchKey is the advisory-lock key a dispatch takes for a resource to
// order conflicting inserts. It lives in its own key space, apart from the
// PostgreSQL locker's run-time keys, so a running task never delays a
// dispatch.
func dispatchKey(schema, name string) int64 { return hashKey("tasking/dispatch", schema, name) }

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

func (c *Client) insert(ctx context.Context, db querier, b *preparedBatch, autocommit bool) ([]*Task, error) {
	names := make([]string, len(b.specs))
	excl := make([][]string, len(b.specs))
	shared := make([][]string, len(b.specs))
	args := make([]string, len(b.specs))
	timeouts := make([]int64, len(b.specs))
	for i, s := range b.specs {
		names[i], excl[i], shared[i], args[i] = s.Name, s.Exclusive, s.Shared, string(b.args[i])
		timeouts[i] = s.Timeout.Milliseconds()
	}
	exclJSON, _ := json.Marshal(excl)
	sharedJSON, _ := json.Marshal(shared)
	channel := c.bus.dispatchChannel()
	if autocommit {
		channel = c.bus.autocommitChannel()
	}
	rows, err := db.Query(ctx, c.q.dispatch, names, args, string(exclJSON), string(sharedJSON), timeouts,
		b.lockKeys, b.lockExcl, channel)
	if err != nil {
		return nil, dispatchErr(err)
	}
	type inserted struct {
		id      int64
		created time.Time
	}
	var got []inserted
	for rows.Next() {
		var r inserted
		if err := rows.Scan(&r.id, &r.created); err != nil {
			rows.Close()
			return nil, fmt.Errorf("tasking: dispatch: %w", err)
		}
		got = append(got, r)
	}
	if err := rows.Err(); err != nil {
		return nil, dispatchErr(err)
	}
	if len(got) != len(b.specs) {
		return nil, fmt.Errorf("tasking: dispatch: inserted %d tasks, expected %d", len(got), len(b.specs))
	}
	// IDs were drawn in batch order.
	sort.Slice(got, func(i, j int) bool { return got[i].id < got[j].id })
	tasks := make([]*Task, len(got))
	for i, r := range got {
		s := b.specs[i]
		tasks[i] = &Task{
			ID: r.id, Name: s.Name, Args: b.args[i], Exclusive: s.Exclusive, Shared: s.Shared,
			State: StateWaiting, CreatedAt: r.created, Timeout: s.Timeout,
		}
	}
	return tasks, nil
}

// dispatchErr reports a data exception (SQLSTATE class 22) from the insert
// as bad args: the names were checked before, so only args that JSON allows
// and jsonb refuses (a number out of numeric's range) get here.
func dispatchErr(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && strings.HasPrefix(pgErr.Code, "22") {
		return &InputError{Field: "args", Problem: "PostgreSQL cannot store them: " + pgErr.Message}
	}
	return fmt.Errorf("tasking: dispatch: %w", err)
}

func scanTask(row pgx.Row) (*Task, error) {
	t := &Task{}
	var state string
	var args, result []byte
	var timeoutMS int64
	err := row.Scan(&t.ID, &t.Name, &args, &t.Exclusive, &t.Shared, &state, &t.WorkerID, &t.Epoch,
		&t.CreatedAt, &t.StartedAt, &t.FinishedAt, &t.Error, &result, &timeoutMS)
	if err != nil {
		return nil, err
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

// maxSkipNames bounds the taken sets sent with a deeper page. PostgreSQL
// compares text arrays element by element with collation-aware comparisons,
// so sets of a thousand names made each page cost seconds (the mix workload
// fell from 13,000 to 2,400 tasks/s). A blocked head, which is what the
// skipping is for, takes few names.
const maxSkipNames = 64

// readWindow reads up to limit waiting tasks with id > after, oldest first,
// leaving out those that add nothing to taken (see the window query) while
// taken is small.
func (c *Client) readWindow(ctx context.Context, after int64, limit int, taken *admit.Taken, out []admit.Entry) ([]admit.Entry, error) {
	excl, all := []string{}, []string{} // empty sets skip nothing
	if taken.Len() <= maxSkipNames {
		excl, all = taken.Sets()
	}
	rows, err := c.pool.Query(ctx, c.q.window, after, limit, excl, all)
	if err != nil {
		return out, err
	}
	defer rows.Close()
	for rows.Next() {
		var e admit.Entry
		if err := rows.Scan(&e.ID, &e.Name, &e.Exclusive, &e.Shared); err != nil {
			return out, err
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

// claimed is one task a claim moved to running.
type claimed struct {
	id      int64
	name    string
	excl    []string
	shared  []string
	args    []byte
	epoch   int
	created time.Time
	started time.Time
	timeout int64 // ms
}

func (c *Client) claim(ctx context.Context, worker int64, ids []int64, names []string, free int) ([]claimed, error) {
	rows, err := c.pool.Query(ctx, c.q.claim, worker, ids, names, free)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []claimed
	for rows.Next() {
		var r claimed
		if err := rows.Scan(&r.id, &r.name, &r.excl, &r.shared, &r.args, &r.epoch, &r.created, &r.started, &r.timeout); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// outcome is a handler's end, to be written by the finisher.
type outcome struct {
	task  *Task
	state State
	err   string
	owner bool // holds locker grants to release
}

// finish writes a batch of outcomes in one statement and returns the ids it
// changed; the others were no longer this worker's to finish.
func (c *Client) finish(ctx context.Context, worker int64, batch []outcome) (map[int64]bool, error) {
	n := len(batch)
	ids, epochs := make([]int64, n), make([]int32, n)
	states, errs, results := make([]string, n), make([]string, n), make([]*string, n)
	for i, o := range batch {
		ids[i], epochs[i], states[i], errs[i] = o.task.ID, int32(o.task.Epoch), string(o.state), o.err
		if r := o.task.takeResult(); r != nil {
			s := string(r)
			results[i] = &s
		}
	}
	rows, err := c.pool.Query(ctx, c.q.finish, worker, ids, epochs, states, errs, results)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	done := make(map[int64]bool, n)
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		done[id] = true
	}
	return done, rows.Err()
}

// ListFilter selects tasks for [Client.List]. Zero fields match everything.
type ListFilter struct {
	State    State  // only tasks in this state
	Name     string // only tasks with this name
	Resource string // only tasks naming this resource, in either mode
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
	case "", StateWaiting, StateRunning, StateCanceling, StateCompleted, StateFailed, StateCanceled:
	default:
		return nil, 0, inputErr("state", "unknown state %q", f.State)
	}
	if err := c.checkSchema(ctx); err != nil {
		return nil, 0, err
	}
	rows, err := c.pool.Query(ctx, c.q.list, f.After, string(f.State), f.Name, f.Resource, f.Limit+1)
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
