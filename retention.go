package tasking

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Final tasks stay in the tasks table until they are purged, by
// [Client.Purge] or by the fleet's automatic retention ([WithRetention]).
// Both delete in small batches, each its own short transaction, oldest
// finish first through an index on the finish time: a purge never holds a
// lock that a dispatch or a worker's step waits for (final tasks have left
// their lines, and rows another transaction holds are skipped).

// PurgeFilter selects the final tasks [Client.Purge] deletes.
type PurgeFilter struct {
	// Before: only tasks that became final before this time. Required.
	Before time.Time
	// States: only tasks in these final states. Default: all three
	// (completed, failed, canceled).
	States []State
	// BatchSize is how many tasks one transaction deletes. Default 1,000,
	// at most 10,000.
	BatchSize int
}

const defaultPurgeBatch = 1000

// Purge deletes final tasks that match f, in batches of f.BatchSize, each in
// its own short transaction, and returns how many it deleted. Waiting and
// running tasks are never touched. When ctx ends it stops between batches
// and returns the number deleted so far with ctx's error. [Client.Get] and
// [Client.Wait] on a purged task return [ErrNotFound] (a Wait already in
// progress keeps waiting until its ctx ends), so purge only what nobody
// waits for any more.
func (c *Client) Purge(ctx context.Context, f PurgeFilter) (int64, error) {
	if f.Before.IsZero() {
		return 0, inputErr("purge filter", "Before is required")
	}
	if f.BatchSize == 0 {
		f.BatchSize = defaultPurgeBatch
	}
	if f.BatchSize < 0 || f.BatchSize > 10000 {
		return 0, inputErr("batch size", "%d, need 1 to 10000", f.BatchSize)
	}
	states := make([]string, 0, 3)
	for _, s := range f.States {
		if !s.Final() {
			return 0, inputErr("purge filter", "state %q is not final", s)
		}
		states = append(states, string(s))
	}
	if len(states) == 0 {
		states = []string{string(StateCompleted), string(StateFailed), string(StateCanceled)}
	}
	if err := c.checkSchema(ctx); err != nil {
		return 0, err
	}
	var total int64
	for {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		var n int64
		if err := c.pool.QueryRow(ctx, c.q.purge, states, f.Before, f.BatchSize).Scan(&n); err != nil {
			return total, fmt.Errorf("tasking: purge: %w", err)
		}
		total += n
		if n < int64(f.BatchSize) {
			return total, nil
		}
	}
}

// purgeSQL deletes up to $3 final tasks in states $1 finished before $2,
// oldest first. The fixed state list matches the finish-time index.
func purgeSQL(s string) string {
	return `WITH d AS (
		DELETE FROM ` + s + `.tasks WHERE id = ANY (ARRAY(
			SELECT id FROM ` + s + `.tasks
			 WHERE state IN ('completed', 'failed', 'canceled') AND state = ANY ($1) AND finished_at < $2
			 ORDER BY finished_at LIMIT $3 FOR UPDATE SKIP LOCKED))
		RETURNING 1)
		SELECT count(*) FROM d`
}

// Retention says how long the fleet keeps final tasks, per state; see
// [WithRetention]. A zero duration keeps the tasks of that state for ever.
type Retention struct {
	Completed time.Duration
	Failed    time.Duration
	Canceled  time.Duration
	// Every is how often the fleet purges. Default: 10 minutes.
	Every time.Duration
}

// defaultRetentionEvery is Retention.Every's default.
const defaultRetentionEvery = 10 * time.Minute

// WithRetention makes the fleet delete final tasks older than the given
// durations, per final state (see [Client.Purge]). It runs once per
// rt.Every across the whole fleet, not once per worker: the worker that
// wins the cleanup of dead workers (design.md §8) runs it when the last run,
// stored in the database, is at least rt.Every ago. The purge runs in the
// background on the client's pool, in batches, so heartbeats and steps are
// not delayed. Give every worker the same retention: whichever worker's turn
// it is applies its own. Default: none (final tasks are kept for ever).
func WithRetention(rt Retention) WorkerOption {
	return func(c *workerConfig) { c.retention = &rt }
}

func (rt *Retention) validate() error {
	for _, d := range []time.Duration{rt.Completed, rt.Failed, rt.Canceled, rt.Every} {
		if d < 0 {
			return inputErr("retention", "negative duration %v", d)
		}
	}
	return nil
}

// retainJob is the retention's row in the maintenance table.
const retainJob = "retention"

// retain runs the retention if it is this fleet's turn. It is called by the
// worker that won the cleanup; the purge runs in the background, one at a
// time per worker, until done or ctx ends.
func (r *run) retain(ctx context.Context) {
	rt := r.w.cfg.retention
	if rt == nil || !r.retaining.CompareAndSwap(false, true) {
		return
	}
	every := rt.Every
	if every == 0 {
		every = defaultRetentionEvery
	}
	var due bool
	err := r.conn.QueryRow(ctx, r.c.q.claimPeriod, retainJob, every.Milliseconds()).Scan(&due)
	if err != nil {
		r.retaining.Store(false)
		if !errors.Is(err, pgx.ErrNoRows) && ctx.Err() == nil {
			r.log.Warn("tasking: retention: read last run", "err", err)
		}
		return
	}
	r.retainW.Add(1)
	go func() {
		defer r.retainW.Done()
		defer r.retaining.Store(false)
		now := time.Now()
		var total int64
		for _, p := range []struct {
			s State
			d time.Duration
		}{{StateCompleted, rt.Completed}, {StateFailed, rt.Failed}, {StateCanceled, rt.Canceled}} {
			if p.d == 0 {
				continue
			}
			n, err := r.c.Purge(ctx, PurgeFilter{Before: now.Add(-p.d), States: []State{p.s}})
			total += n
			if err != nil {
				if ctx.Err() == nil {
					r.log.Warn("tasking: retention: purge", "state", p.s, "err", err)
				}
				return
			}
		}
		if total > 0 {
			r.log.Info("tasking: retention purged final tasks", "tasks", total)
		}
	}()
}
