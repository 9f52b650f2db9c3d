-- tasking schema version 3: time and retention. {{schema}} is the quoted
-- schema name, {{seed}} a 64-bit number derived from it.
--
-- Unique dispatch: a task may carry a unique key, and a dispatch with a key
-- that a waiting task already has returns that task instead of adding one.

ALTER TABLE {{schema}}.tasks ADD COLUMN unique_key text COLLATE "C";

-- The waiting task with a given key. Not a unique index: a claimed task whose
-- locks were refused goes back to waiting (design.md §6), and must not fail
-- because a task with its key was dispatched meanwhile. Dispatches with one
-- key are serialised by the key's advisory lock (ukey) instead.
CREATE INDEX tasks_unique_idx ON {{schema}}.tasks (unique_key)
    WHERE state = 'waiting' AND unique_key IS NOT NULL;

-- ukey is the advisory-lock key that serialises dispatches with one unique key.
CREATE FUNCTION {{schema}}.ukey(k text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT hashtextextended(k, {{seed}} + 2) $$;

DROP FUNCTION {{schema}}.dispatch(text[], jsonb[], jsonb, jsonb, bigint[], text);

-- dispatch as in version 2, plus p_unique: one unique key per task ('' for
-- none; the caller has already folded duplicates within the batch). Before
-- anything else it takes the keys' advisory locks, in key order, and looks
-- for a waiting task with each key: a task whose key has one is not inserted
-- and gets no line entries; a row (that task's id, existing = its position
-- in the batch, 1-based) says so. Rows of inserted tasks have existing NULL.
CREATE FUNCTION {{schema}}.dispatch(
    p_names text[], p_args jsonb[], p_excl jsonb, p_shared jsonb, p_timeouts bigint[], p_channel text,
    p_unique text[])
RETURNS TABLE (id bigint, created_at timestamptz, ready boolean, existing integer)
LANGUAGE plpgsql
-- Planned once per session: its statements are long to plan, and the same
-- plan serves one task or thousands.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    k    record;
    nres integer;
    -- 003: unique keys
    uk   text;
    skip integer[] := '{}';
    sids bigint[] := '{}';
BEGIN
    -- 003: unique keys. Locks before the resource locks, in key order, so
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
                               WHERE t.unique_key = u.k AND t.state = 'waiting'
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
    -- 003: the tasks that were already waiting.
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
               nullif(u.uk, '') AS uk -- 003
          FROM unnest(p_names, p_args, p_timeouts, p_unique) WITH ORDINALITY AS u(n, a, tm, uk, o)
         WHERE u.o <> ALL (skip) -- 003
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
    INSERT INTO {{schema}}.tasks AS t (id, name, args, exclusive, shared, timeout_ms, blockers, unique_key)
    SELECT s.id, s.n, s.a, s.ex, s.sh, nullif(s.tm, 0), coalesce(b.n, 0), s.uk
      FROM specs s
      LEFT JOIN (SELECT j.id, count(*) FILTER (WHERE j.blocked) AS n FROM judged j GROUP BY j.id) b ON b.id = s.id
    RETURNING t.id, t.created_at, t.blockers = 0, NULL::integer;
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
