-- tasking schema version 8: what a step and a dispatch cost. {{schema}} is the quoted
-- schema name, {{seed}} a 64-bit number derived from it.
--
-- 1. The step (as in version 6, with version 7's enable_bitmapscan = off)
--    no longer passes the tasks it finishes without any resource to
--    settle. They have no line entries, so settle found nothing to delete
--    and nothing to hand on, but each call still cost two plpgsql calls and
--    a statement: about 60 microseconds of database time per step, a
--    noticeable share of a step of a few no-op tasks (CHANGELOG).
-- 2. settle and handoff take a lower bound per line. The entries of the
--    tasks that left a line stay in its indexes until a vacuum removes
--    them, at the head of the line, and every hand-off's scans started at
--    the head and stepped over all of them: with autovacuum off (or
--    lagging), a 50,000-task line drained at 86 % of the rate of a
--    1,000-task one. A task that ran held its exclusive entries at the
--    head of their lines (it could not run before), so when it leaves,
--    every entry left on such a line comes after it: the step says so
--    (p_ran), and the scans of that line start after the task's id. Other
--    callers (cancel of a waiting task, cleanup, immediate tasks) pass no
--    bound and scan from the head as before.
-- 3. dispatch (as in version 6) inserts a batch that names no resource
--    with a plain INSERT: there are no lines to judge or write, and the
--    statement that does that for a batch with resources cost about 50
--    microseconds even with nothing to do (a single no-op dispatch: 0.39
--    -> 0.33 ms from the client, pgbench).

DROP FUNCTION {{schema}}.settle(bigint[], integer);
DROP FUNCTION {{schema}}.handoff(text[], boolean[]);

CREATE FUNCTION {{schema}}.handoff(p_res text[], p_excl boolean[], p_after bigint[] DEFAULT NULL)
RETURNS bigint[]
LANGUAGE plpgsql
-- Every statement here touches a few rows through an index; the planner's
-- guesses for unnest() would make it hash whole tables instead.
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    r       text;
    x       boolean;
    a       bigint; -- v8
    locked  text[] := '{}';
    lafter  bigint[] := '{}'; -- v8: locked's lower bounds
    shared  text[] := '{}';
    later   text[] := '{}';
    freed   bigint[] := '{}';
    ready   bigint[];
BEGIN
    IF p_res IS NULL OR p_res = '{}' THEN
        RETURN '{}';
    END IF;
    IF NOT {{schema}}.lock_line({{seed}}, false) THEN
        later := p_res;
    ELSE
        FOR r, x, a IN SELECT u.r, bool_or(u.x), coalesce(max(u.a), 0)
                         FROM unnest(p_res, p_excl, coalesce(p_after, '{}')) AS u(r, x, a)
                        GROUP BY u.r ORDER BY {{schema}}.rkey(u.r) LOOP
            IF NOT {{schema}}.lock_line({{schema}}.rkey(r), x) THEN
                later := later || r;
            ELSIF x THEN
                locked := locked || r;
                lafter := lafter || a; -- v8
            ELSE
                shared := shared || r;
            END IF;
        END LOOP;
        FOR r IN SELECT u FROM unnest(shared) u
                  WHERE EXISTS (SELECT 1 FROM {{schema}}.lines l WHERE l.resource = u AND l.excl)
                  ORDER BY {{schema}}.rkey2(u) LOOP
            IF {{schema}}.lock_line({{schema}}.rkey2(r), true) THEN
                locked := locked || r;
                lafter := lafter || 0::bigint; -- v8
            ELSE
                later := later || r;
            END IF;
        END LOOP;
    END IF;
    IF later <> '{}' THEN
        INSERT INTO {{schema}}.handoffs (resource) SELECT unnest(later);
    END IF;
    IF locked = '{}' THEN
        RETURN '{}';
    END IF;
    -- On a line without an exclusive entry every blocked entry is free.
    -- Otherwise the blocked entries up to X are found by a range scan that
    -- stops at X, so a long line behind X is never read.
    -- v8: every scan starts after the line's lower bound (a, 0 for none),
    -- past the entries of the tasks that already left the head of a busy
    -- line: until a vacuum removes them, their index entries stay, and a
    -- scan from the start of the line would step over all of them.
    WITH heads AS MATERIALIZED (
        SELECT h.r, h.x, h.a,
               (SELECT l.task FROM {{schema}}.lines l WHERE l.resource = h.r AND l.task > h.a ORDER BY l.task LIMIT 1) AS head
          FROM (SELECT u.r, u.a, (SELECT l.task FROM {{schema}}.lines l WHERE l.resource = u.r AND l.excl AND l.task > u.a
                                   ORDER BY l.task LIMIT 1) AS x
                  FROM unnest(locked, lafter) AS u(r, a)) h
    ), before_x AS (
        UPDATE {{schema}}.lines l SET blocked = false
          FROM heads
         WHERE heads.x IS NOT NULL AND l.resource = heads.r AND l.blocked AND l.task > heads.a AND l.task <= heads.x
           AND (l.task < heads.x OR heads.head = heads.x)
        RETURNING l.task
    ), no_x AS (
        UPDATE {{schema}}.lines l SET blocked = false
          FROM heads
         WHERE heads.x IS NULL AND l.resource = heads.r AND l.blocked AND l.task > heads.a
        RETURNING l.task
    )
    SELECT coalesce(array_agg(f.task), '{}') INTO freed
      FROM (SELECT task FROM before_x UNION ALL SELECT task FROM no_x) f;
    IF freed = '{}' THEN
        RETURN '{}';
    END IF;
    IF array_length(freed, 1) > 1 THEN
        -- Row locks in id order: two handoffs freeing the same tasks must
        -- not deadlock.
        PERFORM 1 FROM {{schema}}.tasks t WHERE t.id = ANY (freed) ORDER BY t.id FOR UPDATE;
    END IF;
    WITH d AS (
        UPDATE {{schema}}.tasks t SET blockers = t.blockers - c.n
          FROM (SELECT f AS id, count(*) AS n FROM unnest(freed) f GROUP BY f) c
         WHERE t.id = c.id
        RETURNING t.id, t.blockers, t.state
    )
    SELECT coalesce(array_agg(d.id), '{}') INTO ready FROM d WHERE d.blockers = 0 AND d.state = 'waiting';
    RETURN ready;
END
$$;

CREATE FUNCTION {{schema}}.settle(p_ids bigint[], p_pending integer, p_ran boolean DEFAULT false)
RETURNS bigint[]
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    res  text[];
    excl boolean[];
    aft  bigint[]; -- v8
    more text[] := '{}';
BEGIN
    WITH e AS MATERIALIZED (
        SELECT r AS resource, t.id AS task FROM {{schema}}.tasks t, unnest(t.exclusive || t.shared) r
         WHERE t.id = ANY (p_ids)
    ), d AS (
        DELETE FROM {{schema}}.lines l
         USING e
         WHERE l.resource = e.resource AND l.task = e.task
        RETURNING l.resource, l.excl, l.task
    )
    -- v8: an exclusive entry of a task that ran was the head of its line
    -- (it could not run before), so every entry left on that line comes
    -- after it: its id bounds the hand-off's scans from below.
    SELECT coalesce(array_agg(d.resource), '{}'), coalesce(array_agg(d.excl), '{}'),
           coalesce(array_agg(CASE WHEN p_ran AND d.excl THEN d.task ELSE 0 END), '{}')
      INTO res, excl, aft FROM d;
    IF p_pending > 0 THEN
        WITH p AS (
            DELETE FROM {{schema}}.handoffs h
             WHERE h.ctid = ANY (ARRAY(SELECT ctid FROM {{schema}}.handoffs ORDER BY resource
                                        LIMIT p_pending FOR UPDATE SKIP LOCKED))
            RETURNING h.resource
        )
        SELECT coalesce(array_agg(DISTINCT p.resource), '{}') INTO more FROM p;
    END IF;
    RETURN {{schema}}.handoff(res || more, excl || array_fill(true, ARRAY[cardinality(more)]),
                              aft || array_fill(0::bigint, ARRAY[cardinality(more)]));
END
$$;

CREATE OR REPLACE FUNCTION {{schema}}.step(
    p_worker bigint, p_ids bigint[], p_epochs integer[], p_states text[], p_errors text[],
    p_results jsonb[], p_names text[], p_free integer, p_fresh_ms bigint, p_locks boolean,
    p_progress jsonb[], p_delays bigint[], p_policies jsonb)
RETURNS TABLE (kind "char", id bigint, name text, args jsonb, exclusive text[], shared text[],
               epoch integer, created_at timestamptz, started_at timestamptz, timeout_ms bigint,
               attempt integer, retry jsonb, unique_key text, run_at timestamptz)
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
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
            RETURNING t.id, t.state, t.exclusive <> '{}' OR t.shared <> '{}' AS lined -- v8
        )
        SELECT coalesce(array_agg(u.id), '{}'), coalesce(array_agg(u.id) FILTER (WHERE u.state <> 'retrying' AND u.lined), '{}')
          INTO done, final FROM u;
    END IF;
    IF EXISTS (SELECT 1 FROM {{schema}}.handoffs ORDER BY resource LIMIT 1) THEN
        pending := 16;
    END IF;
    -- v8: final holds only tasks with resources: a task without any is on
    -- no line, and settling it found nothing to delete or hand on.
    IF final <> '{}' OR pending > 0 THEN -- v6: final, not done
        ready := {{schema}}.settle(final, pending, true); -- v8: the tasks ran
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

CREATE OR REPLACE FUNCTION {{schema}}.dispatch(
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
    -- v8: no resources in the batch: no lines to judge or write.
    IF nres = 0 THEN
        RETURN QUERY
        WITH specs AS (
            SELECT nextval('{{schema}}.task_seq') AS id, u.n, u.a, u.tm, nullif(u.uk, '') AS uk, u.rt, u.ra
              FROM unnest(p_names, p_args, p_timeouts, p_unique, p_retry, p_run_at) WITH ORDINALITY AS u(n, a, tm, uk, rt, ra, o)
             WHERE u.o <> ALL (skip)
             ORDER BY u.o
        )
        INSERT INTO {{schema}}.tasks AS t (id, name, args, timeout_ms, unique_key, retry, state, run_at)
        SELECT s.id, s.n, s.a, nullif(s.tm, 0), s.uk, s.rt,
               CASE WHEN s.ra > now() THEN 'scheduled' ELSE 'waiting' END, s.ra
          FROM specs s
        RETURNING t.id, t.created_at, true, NULL::integer;
        IF p_channel <> '' THEN
            PERFORM pg_notify(p_channel, 'd');
        END IF;
        RETURN;
    END IF;
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
