-- tasking schema version 9: chains. {{schema}} is the quoted schema name.
--
-- The step (as in version 8) takes p_chain: besides the ready tasks it
-- claims, it claims up to that many tasks queued behind them on their
-- lines, each blocked only by the one before it (see the comment in the
-- function). They come back as rows of kind 'n', and the worker starts
-- each as the one before it returns, with one locker call and no step:
-- a line of short tasks on one resource no longer costs a statement and
-- commit per hand-off (docs/design.md §6, "Chains").

DROP FUNCTION {{schema}}.step(bigint, bigint[], integer[], text[], text[], jsonb[], text[], integer, bigint, boolean, jsonb[], bigint[], jsonb);

CREATE FUNCTION {{schema}}.step(
    p_worker bigint, p_ids bigint[], p_epochs integer[], p_states text[], p_errors text[],
    p_results jsonb[], p_names text[], p_free integer, p_fresh_ms bigint, p_locks boolean,
    p_progress jsonb[], p_delays bigint[], p_policies jsonb, p_chain integer)
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
    chain   bigint[] := '{}'; -- v9
    heads   bigint[] := '{}';
    head_res text[] := '{}';
    c_id    bigint;
    c_res   text;
    nxt     bigint;
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
        IF p_chain > 0 AND p_locks THEN
            -- v9: with the heads of possible chains, read in the same pass
            -- (in no particular order: the order only shares out p_chain).
            SELECT coalesce(array_agg(c.id), '{}'),
                   coalesce(array_agg(c.id) FILTER (WHERE cardinality(c.exclusive) = 1 AND c.shared = '{}'), '{}'),
                   coalesce(array_agg(c.exclusive[1]) FILTER (WHERE cardinality(c.exclusive) = 1 AND c.shared = '{}'), '{}')
              INTO claimed, heads, head_res
              FROM (SELECT c.id, c.exclusive, c.shared FROM {{schema}}.tasks c
                     WHERE c.state = 'waiting' AND c.blockers = 0 AND c.name = ANY (p_names)
                     ORDER BY c.id LIMIT p_free FOR UPDATE SKIP LOCKED) c;
        ELSE
            claimed := ARRAY(
                    SELECT c.id FROM {{schema}}.tasks c
                     WHERE c.state = 'waiting' AND c.blockers = 0 AND c.name = ANY (p_names)
                       AND (p_locks OR c.exclusive = '{}' AND c.shared = '{}')
                     ORDER BY c.id LIMIT p_free FOR UPDATE SKIP LOCKED);
        END IF;
        -- v9: chains. Behind a claimed task that names one resource,
        -- exclusively, the tasks next in its line that name only that
        -- resource, exclusively, are blocked by it alone: each becomes
        -- ready exactly when the one before it finishes. Up to p_chain of
        -- them (all lines together) are claimed with it, stopping at the
        -- first entry that is not such a task, so none is passed over; the
        -- worker starts each as the one before it returns, without a step
        -- (docs/design.md §6, "Chains").
        IF heads <> '{}' THEN
            FOR c_id, c_res IN SELECT u.id, u.r FROM unnest(heads, head_res) AS u(id, r) LOOP
                EXIT WHEN cardinality(chain) >= p_chain;
                FOR nxt IN SELECT l.task FROM {{schema}}.lines l
                            WHERE l.resource = c_res AND l.task > c_id
                            ORDER BY l.task LIMIT p_chain - cardinality(chain) LOOP
                    PERFORM 1 FROM {{schema}}.tasks t
                     WHERE t.id = nxt AND t.state = 'waiting' AND t.blockers = 1
                       AND t.exclusive = ARRAY[c_res] AND t.shared = '{}' AND t.name = ANY (p_names)
                       FOR UPDATE SKIP LOCKED;
                    EXIT WHEN NOT FOUND;
                    chain := chain || nxt;
                END LOOP;
            END LOOP;
        END IF;
        RETURN QUERY
        UPDATE {{schema}}.tasks t
           SET state = 'running', worker_id = p_worker, epoch = t.epoch + 1, started_at = clock_timestamp(),
               attempt = t.attempt + 1, retry = coalesce(t.retry, p_policies -> t.name) -- v6
         WHERE t.id = ANY (claimed || chain) -- v9: and chain
        RETURNING CASE WHEN t.id = ANY (chain) THEN 'n' ELSE 'c' END::"char", t.id, t.name, t.args, t.exclusive, t.shared, t.epoch, t.created_at,
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


