// Package fleet keeps the workers table: registration, heartbeats and the
// cleanup of workers that went missing.
//
// Every worker sends a heartbeat (the database clock) every TTL/3 from its
// own goroutine. Cleanup is leaderless and runs about once per period
// across the fleet: every worker asks on its heartbeat, and the one that
// finds the last cleanup (the maintenance row 'cleanup') at least a period
// old and wins a transaction-scoped try-lock does it. The caller's period
// is a fifth of its TTL, under its heartbeat period, so a lone worker
// cleans up on each heartbeat. A cleanup removes workers missed for their
// own TTL, fails their running tasks with "worker lost", and ends their
// canceling tasks as canceled. A worker is therefore declared gone within
// one TTL plus about one heartbeat period (two, when a late heartbeat makes
// the next one fall inside the period).
//
// A worker that was declared gone but is still alive (a paused process) sees
// its row missing at its next heartbeat; the caller then cancels its handlers
// (their tasks are already final) and reinstates the row.
package fleet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DB is what the store runs its statements on: a pool, or the worker's own
// connection.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	Begin(ctx context.Context) (pgx.Tx, error)
}

// Store works on one schema's workers table.
type Store struct {
	pool   DB
	schema string
	q      string // quoted schema
	regKey int64  // serialises registrations
	gcKey  int64  // elects the cleaner
}

// New returns a store for schema. regKey and gcKey are advisory-lock keys
// private to the schema.
func New(pool DB, schema string, regKey, gcKey int64) *Store {
	return &Store{pool: pool, schema: schema, q: pgx.Identifier{schema}.Sanitize(), regKey: regKey, gcKey: gcKey}
}

// Worker describes a worker instance.
type Worker struct {
	Name    string
	Host    string
	PID     int
	Locker  string
	Handles []string // task names it has handlers for
	Slots   int      // handlers it runs at once
}

// ErrKindMismatch: live workers use another kind of locker.
var ErrKindMismatch = errors.New("live workers use another kind of locker")

// ErrNameInUse: a live worker already has the name.
var ErrNameInUse = errors.New("a live worker already has this name")

// Register adds w and returns its id. It refuses while live workers use
// another locker kind, or while a live worker has the same name, unless
// that worker is a crashed earlier instance of this one (same host, its
// process gone or the same pid, as after a container restart): then that
// instance is taken over, which means cleaned up now (its running tasks
// fail "worker lost") rather than after its TTL. taken returns the ids of
// taken-over instances, so their locks can be freed.
func (s *Store) Register(ctx context.Context, w Worker, ttl time.Duration) (id int64, taken []int64, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", s.regKey); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT id, name, host, pid, locker FROM `+s.q+`.workers w
			WHERE `+Live+` AND (locker <> $1 OR name = $2)`,
			w.Locker, w.Name)
		if err != nil {
			return err
		}
		type live struct {
			id         int64
			name, host string
			pid        int
			locker     string
		}
		var lives []live
		for rows.Next() {
			var l live
			if err := rows.Scan(&l.id, &l.name, &l.host, &l.pid, &l.locker); err != nil {
				return err
			}
			lives = append(lives, l)
		}
		if err := rows.Err(); err != nil {
			return err
		}
		for _, l := range lives {
			if l.locker != w.Locker {
				return fmt.Errorf("%w: worker %q uses %q, this one %q", ErrKindMismatch, l.name, l.locker, w.Locker)
			}
		}
		for _, l := range lives {
			if l.host != w.Host || (l.pid != w.PID && processAlive(l.pid)) {
				return fmt.Errorf("%w: %q (id %d, host %s, pid %d)", ErrNameInUse, l.name, l.id, l.host, l.pid)
			}
			taken = append(taken, l.id)
		}
		if len(taken) > 0 {
			if _, err := reap(ctx, tx, s.q, taken); err != nil {
				return err
			}
		}
		return tx.QueryRow(ctx, `INSERT INTO `+s.q+`.workers (name, host, pid, locker, handles, slots, ttl_ms)
			VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id`, w.Name, w.Host, w.PID, w.Locker, w.Handles,
			w.Slots, ttl.Milliseconds()).Scan(&id)
	})
	return id, taken, err
}

// processAlive reports whether a process with pid exists on this host.
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	p, err := os.FindProcess(pid)
	if err != nil {
		return false
	}
	err = p.Signal(syscall.Signal(0))
	return err == nil || errors.Is(err, syscall.EPERM)
}

// Beat is one heartbeat's answer.
type Beat struct {
	Present bool        // false: cleanup removed this worker; reinstate it
	Live    int64       // live workers in the fleet
	Owned   []OwnedTask // this worker's running and canceling tasks
}

// OwnedTask is a task the database says a worker runs.
type OwnedTask struct {
	ID        int64
	Epoch     int32
	Canceling bool // its cancel was requested
}

// Beat records a heartbeat for id.
func (s *Store) Beat(ctx context.Context, id int64) (Beat, error) {
	var b Beat
	row := s.pool.QueryRow(ctx, `WITH hb AS (
			UPDATE `+s.q+`.workers SET heartbeat_at = now() WHERE id = $1 RETURNING id
		)
		SELECT EXISTS (SELECT 1 FROM hb),
		       (SELECT count(*) FROM `+s.q+`.workers w WHERE `+Live+`),
		       coalesce(array_agg(t.id), '{}'), coalesce(array_agg(t.epoch), '{}'),
		       coalesce(array_agg(t.state = 'canceling'), '{}')
		FROM (SELECT id, epoch, state FROM `+s.q+`.tasks
		      WHERE worker_id = $1 AND state IN ('running', 'canceling')) t`,
		id)
	var ids []int64
	var epochs []int32
	var canceling []bool
	if err := row.Scan(&b.Present, &b.Live, &ids, &epochs, &canceling); err != nil {
		return b, err
	}
	for i := range ids {
		b.Owned = append(b.Owned, OwnedTask{ID: ids[i], Epoch: epochs[i], Canceling: canceling[i]})
	}
	b.Live = max(b.Live, 1)
	return b, nil
}

// Reinstate puts back the row of a worker that cleanup removed while it was
// alive (paused). Its id stays the same; every claim has its own epoch, so
// nothing it wrote before can be confused with what it writes after.
func (s *Store) Reinstate(ctx context.Context, id int64, w Worker, ttl time.Duration) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO `+s.q+`.workers (id, name, host, pid, locker, handles, slots, ttl_ms)
		OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING`,
		id, w.Name, w.Host, w.PID, w.Locker, w.Handles, w.Slots, ttl.Milliseconds())
	return err
}

