-- tasking schema version 6: time and retention. {{schema}} is the quoted
-- schema name, {{seed}} a 64-bit number derived from it.
--
-- Unique dispatch: a task may carry a unique key, and a dispatch with a key
-- that a task yet to run already has (waiting, scheduled, or waiting for a
-- retry) returns that task instead of adding one.

ALTER TABLE {{schema}}.tasks ADD COLUMN unique_key text COLLATE "C";

-- Retries that keep their place. A failed attempt with attempts left puts
-- the task in state 'retrying' until run_at: it is not final, so its line
-- entries stay and later conflicting tasks keep waiting behind it, and it
-- is not waiting, so it is not in tasks_ready_idx. The step moves due
-- retries back to waiting (tasks_due_idx: one probe when none is due);
-- with no blockers (it was ready when it ran) it is ready at once.
-- attempt counts the claims that ran (a claim put back does not count),
-- attempt_log keeps every failed attempt, retry is the task's own policy.
--
-- Scheduled tasks: a task dispatched with a run_at in the future is in
-- state 'scheduled' until then, and the step moves it to waiting like a due
-- retry. It takes its place in line at dispatch (its id), like any task:
-- later conflicting tasks wait behind it until it has run. Its blockers are
-- counted as for any task, so once waiting it is ready when they are gone.
ALTER TABLE {{schema}}.tasks DROP CONSTRAINT tasks_state_check;
ALTER TABLE {{schema}}.tasks ADD CONSTRAINT tasks_state_check
    CHECK (state IN ('waiting', 'scheduled', 'retrying', 'running', 'canceling', 'completed', 'failed', 'canceled'));
ALTER TABLE {{schema}}.tasks ADD COLUMN attempt integer NOT NULL DEFAULT 0,
                             ADD COLUMN attempt_log jsonb NOT NULL DEFAULT '[]',
                             ADD COLUMN run_at timestamptz,
                             ADD COLUMN retry jsonb;
CREATE INDEX tasks_due_idx ON {{schema}}.tasks (run_at) WHERE state IN ('scheduled', 'retrying');

-- The waiting task with a given key. Not a unique index: a claimed task whose
-- locks were refused goes back to waiting (design.md §6), and must not fail
-- because a task with its key was dispatched meanwhile. Dispatches with one
-- key are serialised by the key's advisory lock (ukey) instead.
CREATE INDEX tasks_unique_idx ON {{schema}}.tasks (unique_key)
    WHERE state IN ('waiting', 'scheduled', 'retrying') AND unique_key IS NOT NULL;