-- pass writes the final state of p_id, a task that ran with an exclusive
-- grant on its one resource, takes it off that line and hands the line to
-- p_next, the task claimed behind it (p_next_epoch), and stamps p_next's
-- start: the hand-off of a chain, without a step (docs/design.md §6,
-- "Chains"). The final state is written as step writes it (p_state is
-- completed or failed; a canceling task ends canceled). Returns the state
-- of p_next if the hand-off happened and p_next is still this worker's
-- (running or canceling), NULL if p_id was no longer this worker's to
-- finish (nothing written), and '' if p_id was written but p_next is no
-- longer this worker's.
CREATE FUNCTION {{schema}}.pass(
    p_worker bigint, p_id bigint, p_epoch integer, p_state text, p_error text, p_result jsonb,
    p_progress jsonb, p_next bigint, p_next_epoch integer)
RETURNS text
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    res  text;
    nst  text;
BEGIN
    UPDATE {{schema}}.tasks t
       SET state = CASE WHEN t.state = 'canceling' THEN 'canceled' ELSE p_state END,
           finished_at = clock_timestamp(),
           error = nullif(p_error, ''), result = p_result,
           progress = coalesce(p_progress, t.progress),
           attempt_log = CASE WHEN p_error <> '' AND t.state <> 'canceling'
                              THEN t.attempt_log || jsonb_build_object('attempt', t.attempt, 'started_at', t.started_at,
                                                                       'finished_at', clock_timestamp(), 'error', p_error)
                              ELSE t.attempt_log END
     WHERE t.id = p_id AND t.worker_id = p_worker AND t.epoch = p_epoch AND t.state IN ('running', 'canceling')
    RETURNING t.exclusive[1] INTO res;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    DELETE FROM {{schema}}.lines l WHERE l.resource = res AND l.task = p_id;
    -- p_next is next in line and exclusive: its entry was blocked by p_id
    -- alone, and is the only one to unblock.
    UPDATE {{schema}}.lines l SET blocked = false WHERE l.resource = res AND l.task = p_next AND l.blocked;
    IF FOUND THEN
        UPDATE {{schema}}.tasks t SET blockers = t.blockers - 1 WHERE t.id = p_next;
    END IF;
    UPDATE {{schema}}.tasks t SET started_at = clock_timestamp()
     WHERE t.id = p_next AND t.worker_id = p_worker AND t.epoch = p_next_epoch AND t.state IN ('running', 'canceling')
    RETURNING t.state INTO nst;
    RETURN coalesce(nst, '');
END
$$;

-- settle (as in version 8) bounds a line's scan by a finished task's id
-- only when its exclusive entry was unblocked, that is at the head of the
-- line. A task claimed in a chain that ends without running (canceled
-- while it waited behind the task before it) finishes in a step like the
-- tasks that ran, but its entry was still blocked, behind a task that may
-- still run: bounded by its id, the scan would have freed the entry after
-- it, and that task would have run beside the one still at the head.

CREATE OR REPLACE FUNCTION {{schema}}.settle(p_ids bigint[], p_pending integer, p_ran boolean DEFAULT false)
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
        RETURNING l.resource, l.excl, l.task, l.blocked -- v9: blocked
    )
    -- v8: an exclusive entry of a task that ran was the head of its line
    -- (it could not run before), so every entry left on that line comes
    -- after it: its id bounds the hand-off's scans from below.
    SELECT coalesce(array_agg(d.resource), '{}'), coalesce(array_agg(d.excl), '{}'),
           coalesce(array_agg(CASE WHEN p_ran AND d.excl AND NOT d.blocked THEN d.task ELSE 0 END), '{}')
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
