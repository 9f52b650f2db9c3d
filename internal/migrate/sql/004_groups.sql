-- tasking schema version 4: progress reports, parent and child tasks, task
-- groups. {{schema}} is the quoted schema name.
--
-- Functions of version 2 that change are dropped and created again here;
-- every change is marked "-- v4:".

-- Progress reports of a task, as a JSON array of {name, message, done,
-- total, state}: written while it runs (coalesced by its worker, guarded by
-- worker and epoch) and, for the last time, with its final state by step.
ALTER TABLE {{schema}}.tasks ADD COLUMN progress jsonb;

DROP FUNCTION {{schema}}.step(bigint, bigint[], integer[], text[], text[], jsonb[], text[], integer, bigint, boolean);

-- v4: step also writes the finished tasks' last progress reports (p_progress,
-- NULL for a task without any), with their final states.
-- step is one round trip of a worker: it writes the final states of the
-- tasks its handlers finished (guarded by worker and epoch; a canceling task
-- ends canceled), settles them, and claims up to p_free ready tasks with
-- names it handles, oldest first (only tasks that need no locks when
-- p_locks is false: the worker's locker is out of reach). SKIP LOCKED lets workers claim side by
-- side without waiting for each other. Rows: 'f' for each task it finished,
-- 'c' for each task it claimed, and one 's' row whose id is the number of
-- tasks that became ready and were not claimed here (other workers may want
-- a wake-up, which the worker sends after the commit) and whose epoch is 1
-- when handoffs are left for later.
CREATE FUNCTION {{schema}}.step(
    p_worker bigint, p_ids bigint[], p_epochs integer[], p_states text[], p_errors text[],
    p_results jsonb[], p_names text[], p_free integer, p_fresh_ms bigint, p_locks boolean,
    p_progress jsonb[])  -- v4: the last progress reports of the finished tasks
RETURNS TABLE (kind "char", id bigint, name text, args jsonb, exclusive text[], shared text[],
               epoch integer, created_at timestamptz, started_at timestamptz, timeout_ms bigint)
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    done    bigint[] := '{}';
    ready   bigint[] := '{}';
    claimed bigint[] := '{}';
    pending integer := 0;
    n_left  integer;
BEGIN
    IF coalesce(array_length(p_ids, 1), 0) > 0 THEN
        WITH u AS (
            UPDATE {{schema}}.tasks t
               SET state = CASE WHEN t.state = 'canceling' THEN 'canceled' ELSE v.state END,
                   finished_at = clock_timestamp(), error = nullif(v.error, ''), result = v.result,
                   progress = coalesce(v.progress, t.progress)  -- v4
              FROM unnest(p_ids, p_epochs, p_states, p_errors, p_results, p_progress)  -- v4: p_progress
                   AS v(id, epoch, state, error, result, progress)
             WHERE t.id = v.id AND t.worker_id IS NOT DISTINCT FROM p_worker AND t.epoch = v.epoch
               AND t.state IN ('running', 'canceling')
            RETURNING t.id
        )
        SELECT coalesce(array_agg(u.id), '{}') INTO done FROM u;
    END IF;
    IF EXISTS (SELECT 1 FROM {{schema}}.handoffs ORDER BY resource LIMIT 1) THEN
        pending := 16;
    END IF;
    IF done <> '{}' OR pending > 0 THEN
        ready := {{schema}}.settle(done, pending);
    END IF;
    RETURN QUERY SELECT 'f'::"char", d, NULL::text, NULL::jsonb, NULL::text[], NULL::text[],
                        NULL::integer, NULL::timestamptz, NULL::timestamptz, NULL::bigint
                   FROM unnest(done) d;
    -- A step is a heartbeat too: a busy worker whose heartbeat statement
    -- is late (a loaded machine, the connection busy with steps) stays
    -- alive while it steps. Refreshed once it is half of p_fresh_ms old
    -- (a third of the TTL), and only while still fresh: a worker that
    -- already went stale is left to its heartbeat and to cleanup.
    UPDATE {{schema}}.workers w SET heartbeat_at = now()
     WHERE w.id = p_worker AND w.heartbeat_at < now() - p_fresh_ms * interval '500 us'
       AND w.heartbeat_at > now() - p_fresh_ms * interval '1 ms';
    -- Claim only while this worker's heartbeat is fresh: cleanup declares a
    -- worker lost after a TTL without one, and p_fresh_ms (two thirds of
    -- it) leaves the worker that much time to start what it claims before
    -- cleanup could fail those tasks under it.
    IF p_free > 0 AND EXISTS (SELECT 1 FROM {{schema}}.workers w
                               WHERE w.id = p_worker AND w.heartbeat_at > now() - p_fresh_ms * interval '1 ms') THEN
        claimed := ARRAY(
                SELECT c.id FROM {{schema}}.tasks c
                 WHERE c.state = 'waiting' AND c.blockers = 0 AND c.name = ANY (p_names)
                   AND (p_locks OR c.exclusive = '{}' AND c.shared = '{}')
                 ORDER BY c.id LIMIT p_free FOR UPDATE SKIP LOCKED);
        RETURN QUERY
        UPDATE {{schema}}.tasks t
           SET state = 'running', worker_id = p_worker, epoch = t.epoch + 1, started_at = clock_timestamp()
         WHERE t.id = ANY (claimed)
        RETURNING 'c'::"char", t.id, t.name, t.args, t.exclusive, t.shared, t.epoch, t.created_at,
                  t.started_at, coalesce(t.timeout_ms, 0);
    END IF;
    -- Counted from the arrays, not by looking the tasks up again: a lookup
    -- by worker would read every entry the worker's index has collected
    -- since the last vacuum.
    n_left := (SELECT count(*) FROM unnest(ready) r WHERE r <> ALL (claimed));
    RETURN QUERY SELECT 's'::"char", n_left::bigint, NULL::text, NULL::jsonb, NULL::text[], NULL::text[],
                        (EXISTS (SELECT 1 FROM {{schema}}.handoffs ORDER BY resource LIMIT 1))::integer,
                        NULL::timestamptz, NULL::timestamptz, NULL::bigint;
END
$$;

-- Parent and child tasks, task groups. A task dispatched from inside a
-- running handler records that task as its parent; a task may belong to a
-- group. Both are set by dispatch_related in the dispatching transaction, so
-- a task is never visible without them.
ALTER TABLE {{schema}}.tasks ADD COLUMN parent_id bigint, ADD COLUMN group_id bigint;
CREATE INDEX tasks_parent_idx ON {{schema}}.tasks (parent_id, id) WHERE parent_id IS NOT NULL;
CREATE INDEX tasks_group_idx ON {{schema}}.tasks (group_id, id) WHERE group_id IS NOT NULL;
-- A group's tasks that are not final: is the group done?
CREATE INDEX tasks_group_open_idx ON {{schema}}.tasks (group_id)
    WHERE group_id IS NOT NULL AND state IN ('waiting', 'running', 'canceling');

-- A group is done when all_dispatched is set and every task in it is final.
-- Cancelling a group sets canceled (and all_dispatched: nothing more may
-- join it).
CREATE TABLE {{schema}}.groups (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT now(),
    all_dispatched boolean     NOT NULL DEFAULT false,
    canceled       boolean     NOT NULL DEFAULT false
);

-- dispatch_related is dispatch for tasks with a parent or a group; dispatch
-- itself is unchanged, and plain dispatches keep calling it. p_groups holds
-- one entry per task: 0 for the parent's group (none without a parent), -1
-- for none, else a group id. The groups named are locked FOR SHARE, in id
-- order, before dispatch takes its locks: a group's cancel (FOR UPDATE) and
-- its all-dispatched mark therefore come strictly before or after the
-- dispatch, never in between. A group that is canceled refuses tasks
-- (SQLSTATE TG002), and so does one marked all-dispatched (TG003), except for
-- the children of a task that is in it and not final: the group is not done
-- while their parent runs, so they belong to the work it stands for. An
-- unknown group is TG001, an unknown parent TG004.
CREATE FUNCTION {{schema}}.dispatch_related(
    p_names text[], p_args jsonb[], p_excl jsonb, p_shared jsonb, p_timeouts bigint[], p_channel text,
    p_parent bigint, p_groups bigint[])
RETURNS TABLE (id bigint, created_at timestamptz, ready boolean, group_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    pgroup bigint;
    plive  boolean := false;
    gs     bigint[];
    g      record;
    ids    bigint[];
    cr     timestamptz[];
    rd     boolean[];
BEGIN
    IF p_parent <> 0 THEN
        SELECT t.group_id, t.state NOT IN ('completed', 'failed', 'canceled') INTO pgroup, plive
          FROM {{schema}}.tasks t WHERE t.id = p_parent;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'tasking: parent task % not found', p_parent USING ERRCODE = 'TG004';
        END IF;
    END IF;
    gs := ARRAY(SELECT CASE WHEN x = 0 THEN pgroup WHEN x < 0 THEN NULL ELSE x END
                  FROM unnest(p_groups) WITH ORDINALITY AS u(x, o) ORDER BY o);
    FOR g IN SELECT gr.id, gr.all_dispatched, gr.canceled FROM {{schema}}.groups gr
              WHERE gr.id = ANY (gs) ORDER BY gr.id FOR SHARE LOOP
        IF g.canceled THEN
            RAISE EXCEPTION 'tasking: group % is canceled', g.id USING ERRCODE = 'TG002';
        ELSIF g.all_dispatched AND NOT (plive AND g.id = pgroup) THEN
            RAISE EXCEPTION 'tasking: group % is marked all dispatched', g.id USING ERRCODE = 'TG003';
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM unnest(gs) x WHERE x IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM {{schema}}.groups gr WHERE gr.id = x)) THEN
        RAISE EXCEPTION 'tasking: group % not found',
            (SELECT min(x) FROM unnest(gs) x WHERE NOT EXISTS (SELECT 1 FROM {{schema}}.groups gr WHERE gr.id = x))
            USING ERRCODE = 'TG001';
    END IF;
    -- Ids come in batch order.
    SELECT array_agg(d.id ORDER BY d.id), array_agg(d.created_at ORDER BY d.id), array_agg(d.ready ORDER BY d.id)
      INTO ids, cr, rd
      FROM {{schema}}.dispatch(p_names, p_args, p_excl, p_shared, p_timeouts, p_channel) d;
    UPDATE {{schema}}.tasks t SET parent_id = nullif(p_parent, 0), group_id = u.g
      FROM unnest(ids, gs) AS u(id, g)
     WHERE t.id = u.id;
    RETURN QUERY SELECT u.id, u.cr, u.rd, u.g FROM unnest(ids, cr, rd, gs) AS u(id, cr, rd, g);
