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
    -- Claim only while this worker's heartbeat is fresh: cleanup declares a
    -- worker lost after a TTL without one, and p_fresh_ms (two thirds of
    -- it) leaves the worker that much time to start what it claims before
    -- cleanup could fail those tasks under it.
    IF p_free > 0 AND EXISTS (SELECT 1 FROM {{schema}}.workers w
                               WHERE w.id = p_worker AND w.heartbeat_at > now() - p_fresh_ms * interval '1 ms') THEN
        RETURN QUERY
        UPDATE {{schema}}.tasks t
           SET state = 'running', worker_id = p_worker, epoch = t.epoch + 1, started_at = clock_timestamp()
         WHERE t.id = ANY (ARRAY(
                SELECT c.id FROM {{schema}}.tasks c
                 WHERE c.state = 'waiting' AND c.blockers = 0 AND c.name = ANY (p_names)
                   AND (p_locks OR c.exclusive = '{}' AND c.shared = '{}')
                 ORDER BY c.id LIMIT p_free FOR UPDATE SKIP LOCKED))
        RETURNING 'c'::"char", t.id, t.name, t.args, t.exclusive, t.shared, t.epoch, t.created_at,
                  t.started_at, coalesce(t.timeout_ms, 0);
    END IF;
    n_left := (SELECT count(*) FROM unnest(ready) r
              WHERE NOT EXISTS (SELECT 1 FROM {{schema}}.tasks t
                                 WHERE t.id = r AND t.worker_id = p_worker AND t.state = 'running'));
    RETURN QUERY SELECT 's'::"char", n_left::bigint, NULL::text, NULL::jsonb, NULL::text[], NULL::text[],
                        (EXISTS (SELECT 1 FROM {{schema}}.handoffs ORDER BY resource LIMIT 1))::integer,
                        NULL::timestamptz, NULL::timestamptz, NULL::bigint;
END
$$;

