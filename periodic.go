package tasking

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/robfig/cron/v3"
)

// Periodic tasks. Every worker that registers a schedule ([WithPeriodic])
// wakes up at each period's start and tries to dispatch the period's task;
// the one whose transaction moves the schedule's last period forward (in
// the periodic table) dispatches it in that same transaction, the others
// find the period taken. So each period is dispatched exactly once across
// the fleet, whichever workers run, with no leader to lose.

// Schedule says when a periodic task is due. Next returns the start of the
// first period after t. Workers must agree on it: [Every] and [Cron]
// depend on nothing but t.
type Schedule interface {
	Next(t time.Time) time.Time
}

// Every is a schedule of fixed intervals, aligned on multiples of d since
// the zero time (so every worker computes the same periods: Every(time.Hour)
// fires on the hour). d is at least 1s.
func Every(d time.Duration) Schedule { return every(d) }

type every time.Duration

func (e every) Next(t time.Time) time.Time {
	d := time.Duration(e)
	return t.Truncate(d).Add(d)
}

// Cron parses a standard cron expression (five fields: minute, hour, day of
// month, month, day of week; or a descriptor such as "@hourly" or
// "@every 10m"), evaluated in UTC unless it starts with "CRON_TZ=Zone ".
func Cron(expr string) (Schedule, error) {
	s, err := cron.ParseStandard(expr)
	if err != nil {
		return nil, inputErr("cron expression", "%q: %v", expr, err)
	}
	return utcCron{s}, nil
}

type utcCron struct{ s cron.Schedule }

func (c utcCron) Next(t time.Time) time.Time { return c.s.Next(t.UTC()) }

// periodic is one registered schedule.
type periodic struct {
	name  string
	sched Schedule
	spec  TaskSpec
}

// WithPeriodic registers a periodic task on the worker: at the start of
// each period of s, the task spec describes is dispatched, once across all
// the workers that register the same name (register it on as many as you
// like, with the same schedule and spec). The dispatched task's unique key
// is "tasking/periodic/<name>/<period start, RFC 3339 in UTC>", so it says
// which period it is for.
//
// Periods missed while no worker with the schedule ran are coalesced: a
// worker that starts and finds that periods went by since the last one
// dispatched dispatches one task, for the latest missed period, at once,
// and then follows the schedule. A schedule never dispatched before starts
// with its next period. Default: none.
func WithPeriodic(name string, s Schedule, spec TaskSpec) WorkerOption {
	return func(c *workerConfig) { c.periodic = append(c.periodic, periodic{name, s, spec}) }
}

func (p *periodic) check() error {
	if err := checkName("periodic name", p.name, MaxTaskNameLen); err != nil {
		return err
	}
	if p.sched == nil {
		return inputErr("schedule", "nil for periodic %q", p.name)
	}
	if e, ok := p.sched.(every); ok && time.Duration(e) < time.Second {
		return inputErr("schedule", "Every(%v) for periodic %q: at least 1s", time.Duration(e), p.name)
	}
	if p.spec.Unique != "" || p.spec.uniqueSet {
		return inputErr("periodic task", "%q: a periodic task's unique key is its period's", p.name)
	}
	_, err := prepareBatch([]TaskSpec{p.spec})
	return err
}

func checkPeriodic(ps []periodic) error {
	seen := map[string]bool{}
	for i := range ps {
		if err := ps[i].check(); err != nil {
			return err
		}
		if seen[ps[i].name] {
			return inputErr("periodic name", "%q registered twice", ps[i].name)
		}
		seen[ps[i].name] = true
	}
	return nil
}

// maxCatchUp bounds the walk over missed periods; past it, the period
// dispatched for them is the last one the walk reached.
const maxCatchUp = 100000

// periodicLoop runs one schedule until ctx ends.
func (r *run) periodicLoop(ctx context.Context, p periodic) {
	// The first look catches up with missed periods.
	period, err := r.missedPeriod(ctx, p)
	for ctx.Err() == nil {
		if err == nil && !period.IsZero() {
			err = r.dispatchPeriod(ctx, p, period)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			r.log.Warn("tasking: periodic task", "name", p.name, "err", err)
			sleepCtx(ctx, jitter(time.Second)) // then try the same period again
			continue
		}
		period = p.sched.Next(time.Now())
		if period.IsZero() {
			return // a schedule with no more periods
		}
		sleepCtx(ctx, time.Until(period))
	}
}

// missedPeriod returns the latest period that started after the last one
// dispatched and is already past, or zero.
func (r *run) missedPeriod(ctx context.Context, p periodic) (time.Time, error) {
	var last time.Time
	err := r.c.pool.QueryRow(ctx, r.c.q.lastPeriod, p.name).Scan(&last)
	if errors.Is(err, pgx.ErrNoRows) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, err
	}
	var missed time.Time
	now := time.Now()
	for i, next := 0, p.sched.Next(last); i < maxCatchUp && !next.IsZero() && !next.After(now); i++ {
		missed, next = next, p.sched.Next(next)
	}
	return missed, nil
}

// dispatchPeriod dispatches the task of one period unless another worker
// did.
func (r *run) dispatchPeriod(ctx context.Context, p periodic, period time.Time) error {
	spec := p.spec
	spec.Unique = "tasking/periodic/" + p.name + "/" + period.UTC().Format(time.RFC3339Nano)
	return pgx.BeginFunc(ctx, r.c.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, r.c.q.claimPeriodic, p.name, period)
		if err != nil || tag.RowsAffected() == 0 {
			return err // another worker dispatched it
		}
		if _, err := r.c.DispatchManyTx(ctx, tx, spec); err != nil {
			return fmt.Errorf("dispatch: %w", err)
		}
		return nil
	})
}

func periodicSQL(s string) (last, claim string) {
	return `SELECT last_period FROM ` + s + `.periodic WHERE name = $1`,
		`INSERT INTO ` + s + `.periodic AS p (name, last_period) VALUES ($1, $2)
		ON CONFLICT (name) DO UPDATE SET last_period = $2 WHERE p.last_period < $2`
}