END
$$;

-- cancel_group marks a group canceled and all dispatched, then cancels its
-- waiting and running tasks one by one, oldest first, with cancel: a waiting
-- task ends canceled at once and leaves its lines (settle), a running one
-- becomes canceling and its worker is told, exactly as for a single cancel.
-- The group's row lock waits for the dispatches into the group in flight,
-- and makes later ones fail: no task joins the group after the cancel. Rows:
-- one per task it changed, with cancel's result. A task being claimed at the
-- same time is either claimed first (and then made canceling) or canceled
-- while waiting (and the claim skips it): the row lock orders the two.
CREATE FUNCTION {{schema}}.cancel_group(p_group bigint, p_channel text)
RETURNS TABLE (id bigint, state text, ready integer)
LANGUAGE plpgsql AS $$
DECLARE
    t bigint;
    c record;
BEGIN
    UPDATE {{schema}}.groups g SET canceled = true, all_dispatched = true WHERE g.id = p_group;
    FOR t IN SELECT x.id FROM {{schema}}.tasks x
              WHERE x.group_id = p_group AND x.state IN ('waiting', 'running') ORDER BY x.id LOOP
        SELECT * INTO c FROM {{schema}}.cancel(t, p_channel);
        IF c.state IS NOT NULL THEN
            id := t;
            state := c.state;
            ready := c.ready;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- Immediate tasks: run by the caller, in its own process, when nothing
