-- tasking schema version 8: steps settle only tasks that have resources.
-- {{schema}} is the quoted schema name.
--
-- The step as in version 6 (with version 7's enable_bitmapscan = off), except
-- that the tasks it finishes without any resource are not passed to settle.
-- They have no line entries, so settle found nothing to delete and nothing
-- to hand on, but each call still cost two plpgsql calls and a statement:
-- about 60 microseconds of database time per step, a noticeable share of a
-- step of a few no-op tasks in a small worker process (CHANGELOG).

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