// Unhandled is a task name that has ready tasks and no live worker that
// handles it.
type Unhandled struct {
	Name   string
	Oldest time.Time // dispatch time of its oldest ready task
	Tasks  int       // of the oldest ready tasks looked at
}

// Unhandled returns the names among the oldest 1,000 ready tasks that no
// live worker (a heartbeat within its own TTL) handles, and that have waited longer
// than age. A task nobody handles stays ready, and so it is among the
// oldest; reading only those keeps this cheap however long the backlog.
func (s *Store) Unhandled(ctx context.Context, age time.Duration) ([]Unhandled, error) {
	rows, err := s.pool.Query(ctx, `SELECT t.name, min(t.created_at), count(*)
		  FROM (SELECT name, created_at FROM `+s.q+`.tasks
		         WHERE state = 'waiting' AND blockers = 0 ORDER BY id LIMIT 1000) t
		 WHERE NOT EXISTS (SELECT 1 FROM `+s.q+`.workers w
		                    WHERE t.name = ANY (w.handles) AND `+Live+`)
		 GROUP BY t.name
		HAVING min(t.created_at) < now() - $1::interval
		 ORDER BY 2`, age.String())
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Unhandled
	for rows.Next() {
		var u Unhandled
		if err := rows.Scan(&u.Name, &u.Oldest, &u.Tasks); err != nil {
			return nil, err
		}
		out = append(out, u)
	}
	return out, rows.Err()
}

// Retire removes a stopping worker's row.
func (s *Store) Retire(ctx context.Context, id int64) error {
	_, err := s.pool.Exec(ctx, `DELETE FROM `+s.q+`.workers WHERE id = $1`, id)
	return err
}

// Reaped is what a cleanup did.
type Reaped struct {
	Won      bool    // this call did the cleanup (it won the election)
	Workers  []int64 // removed worker ids
	Failed   int     // running tasks failed "worker lost"
	Canceled int     // canceling tasks ended canceled
	Requeued int     // running tasks put back in line (their retry policy says so)
	Ready    int     // waiting tasks that became ready as the settled ones left their lines
}

// Live is the condition on a workers row, aliased w, for a live worker: a
// heartbeat within the worker's own TTL.
const Live = `w.heartbeat_at > now() - w.ttl_ms * interval '1 ms'`

// ClaimPeriodSQL marks a fleet job in the maintenance table (schema version
// 6) as run now if its last run is at least $2 ms ago (or it never ran),
// and returns a row only then: of several workers asking in one period,
// exactly one gets it.
func ClaimPeriodSQL(q string) string {
	return `INSERT INTO ` + q + `.maintenance AS m (job, last_run) VALUES ($1, now())
		ON CONFLICT (job) DO UPDATE SET last_run = now()
		 WHERE ` + periodDue + `
		RETURNING true`
}

// periodDue is the condition on a maintenance row, aliased m, whose job is
// due: its last run at least $2 ms ago.
const periodDue = `m.last_run <= now() - $2 * interval '1 ms'`

// cleanupJob is the cleanup's row in the maintenance table.
const cleanupJob = "cleanup"