-- earlier conflicts. Such a task is dispatched like any other (it gets its
-- id and its line entries) and, when ready, claimed in the same
-- transaction: running, with no worker, and lease_until (its deadline plus
-- a TTL), after which the fleet's cleanup fails it as it fails the tasks of
-- a lost worker, so a caller that crashed does not hold the line for ever.
ALTER TABLE {{schema}}.tasks ADD COLUMN lease_until timestamptz;
-- Owners of the immediate runners' locker grants: -nextval, apart from the
-- workers' ids.
CREATE SEQUENCE {{schema}}.immediate_seq AS bigint;

-- dispatch_immediate dispatches one task (through dispatch_related when
-- p_related) and claims it when it is ready: running, no worker, a new
-- epoch, lease_until p_lease_ms from now. A task that is not ready is left
-- waiting for the workers when p_defer; otherwise it raises TG005 with, as
-- DETAIL, the JSON {"tasks": [...], "resources": [...]} of the earlier
-- tasks that are not final and conflict with it (at most 100), and the
-- failed statement takes the task back out.
CREATE FUNCTION {{schema}}.dispatch_immediate(
    p_names text[], p_args jsonb[], p_excl jsonb, p_shared jsonb, p_timeouts bigint[],
    p_related boolean, p_parent bigint, p_groups bigint[], p_lease_ms bigint, p_defer boolean)
