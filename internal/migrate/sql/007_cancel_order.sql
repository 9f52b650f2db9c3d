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