// Cleanup removes workers missed for their own TTL (workers.ttl_ms: a
// fleet may mix TTLs, and a worker must not be judged by a shorter one
// than it heartbeats for) and settles their tasks, and
// settles running tasks whose worker row is gone. It runs once per every
// across the fleet, not once per worker: every worker asks on each of its
// heartbeats, and in a fleet of 80 that was 8 cleanups a second, each
// reading every running task. It does nothing (and returns a zero Reaped)
// when another worker is cleaning up right now or did within every.
func (s *Store) Cleanup(ctx context.Context, every time.Duration) (Reaped, error) {
	var r Reaped
	// Most asks fall within the period: one read answers them, without a
	// transaction; the one that goes on checks again under the lock.
	var due bool
	err := s.pool.QueryRow(ctx, `SELECT coalesce((SELECT `+periodDue+`
		FROM `+s.q+`.maintenance m WHERE m.job = $1), true)`, cleanupJob, every.Milliseconds()).Scan(&due)
	if err != nil || !due {
		return r, err
	}
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var won bool
		if err := tx.QueryRow(ctx, "SELECT pg_try_advisory_xact_lock($1)", s.gcKey).Scan(&won); err != nil || !won {
			return err
		}
		err := tx.QueryRow(ctx, ClaimPeriodSQL(s.q), cleanupJob, every.Milliseconds()).Scan(&won)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil // cleaned up within the period
		}
		if err != nil {
			return err
		}
		r.Won = true
		rows, err := tx.Query(ctx, `DELETE FROM `+s.q+`.workers w WHERE NOT (`+Live+`) RETURNING id`)
		if err != nil {
			return err
		}
		r.Workers, err = pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return err
		}
		r2, err := reap(ctx, tx, s.q, nil)
		r.Failed, r.Canceled, r.Ready, r.Requeued = r2.Failed, r2.Canceled, r2.Ready, r2.Requeued
		return err
	})
	return r, err
}

// reap settles the running and canceling tasks of the given workers, or,
// with ids nil, of every worker that has no row, and the immediate tasks
// (no worker) whose lease ran out: their caller did not finish them by
// their deadline plus a TTL, so it is taken to be gone. A running task
// whose retry policy (tasks.retry, see the root package's RetryPolicy) says
// "interrupted" goes back in line instead (state retrying, due now), with
// its line entries kept; the others fail "worker lost", and the attempt is
// logged either way.
func reap(ctx context.Context, tx pgx.Tx, q string, ids []int64) (Reaped, error) {
	var r Reaped
	cond := `(t.worker_id IS NULL AND coalesce(t.lease_until, '-infinity') < now()
	          OR t.worker_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM ` + q + `.workers w WHERE w.id = t.worker_id))`
	args := []any{}
	if ids != nil {
		cond = `t.worker_id = ANY($1)`
		args = append(args, ids)
	}
	var settled []int64
	err := tx.QueryRow(ctx, `WITH settled AS (
			UPDATE `+q+`.tasks t
			SET state = CASE WHEN t.state = 'canceling' THEN 'canceled'
			                 WHEN coalesce((t.retry ->> 'interrupted')::boolean, false) THEN 'retrying'
			                 ELSE 'failed' END,
			    error = CASE WHEN t.state = 'canceling' THEN t.error
			                 WHEN t.worker_id IS NULL THEN 'worker lost: the caller of the immediate task did not finish it by its deadline'
			                 ELSE 'worker lost' END,
			    finished_at = CASE WHEN t.state = 'running' AND coalesce((t.retry ->> 'interrupted')::boolean, false)
			                       THEN NULL ELSE clock_timestamp() END,
			    run_at = CASE WHEN t.state = 'running' AND coalesce((t.retry ->> 'interrupted')::boolean, false)
			                  THEN clock_timestamp() ELSE t.run_at END,
			    lease_until = NULL,
			    attempt_log = CASE WHEN t.state = 'running'
			                       THEN t.attempt_log || jsonb_build_object('attempt', t.attempt, 'started_at', t.started_at,
			                                                                'finished_at', clock_timestamp(), 'error', 'worker lost')
			                       ELSE t.attempt_log END
			WHERE t.state IN ('running', 'canceling') AND `+cond+`
			RETURNING t.id, t.state
		)
		SELECT count(*) FILTER (WHERE state = 'failed'), count(*) FILTER (WHERE state = 'canceled'),
		       count(*) FILTER (WHERE state = 'retrying'),
		       coalesce(array_agg(id) FILTER (WHERE state <> 'retrying'), '{}') FROM settled`,
		args...).Scan(&r.Failed, &r.Canceled, &r.Requeued, &settled)
	if err != nil || len(settled) == 0 {
		return r, err
	}
	// Final tasks leave their waiting lines; the next in line may be ready.
	var ready []int64
	err = tx.QueryRow(ctx, `SELECT `+q+`.settle($1, 0)`, settled).Scan(&ready)
	r.Ready = len(ready)
	return r, err
}