RETURNS TABLE (id bigint, created_at timestamptz, group_id bigint, claimed boolean, epoch integer,
               started_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    d    record;
    ep   integer;
    st   timestamptz;
    info jsonb;
BEGIN
    IF p_related THEN
        SELECT r.id, r.created_at, r.ready, r.group_id INTO d
          FROM {{schema}}.dispatch_related(p_names, p_args, p_excl, p_shared, p_timeouts, '', p_parent, p_groups) r;
    ELSE
        SELECT r.id, r.created_at, r.ready, NULL::bigint AS group_id INTO d
          FROM {{schema}}.dispatch(p_names, p_args, p_excl, p_shared, p_timeouts, '') r;
    END IF;
    IF d.ready THEN
        UPDATE {{schema}}.tasks t
           SET state = 'running', worker_id = NULL, epoch = t.epoch + 1, started_at = clock_timestamp(),
               lease_until = clock_timestamp() + p_lease_ms * interval '1 ms'
         WHERE t.id = d.id
        RETURNING t.epoch, t.started_at INTO ep, st;
        RETURN QUERY SELECT d.id, d.created_at, d.group_id, true, ep, st;
        RETURN;
    END IF;
    IF p_defer THEN
        RETURN QUERY SELECT d.id, d.created_at, d.group_id, false, 0, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT jsonb_build_object('tasks', coalesce(jsonb_agg(DISTINCT b.task), '[]'),
                              'resources', coalesce(jsonb_agg(DISTINCT b.resource), '[]'))
      INTO info
      FROM (SELECT l.task, l.resource
              FROM {{schema}}.lines e
              JOIN {{schema}}.lines l ON l.resource = e.resource AND l.task < e.task AND (e.excl OR l.excl)
             WHERE e.task = d.id
             ORDER BY l.task LIMIT 100) b;
    RAISE EXCEPTION 'tasking: immediate task waits behind earlier tasks' USING ERRCODE = 'TG005', DETAIL = info::text;
END
$$;

-- finish_immediate writes the final state of an immediate task, guarded by
-- epoch and "no worker" (a task that cleanup failed meanwhile is not
-- touched; a canceling one ends canceled), and settles it as a worker's
-- step does. It notifies p_channel, when given, if tasks became ready.
CREATE FUNCTION {{schema}}.finish_immediate(
    p_id bigint, p_epoch integer, p_state text, p_error text, p_result jsonb, p_progress jsonb, p_channel text)
RETURNS TABLE (state text, finished_at timestamptz, ready integer)
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    ft timestamptz;
    n  integer := 0;
BEGIN
    UPDATE {{schema}}.tasks t
       SET state = CASE WHEN t.state = 'canceling' THEN 'canceled' ELSE p_state END,
           finished_at = clock_timestamp(), error = nullif(p_error, ''), result = p_result,
           progress = coalesce(p_progress, t.progress), lease_until = NULL
     WHERE t.id = p_id AND t.epoch = p_epoch AND t.worker_id IS NULL AND t.state IN ('running', 'canceling')
    RETURNING t.state, t.finished_at INTO st, ft;
    IF st IS NOT NULL THEN
        n := coalesce(array_length({{schema}}.settle(ARRAY[p_id], 0), 1), 0);
        IF n > 0 AND p_channel <> '' THEN
            PERFORM pg_notify(p_channel, 'r');
        END IF;
    END IF;
    state := st;
    finished_at := ft;
    ready := n;
    RETURN NEXT;
END
$$;
