-- tasking schema version 2: per-resource waiting lines. {{schema}} is the
-- quoted schema name, {{seed}} a 64-bit number derived from it.
--
-- Every task that is not final has one entry per resource it names, in a
-- line per resource ordered by task id (the dispatch position). An entry is
-- blocked while an earlier entry on the same line conflicts with it: any
-- earlier entry for an exclusive one, an earlier exclusive entry for a shared
-- one. A task's blockers column counts its blocked entries; a waiting task
-- with no blockers is ready, and workers claim ready tasks straight from an
-- index. When a task becomes final its entries go, and the entries that this
-- unblocks are found by looking at the head of each line it was on (handoff),
-- so a finish costs a few index probes per resource, however long the lines
-- are. docs/design.md explains the protocol and why it keeps the promise.

ALTER TABLE {{schema}}.tasks ADD COLUMN blockers integer NOT NULL DEFAULT 0;

-- The task names each worker handles: a name that no live worker handles is
-- reported (a typo in a dispatch would otherwise block its resources
-- silently).
ALTER TABLE {{schema}}.workers ADD COLUMN handles text[] NOT NULL DEFAULT '{}';

CREATE TABLE {{schema}}.lines (
    resource text COLLATE "C" NOT NULL,
    task     bigint  NOT NULL,
    excl     boolean NOT NULL,
    blocked  boolean NOT NULL,
    PRIMARY KEY (resource, task)
);
-- The first exclusive entry of a line, and the blocked entries of a line.
CREATE INDEX lines_excl_idx ON {{schema}}.lines (resource, task) WHERE excl;
CREATE INDEX lines_blocked_idx ON {{schema}}.lines (resource, task) WHERE blocked;