-- ukey is the advisory-lock key that serialises dispatches with one unique key.
CREATE FUNCTION {{schema}}.ukey(k text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT hashtextextended(k, {{seed}} + 2) $$;

DROP FUNCTION {{schema}}.dispatch(text[], jsonb[], jsonb, jsonb, bigint[], text);
DROP FUNCTION {{schema}}.step(bigint, bigint[], integer[], text[], text[], jsonb[], text[], integer, bigint, boolean, jsonb[]);
-- (step gains p_delays, the backoffs of failed attempts to retry, and
-- p_policies, the worker's handlers' retry policies by name, stored on the
-- tasks it claims that have none of their own.)

-- dispatch as in version 2, plus p_run_at (NULL, or a time before which the
-- task must not start), p_retry (each task's own retry policy, NULL
-- for none) and p_unique: one unique key per task ('' for
-- none; the caller has already folded duplicates within the batch). Before
-- anything else it takes the keys' advisory locks, in key order, and looks
-- for a waiting task with each key: a task whose key has one is not inserted
-- and gets no line entries; a row (that task's id, existing = its position
-- in the batch, 1-based) says so. Rows of inserted tasks have existing NULL.
CREATE FUNCTION {{schema}}.dispatch(
    p_names text[], p_args jsonb[], p_excl jsonb, p_shared jsonb, p_timeouts bigint[], p_channel text,
    p_unique text[] DEFAULT NULL, p_retry jsonb[] DEFAULT NULL, p_run_at timestamptz[] DEFAULT NULL)
RETURNS TABLE (id bigint, created_at timestamptz, ready boolean, existing integer)
LANGUAGE plpgsql
-- Planned once per session: its statements are long to plan, and the same
-- plan serves one task or thousands.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    k    record;
    nres integer;
    -- v6: unique keys
    uk   text;
    skip integer[] := '{}';
    sids bigint[] := '{}';
BEGIN
    -- v6: unique keys. Locks before the resource locks, in key order, so
    -- dispatches never deadlock on them; the look-up runs after the locks,
    -- so it sees every task a dispatch with the same key committed.
    IF p_unique IS NOT NULL AND EXISTS (SELECT 1 FROM unnest(p_unique) u WHERE u <> '') THEN
        FOR uk IN SELECT DISTINCT u FROM unnest(p_unique) u WHERE u <> '' ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock({{schema}}.ukey(uk));
        END LOOP;
        SELECT coalesce(array_agg(u.o::int ORDER BY u.o), '{}'), coalesce(array_agg(e.id ORDER BY u.o), '{}')
          INTO skip, sids
          FROM unnest(p_unique) WITH ORDINALITY AS u(k, o)
          CROSS JOIN LATERAL (SELECT t.id FROM {{schema}}.tasks t
                               WHERE t.unique_key = u.k AND t.state IN ('waiting', 'scheduled', 'retrying')
                               ORDER BY t.id LIMIT 1) e
         WHERE u.k <> '';
    END IF;
    SELECT count(DISTINCT r) INTO nres
      FROM jsonb_array_elements(p_excl || p_shared) a, jsonb_array_elements_text(a) r;
    IF nres > 64 THEN
        PERFORM pg_advisory_xact_lock({{seed}});
    ELSIF nres > 0 THEN
        PERFORM pg_advisory_xact_lock_shared({{seed}});
        FOR k IN
            SELECT {{schema}}.rkey(r) AS key, bool_or(x) AS x
              FROM (SELECT r, true AS x FROM jsonb_array_elements(p_excl) a, jsonb_array_elements_text(a) r
                    UNION ALL
                    SELECT r, false FROM jsonb_array_elements(p_shared) a, jsonb_array_elements_text(a) r) u
             GROUP BY 1 ORDER BY 1
        LOOP
            IF k.x THEN
                PERFORM pg_advisory_xact_lock(k.key);
            ELSE
                PERFORM pg_advisory_xact_lock_shared(k.key);
            END IF;
        END LOOP;
    END IF;
    -- v6: the tasks that were already waiting.
    RETURN QUERY SELECT s.id, t.created_at, false, s.o
                   FROM unnest(sids, skip) AS s(id, o) JOIN {{schema}}.tasks t ON t.id = s.id;
    -- Ids in batch order (volatile functions are evaluated after ORDER BY).
    -- An entry is blocked by what its line already holds (the lines as they
    -- were before this statement) or by an earlier entry of the batch.
    RETURN QUERY
    WITH specs AS (
        SELECT nextval('{{schema}}.task_seq') AS id, u.n, u.a, u.tm,
               ARRAY(SELECT jsonb_array_elements_text(p_excl -> (u.o::int - 1))) AS ex,
               ARRAY(SELECT jsonb_array_elements_text(p_shared -> (u.o::int - 1))) AS sh,
               nullif(u.uk, '') AS uk, u.rt, u.ra -- v6
          FROM unnest(p_names, p_args, p_timeouts, p_unique, p_retry, p_run_at) WITH ORDINALITY AS u(n, a, tm, uk, rt, ra, o)
         WHERE u.o <> ALL (skip) -- v6
         ORDER BY u.o
    ), entries AS (
        SELECT e.id, e.r, e.x FROM (
            SELECT s.id, r, true AS x FROM specs s, unnest(s.ex) r
            UNION ALL
            SELECT s.id, r, false FROM specs s, unnest(s.sh) r) e
    ), judged AS (
        SELECT e.id, e.r, e.x,
               CASE WHEN e.x THEN
                        row_number() OVER w > 1
                        -- Scalar subqueries with LIMIT 1: one index probe
                        -- per entry, never a pass over all lines.
                        OR coalesce((SELECT true FROM {{schema}}.lines l WHERE l.resource = e.r LIMIT 1), false)
                    ELSE
                        coalesce(count(*) FILTER (WHERE e.x) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) > 0
                        OR coalesce((SELECT true FROM {{schema}}.lines l WHERE l.resource = e.r AND l.excl LIMIT 1), false)
               END AS blocked
          FROM entries e
        WINDOW w AS (PARTITION BY e.r ORDER BY e.id)
    ), ins_lines AS (
        INSERT INTO {{schema}}.lines (resource, task, excl, blocked)
        SELECT j.r, j.id, j.x, j.blocked FROM judged j
    )
    INSERT INTO {{schema}}.tasks AS t (id, name, args, exclusive, shared, timeout_ms, blockers, unique_key, retry,
                                        state, run_at)
    SELECT s.id, s.n, s.a, s.ex, s.sh, nullif(s.tm, 0), coalesce(b.n, 0), s.uk, s.rt,
           CASE WHEN s.ra > now() THEN 'scheduled' ELSE 'waiting' END, s.ra
      FROM specs s
      LEFT JOIN (SELECT j.id, count(*) FILTER (WHERE j.blocked) AS n FROM judged j GROUP BY j.id) b ON b.id = s.id
    -- v6: ready also when a scheduled task was added: workers should look
    -- (a step tells them when it is due).
    RETURNING t.id, t.created_at, t.blockers = 0 OR t.state = 'scheduled', NULL::integer;
    IF p_channel <> '' THEN
        PERFORM pg_notify(p_channel, 'd');
    END IF;
END
$$;

-- Retention: final tasks by finish time, for Client.Purge and the fleet's
-- automatic retention, which deletes them in small batches oldest first.
CREATE INDEX tasks_finished_idx ON {{schema}}.tasks (finished_at)
    WHERE state IN ('completed', 'failed', 'canceled');

-- When the fleet last ran each periodic job of its own (e.g. 'retention'),
-- so that it runs once per period whichever worker wins the cleanup.
CREATE TABLE {{schema}}.maintenance (
    job      text PRIMARY KEY,
    last_run timestamptz NOT NULL
);

CREATE FUNCTION {{schema}}.step(
    p_worker bigint, p_ids bigint[], p_epochs integer[], p_states text[], p_errors text[],
    p_results jsonb[], p_names text[], p_free integer, p_fresh_ms bigint, p_locks boolean,
    p_progress jsonb[], p_delays bigint[], p_policies jsonb)
RETURNS TABLE (kind "char", id bigint, name text, args jsonb, exclusive text[], shared text[],
               epoch integer, created_at timestamptz, started_at timestamptz, timeout_ms bigint,
               attempt integer, retry jsonb, unique_key text, run_at timestamptz)
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    done    bigint[] := '{}';
    ready   bigint[] := '{}';
    claimed bigint[] := '{}';
    pending integer := 0;
    n_left  integer;
    final   bigint[] := '{}'; -- v6
BEGIN
    IF coalesce(array_length(p_ids, 1), 0) > 0 THEN
        -- v6: state 'retrying' (with p_delays) is a failed attempt to
        -- retry; every failed attempt is logged.
        WITH u AS (
            UPDATE {{schema}}.tasks t
               SET state = CASE WHEN t.state = 'canceling' THEN 'canceled' ELSE v.state END,
                   finished_at = CASE WHEN v.state = 'retrying' AND t.state <> 'canceling' THEN NULL ELSE clock_timestamp() END,
                   error = nullif(v.error, ''), result = v.result,
                   progress = coalesce(v.progress, t.progress),  -- v4
                   run_at = CASE WHEN v.state = 'retrying' THEN clock_timestamp() + v.delay * interval '1 ms' ELSE t.run_at END,
                   attempt_log = CASE WHEN v.error <> '' AND t.state <> 'canceling'
                                      THEN t.attempt_log || jsonb_build_object('attempt', t.attempt, 'started_at', t.started_at,
                                                                               'finished_at', clock_timestamp(), 'error', v.error)
                                      ELSE t.attempt_log END
              FROM unnest(p_ids, p_epochs, p_states, p_errors, p_results, p_delays, p_progress)
                   AS v(id, epoch, state, error, result, delay, progress)
             WHERE t.id = v.id AND t.worker_id IS NOT DISTINCT FROM p_worker AND t.epoch = v.epoch
               AND t.state IN ('running', 'canceling')
            RETURNING t.id, t.state
        )
        SELECT coalesce(array_agg(u.id), '{}'), coalesce(array_agg(u.id) FILTER (WHERE u.state <> 'retrying'), '{}')
          INTO done, final FROM u;
    END IF;
    IF EXISTS (SELECT 1 FROM {{schema}}.handoffs ORDER BY resource LIMIT 1) THEN
        pending := 16;
    END IF;
    IF final <> '{}' OR pending > 0 THEN -- v6: final, not done
        ready := {{schema}}.settle(final, pending);
    END IF;
    -- v6: due retries and scheduled tasks go back to waiting (see
    -- tasks_due_idx): ready unless a scheduled one is still blocked.
    WITH p AS (
        UPDATE {{schema}}.tasks t SET state = 'waiting'
         WHERE t.id = ANY (ARRAY(SELECT r.id FROM {{schema}}.tasks r
                                  WHERE r.state IN ('scheduled', 'retrying') AND r.run_at <= clock_timestamp()
                                  ORDER BY r.run_at LIMIT 64 FOR UPDATE SKIP LOCKED))
        RETURNING t.id, t.blockers
    )
    SELECT ready || coalesce(array_agg(p.id) FILTER (WHERE p.blockers = 0), '{}') INTO ready FROM p;
    RETURN QUERY SELECT 'f'::"char", d, NULL::text, NULL::jsonb, NULL::text[], NULL::text[],
                        NULL::integer, NULL::timestamptz, NULL::timestamptz, NULL::bigint, NULL::integer, NULL::jsonb,
                        NULL::text, NULL::timestamptz
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
           SET state = 'running', worker_id = p_worker, epoch = t.epoch + 1, started_at = clock_timestamp(),
               attempt = t.attempt + 1, retry = coalesce(t.retry, p_policies -> t.name) -- v6
         WHERE t.id = ANY (claimed)
        RETURNING 'c'::"char", t.id, t.name, t.args, t.exclusive, t.shared, t.epoch, t.created_at,
                  t.started_at, coalesce(t.timeout_ms, 0), t.attempt, t.retry, t.unique_key, t.run_at; -- v6
    END IF;
    -- Counted from the arrays, not by looking the tasks up again: a lookup
    -- by worker would read every entry the worker's index has collected
    -- since the last vacuum.
    n_left := (SELECT count(*) FROM unnest(ready) r WHERE r <> ALL (claimed));
    -- v6: created_at is the time the next retry or scheduled task is due
    -- (NULL: none), so the worker can wake up for it.
    RETURN QUERY SELECT 's'::"char", n_left::bigint, NULL::text, NULL::jsonb, NULL::text[], NULL::text[],
                        (EXISTS (SELECT 1 FROM {{schema}}.handoffs ORDER BY resource LIMIT 1))::integer,
                        (SELECT r.run_at FROM {{schema}}.tasks r WHERE r.state IN ('scheduled', 'retrying') ORDER BY r.run_at LIMIT 1),
                        NULL::timestamptz, NULL::bigint, NULL::integer, NULL::jsonb, NULL::text, NULL::timestamptz;
END
$$;

-- cancel as in version 2; a scheduled task, or one waiting for a retry, is
-- canceled at once too.
CREATE OR REPLACE FUNCTION {{schema}}.cancel(p_id bigint, p_channel text)
RETURNS TABLE (state text, ready integer)
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    n  integer := 0;
BEGIN
    UPDATE {{schema}}.tasks t
       SET state = CASE WHEN t.state IN ('waiting', 'scheduled', 'retrying') THEN 'canceled' ELSE 'canceling' END, -- v6
           finished_at = CASE WHEN t.state IN ('waiting', 'scheduled', 'retrying') THEN clock_timestamp() END
     WHERE t.id = p_id AND t.state IN ('waiting', 'scheduled', 'retrying', 'running')
    RETURNING t.state INTO st;
    IF st = 'canceled' THEN
        n := coalesce(array_length({{schema}}.settle(ARRAY[p_id], 0), 1), 0);
        IF n > 0 AND p_channel <> '' THEN
            PERFORM pg_notify(p_channel, 'r');
        END IF;
    ELSIF st = 'canceling' AND p_channel <> '' THEN
        PERFORM pg_notify(p_channel, 'c' || p_id);
    END IF;
    state := st;
    ready := n;
    RETURN NEXT;
END
$$;

-- Periodic tasks: the last period of each schedule that was dispatched. A
-- worker dispatches a period's task in the same transaction as it moves
-- last_period forward (only if it is earlier), so each period is
-- dispatched once across the fleet, with no leader.
CREATE TABLE {{schema}}.periodic (
    name        text PRIMARY KEY,
    last_period timestamptz NOT NULL
);

-- Version 4's group functions, with the states added here: a group is not
-- done while a task in it is scheduled or waiting for a retry, and a group's
-- cancel cancels those too.
DROP INDEX {{schema}}.tasks_group_open_idx;
CREATE INDEX tasks_group_open_idx ON {{schema}}.tasks (group_id)
    WHERE group_id IS NOT NULL AND state IN ('waiting', 'scheduled', 'retrying', 'running', 'canceling');

CREATE OR REPLACE FUNCTION {{schema}}.cancel_group(p_group bigint, p_channel text)
RETURNS TABLE (id bigint, state text, ready integer)
LANGUAGE plpgsql AS $$
DECLARE
    t bigint;
    c record;
BEGIN
    UPDATE {{schema}}.groups g SET canceled = true, all_dispatched = true WHERE g.id = p_group;
    FOR t IN SELECT x.id FROM {{schema}}.tasks x
              WHERE x.group_id = p_group AND x.state IN ('waiting', 'scheduled', 'retrying', 'running') ORDER BY x.id LOOP
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

-- dispatch_related as in version 4, passing unique keys, retry policies and
-- start times on to dispatch. A task that dispatch did not insert (its
-- unique key was taken: existing is its position in the batch) comes back
-- as it is, with its own parent and group.
DROP FUNCTION {{schema}}.dispatch_related(text[], jsonb[], jsonb, jsonb, bigint[], text, bigint, bigint[]);
CREATE FUNCTION {{schema}}.dispatch_related(
    p_names text[], p_args jsonb[], p_excl jsonb, p_shared jsonb, p_timeouts bigint[], p_channel text,
    p_parent bigint, p_groups bigint[],
    p_unique text[] DEFAULT NULL, p_retry jsonb[] DEFAULT NULL, p_run_at timestamptz[] DEFAULT NULL)
RETURNS TABLE (id bigint, created_at timestamptz, ready boolean, existing integer, group_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    pgroup bigint;
    plive  boolean := false;
    gs     bigint[];
    g      record;
    ids    bigint[];
    cr     timestamptz[];
    rd     boolean[];
    eids   bigint[];
    ecr    timestamptz[];
    epos   integer[];
    pos    integer[];
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
    -- Inserted tasks come in batch order (ids in order), skipping the
    -- positions of tasks that were there already.
    SELECT array_agg(d.id ORDER BY d.id) FILTER (WHERE d.existing IS NULL),
           array_agg(d.created_at ORDER BY d.id) FILTER (WHERE d.existing IS NULL),
           array_agg(d.ready ORDER BY d.id) FILTER (WHERE d.existing IS NULL),
           array_agg(d.id) FILTER (WHERE d.existing IS NOT NULL),
           array_agg(d.created_at) FILTER (WHERE d.existing IS NOT NULL),
           array_agg(d.existing) FILTER (WHERE d.existing IS NOT NULL)
      INTO ids, cr, rd, eids, ecr, epos
      FROM {{schema}}.dispatch(p_names, p_args, p_excl, p_shared, p_timeouts, p_channel, p_unique, p_retry, p_run_at) d;
    pos := ARRAY(SELECT o::integer FROM generate_series(1, cardinality(p_names)) o
                  WHERE o <> ALL (coalesce(epos, '{}')) ORDER BY o);
    UPDATE {{schema}}.tasks t SET parent_id = nullif(p_parent, 0), group_id = gs[u.o]
      FROM unnest(ids, pos) AS u(id, o)
     WHERE t.id = u.id;
    RETURN QUERY SELECT u.id, u.cr, u.rd, NULL::integer, gs[u.o] FROM unnest(ids, cr, rd, pos) AS u(id, cr, rd, o)
                 WHERE u.id IS NOT NULL;
    RETURN QUERY SELECT u.id, u.cr, false, u.o, t.group_id
                   FROM unnest(eids, ecr, epos) AS u(id, cr, o) JOIN {{schema}}.tasks t ON t.id = u.id;
END
$$;
