-- cancel as in version 6, taking its locks in the order a worker's step
-- takes them: first the task's entries on its lines, then the task's row.
-- A step handing a line on unblocks the next entry (locking that entry) and
-- then updates the entry's task; a cancel that locked the task first and
-- then deleted the entry could wait on the step while the step waited on it,
-- a deadlock PostgreSQL only breaks after deadlock_timeout. The client still
-- runs a cancel again when PostgreSQL aborts it (a task on several lines can
-- meet two steps in other orders).
CREATE OR REPLACE FUNCTION {{schema}}.cancel(p_id bigint, p_channel text)
RETURNS TABLE (state text, ready integer)
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    st  text;
    n   integer := 0;
    res text[];
BEGIN
    SELECT t.exclusive || t.shared INTO res FROM {{schema}}.tasks t
     WHERE t.id = p_id AND t.state IN ('waiting', 'scheduled', 'retrying');
    IF res IS NOT NULL THEN
        PERFORM 1 FROM {{schema}}.lines l
          WHERE l.resource = ANY (res) AND l.task = p_id
          ORDER BY l.resource FOR UPDATE;
    END IF;
    UPDATE {{schema}}.tasks t
       SET state = CASE WHEN t.state IN ('waiting', 'scheduled', 'retrying') THEN 'canceled' ELSE 'canceling' END,
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

-- Plans of the hand-off path. The step, settle and handoff run generic
-- plans (plan_cache_mode), which guess ten rows for every unnest() and
-- cannot see that a line's entries are few. Two of those guesses read far
-- more than the rows they touch:
--
-- * Bitmap scans never mark index entries dead. The entries that the finish
--   of a task, or the unblocking of a line entry, leaves behind in partial
--   indexes (tasks_worker_idx, lines_blocked_idx) stayed until the next
--   vacuum, and every step read all of them again: on a line of 4,000 tasks
--   a hand-off's unblocking scan read 3,725 dead entries to find one. Plain
--   index scans mark them, so later scans skip them.
-- * settle found a finished task's line entries by task alone, scanning the
--   whole primary key of lines, instead of by (resource, task). It now
--   computes the (resource, task) pairs first.
--
-- A hot line of 4,000 tasks in one process drained a third faster with the
-- PostgreSQL locker, with a third less PostgreSQL CPU per task (CHANGELOG).
ALTER FUNCTION {{schema}}.handoff(text[], boolean[]) SET enable_bitmapscan = off;
ALTER FUNCTION {{schema}}.step(bigint, bigint[], integer[], text[], text[], jsonb[], text[], integer, bigint, boolean, jsonb[], bigint[], jsonb)
    SET enable_bitmapscan = off;

CREATE OR REPLACE FUNCTION {{schema}}.settle(p_ids bigint[], p_pending integer)
RETURNS bigint[]
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    res  text[];
    excl boolean[];
    more text[] := '{}';
BEGIN
    WITH e AS MATERIALIZED (
        SELECT r AS resource, t.id AS task FROM {{schema}}.tasks t, unnest(t.exclusive || t.shared) r
         WHERE t.id = ANY (p_ids)
    ), d AS (
        DELETE FROM {{schema}}.lines l
         USING e
         WHERE l.resource = e.resource AND l.task = e.task
        RETURNING l.resource, l.excl
    )
    SELECT coalesce(array_agg(d.resource), '{}'), coalesce(array_agg(d.excl), '{}') INTO res, excl FROM d;
    IF p_pending > 0 THEN
        WITH p AS (
            DELETE FROM {{schema}}.handoffs h
             WHERE h.ctid = ANY (ARRAY(SELECT ctid FROM {{schema}}.handoffs ORDER BY resource
                                        LIMIT p_pending FOR UPDATE SKIP LOCKED))
            RETURNING h.resource
        )
        SELECT coalesce(array_agg(DISTINCT p.resource), '{}') INTO more FROM p;
    END IF;
    RETURN {{schema}}.handoff(res || more, excl || array_fill(true, ARRAY[cardinality(more)]));
END
$$;