-- Lines whose handoff could not run when their entries went (another
-- transaction held the line's ordering lock): the next worker step does it.
-- No key: a line may be in it twice, and an insert never waits for another.
CREATE TABLE {{schema}}.handoffs (
    resource text COLLATE "C" NOT NULL
);
CREATE INDEX handoffs_idx ON {{schema}}.handoffs (resource);

-- Entries of the tasks that are not final, from before this version.
INSERT INTO {{schema}}.lines (resource, task, excl, blocked)
SELECT resource, task, excl,
       CASE WHEN excl THEN row_number() OVER w > 1
            ELSE coalesce(count(*) FILTER (WHERE excl) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) > 0
       END
  FROM (SELECT r AS resource, t.id AS task, true AS excl
          FROM {{schema}}.tasks t, unnest(t.exclusive) r
         WHERE t.state IN ('waiting', 'running', 'canceling')
        UNION ALL
        SELECT r, t.id, false
          FROM {{schema}}.tasks t, unnest(t.shared) r
         WHERE t.state IN ('waiting', 'running', 'canceling')) e
WINDOW w AS (PARTITION BY resource ORDER BY task);

UPDATE {{schema}}.tasks t SET blockers = b.n
  FROM (SELECT task, count(*) AS n FROM {{schema}}.lines WHERE blocked GROUP BY task) b
 WHERE t.id = b.task AND t.state = 'waiting';

DROP INDEX {{schema}}.tasks_waiting_res_idx;
DROP INDEX {{schema}}.tasks_waiting_free_idx;
DROP INDEX {{schema}}.tasks_holding_idx;

-- Ready tasks, oldest first: what a worker claims.
CREATE INDEX tasks_ready_idx ON {{schema}}.tasks (id) WHERE state = 'waiting' AND blockers = 0;

-- rkey is the advisory-lock key that orders the changes to one line:
-- dispatches that add entries and handoffs that unblock them. Transaction
-- scoped, in the int8 key space; the PostgreSQL locker's run-time keys are
-- SHA-256 based and live apart from these.
CREATE FUNCTION {{schema}}.rkey(name text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT hashtextextended(name, {{seed}}) $$;

DROP FUNCTION {{schema}}.dispatch(text[], jsonb[], jsonb, jsonb, bigint[], bigint[], boolean[], text);

-- dispatch inserts a batch of tasks in one round trip. Before drawing ids it
-- takes, in key order, a transaction-scoped advisory lock per resource
-- (exclusive for exclusive names, shared for shared ones), after a
-- schema-wide key taken shared. A batch naming more than 64 resources takes
-- the schema-wide key exclusively instead, so it never fills the server's
-- lock table. A dispatch that conflicts with one in flight waits for it to
-- commit and then draws a larger id: for conflicting tasks commit order
-- equals id order. Under the same locks it puts each task on its lines,
-- blocked behind what is already there. p_excl and p_shared are JSON arrays
-- holding one array of names per task. It notifies p_channel, when given,
-- for the commit (dispatches in the caller's transaction).
CREATE FUNCTION {{schema}}.dispatch(
    p_names text[], p_args jsonb[], p_excl jsonb, p_shared jsonb, p_timeouts bigint[], p_channel text)
RETURNS TABLE (id bigint, created_at timestamptz, ready boolean)
LANGUAGE plpgsql
-- Planned once per session: its statements are long to plan, and the same
-- plan serves one task or thousands.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    k    record;
    nres integer;
BEGIN
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
    -- Ids in batch order (volatile functions are evaluated after ORDER BY).
    -- An entry is blocked by what its line already holds (the lines as they
    -- were before this statement) or by an earlier entry of the batch.
    RETURN QUERY
    WITH specs AS (
        SELECT nextval('{{schema}}.task_seq') AS id, u.n, u.a, u.tm,
               ARRAY(SELECT jsonb_array_elements_text(p_excl -> (u.o::int - 1))) AS ex,
               ARRAY(SELECT jsonb_array_elements_text(p_shared -> (u.o::int - 1))) AS sh
          FROM unnest(p_names, p_args, p_timeouts) WITH ORDINALITY AS u(n, a, tm, o)
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
    INSERT INTO {{schema}}.tasks AS t (id, name, args, exclusive, shared, timeout_ms, blockers)
    SELECT s.id, s.n, s.a, s.ex, s.sh, nullif(s.tm, 0), coalesce(b.n, 0)
      FROM specs s
      LEFT JOIN (SELECT j.id, count(*) FILTER (WHERE j.blocked) AS n FROM judged j GROUP BY j.id) b ON b.id = s.id
    RETURNING t.id, t.created_at, t.blockers = 0;
    IF p_channel <> '' THEN
        PERFORM pg_notify(p_channel, 'd');
    END IF;
END
$$;

-- lock_line takes a transaction-scoped advisory lock, exclusive or shared,
-- waiting at most 20 ms (which takes a subtransaction, so it tries first).
-- It returns whether it got the lock. Only this wait is bounded: the lock
-- timeout is put back before anything else can wait.
CREATE FUNCTION {{schema}}.lock_line(p_key bigint, p_excl boolean)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    prev text;
    ok   boolean := true;
BEGIN
    IF p_excl AND pg_try_advisory_xact_lock(p_key) OR NOT p_excl AND pg_try_advisory_xact_lock_shared(p_key) THEN
        RETURN true;
    END IF;
    prev := current_setting('lock_timeout');
    PERFORM set_config('lock_timeout', '20ms', true);
    BEGIN
        IF p_excl THEN
            PERFORM pg_advisory_xact_lock(p_key);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(p_key);
        END IF;
    EXCEPTION WHEN lock_not_available THEN
        ok := false;
    END;
    PERFORM set_config('lock_timeout', prev, true);
    RETURN ok;
END
$$;

-- rkey2 orders the departures of shared entries from a line that has an
-- exclusive entry waiting (see handoff).
CREATE FUNCTION {{schema}}.rkey2(name text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT hashtextextended(name, {{seed}} + 1) $$;

-- handoff unblocks the entries that the departure of entries from the lines
-- p_res made free, and returns the tasks that became ready. p_excl[i] says
-- whether an exclusive entry left p_res[i]. On one line, with X its first
-- exclusive entry, the entries that may have become free are the blocked
-- shared ones before X, and X itself once nothing is ahead of it.
--
-- It must see every entry that a concurrent dispatch adds, and two
-- departures from one line must not both miss that the other made X free.
-- The line's key (rkey) orders it against dispatches: taken exclusively
-- when an exclusive entry left (a shared dispatch may be blocked by it),
-- shared when only shared entries left (only an exclusive dispatch matters
-- then, and departures of shared entries run side by side). A shared
-- departure can free nothing but X; if the line has an X, such departures
-- take rkey2 exclusively, one after the other. Each check runs in a
-- statement after the lock it needs, so it sees what committed before.
-- A line whose lock cannot be had within 20 ms (a dispatch transaction
-- still open on it) is left in handoffs for a later step.
CREATE FUNCTION {{schema}}.handoff(p_res text[], p_excl boolean[])
RETURNS bigint[]
LANGUAGE plpgsql
-- Every statement here touches a few rows through an index; the planner's
-- guesses for unnest() would make it hash whole tables instead.
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    r       text;
    x       boolean;
    locked  text[] := '{}';
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
        FOR r, x IN SELECT u.r, bool_or(u.x) FROM unnest(p_res, p_excl) AS u(r, x)
                     GROUP BY u.r ORDER BY {{schema}}.rkey(u.r) LOOP
            IF NOT {{schema}}.lock_line({{schema}}.rkey(r), x) THEN
                later := later || r;
            ELSIF x THEN
                locked := locked || r;
            ELSE
                shared := shared || r;
            END IF;
        END LOOP;
        FOR r IN SELECT u FROM unnest(shared) u
                  WHERE EXISTS (SELECT 1 FROM {{schema}}.lines l WHERE l.resource = u AND l.excl)
                  ORDER BY {{schema}}.rkey2(u) LOOP
            IF {{schema}}.lock_line({{schema}}.rkey2(r), true) THEN
                locked := locked || r;
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
    WITH heads AS MATERIALIZED (
        SELECT h.r, h.x, (SELECT l.task FROM {{schema}}.lines l WHERE l.resource = h.r ORDER BY l.task LIMIT 1) AS head
          FROM (SELECT u AS r, (SELECT l.task FROM {{schema}}.lines l WHERE l.resource = u AND l.excl
                                 ORDER BY l.task LIMIT 1) AS x
                  FROM unnest(locked) u) h
    ), before_x AS (
        UPDATE {{schema}}.lines l SET blocked = false
          FROM heads
         WHERE heads.x IS NOT NULL AND l.resource = heads.r AND l.blocked AND l.task <= heads.x
           AND (l.task < heads.x OR heads.head = heads.x)
        RETURNING l.task
    ), no_x AS (
        UPDATE {{schema}}.lines l SET blocked = false
          FROM heads
         WHERE heads.x IS NULL AND l.resource = heads.r AND l.blocked
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

-- settle takes tasks that just became final off their lines and hands their
-- resources on, together with up to p_pending lines left in handoffs (as if
-- an exclusive entry had left them). It returns the tasks that became ready.
CREATE FUNCTION {{schema}}.settle(p_ids bigint[], p_pending integer)
RETURNS bigint[]
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    res  text[];
    excl boolean[];
    more text[] := '{}';
BEGIN
    WITH d AS (
        DELETE FROM {{schema}}.lines l
         USING (SELECT t.id, r FROM {{schema}}.tasks t, unnest(t.exclusive || t.shared) r
                 WHERE t.id = ANY (p_ids)) e
         WHERE l.resource = e.r AND l.task = e.id
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
    p_results jsonb[], p_names text[], p_free integer, p_fresh_ms bigint, p_locks boolean)
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
                   finished_at = clock_timestamp(), error = nullif(v.error, ''), result = v.result
              FROM unnest(p_ids, p_epochs, p_states, p_errors, p_results) AS v(id, epoch, state, error, result)
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

-- cancel cancels a task: a waiting one becomes canceled at once (and leaves
-- its lines), a running one canceling. It notifies p_channel with the id of
-- a task that became canceling, for its worker, or when tasks became ready.
-- It returns the new state (NULL when the task was in neither state) and
-- how many tasks became ready.
CREATE FUNCTION {{schema}}.cancel(p_id bigint, p_channel text)
RETURNS TABLE (state text, ready integer)
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    n  integer := 0;
BEGIN
    UPDATE {{schema}}.tasks t
       SET state = CASE t.state WHEN 'waiting' THEN 'canceled' ELSE 'canceling' END,
           finished_at = CASE t.state WHEN 'waiting' THEN clock_timestamp() END
     WHERE t.id = p_id AND t.state IN ('waiting', 'running')
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

-- The PostgreSQL locker's fencing tokens keep using fence_seq; lock_batch is
-- unchanged.
