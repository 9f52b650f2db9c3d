-- tasking schema version 1. {{schema}} is replaced by the quoted schema name.

-- seq is drawn from this sequence inside the inserting transaction, after the
-- dispatch has taken its per-resource advisory locks (see dispatch below).
CREATE SEQUENCE {{schema}}.task_seq AS bigint;

-- Fencing tokens handed out by the PostgreSQL locker, one per grant.
CREATE SEQUENCE {{schema}}.fence_seq AS bigint;

CREATE TABLE {{schema}}.tasks (
    id          bigint PRIMARY KEY,          -- the dispatch position (seq)
    name        text        NOT NULL,
    args        jsonb       NOT NULL,
    exclusive   text[]      NOT NULL DEFAULT '{}',
    shared      text[]      NOT NULL DEFAULT '{}',
    state       text        NOT NULL DEFAULT 'waiting'
                CHECK (state IN ('waiting', 'running', 'canceling', 'completed', 'failed', 'canceled')),
    worker_id   bigint,
    epoch       integer     NOT NULL DEFAULT 0,
    timeout_ms  bigint,                      -- handler deadline, NULL for none
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    error       text,
    result      jsonb
);

-- "Oldest waiting tasks by seq" for the admission walk. Only tasks that name
-- resources matter to the walk: a task without resources conflicts with
-- nothing, so workers claim those straight from their own index.
CREATE INDEX tasks_waiting_res_idx ON {{schema}}.tasks (id)
    WHERE state = 'waiting' AND (exclusive <> '{}' OR shared <> '{}');
CREATE INDEX tasks_waiting_free_idx ON {{schema}}.tasks (id)
    WHERE state = 'waiting' AND exclusive = '{}' AND shared = '{}';

-- Running tasks that hold resources: the walk starts with their names taken.
CREATE INDEX tasks_holding_idx ON {{schema}}.tasks (id)
    WHERE state IN ('running', 'canceling') AND (exclusive <> '{}' OR shared <> '{}');

-- Tasks a worker owns, for finishing and for cleanup of dead workers.
CREATE INDEX tasks_worker_idx ON {{schema}}.tasks (worker_id) WHERE state IN ('running', 'canceling');

CREATE TABLE {{schema}}.workers (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text        NOT NULL,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    locker       text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- dispatch inserts a batch of tasks in one round trip. Before drawing seq it
-- takes a transaction-scoped advisory lock per resource (exclusive for
-- exclusive names, shared for shared ones), in the order given, which the
-- caller sorts by key so concurrent dispatches never deadlock (the caller
-- also puts a schema-wide key first, which a batch naming very many
-- resources takes exclusively instead of filling the server's lock table). A dispatch that
-- conflicts with one still in flight therefore waits for it to commit and then
-- draws a larger seq: for conflicting tasks commit order equals seq order.
-- p_excl and p_shared are JSON arrays holding one array of names per task.
CREATE FUNCTION {{schema}}.dispatch(
    p_names text[], p_args jsonb[], p_excl jsonb, p_shared jsonb, p_timeouts bigint[],
    p_lock_keys bigint[], p_lock_excl boolean[], p_channel text)
RETURNS TABLE (id bigint, created_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_lock_keys, 1), 0) LOOP
        IF p_lock_excl[i] THEN
            PERFORM pg_advisory_xact_lock(p_lock_keys[i]);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(p_lock_keys[i]);
        END IF;
    END LOOP;
    RETURN QUERY
    INSERT INTO {{schema}}.tasks AS t (id, name, args, exclusive, shared, timeout_ms)
    SELECT nextval('{{schema}}.task_seq'), u.n, u.a,
           ARRAY(SELECT jsonb_array_elements_text(p_excl -> (u.o::int - 1))),
           ARRAY(SELECT jsonb_array_elements_text(p_shared -> (u.o::int - 1))),
           nullif(u.tm, 0)
      FROM unnest(p_names, p_args, p_timeouts) WITH ORDINALITY AS u(n, a, tm, o)
     ORDER BY u.o
    RETURNING t.id, t.created_at;
    IF p_channel <> '' THEN
        PERFORM pg_notify(p_channel, 'd');
    END IF;
END
$$;

-- lock_batch is the PostgreSQL locker's one round trip: it first releases the
-- session-level advisory locks in p_unlock (p_unlock_excl says in which mode
-- each was taken), then tries each request all-or-nothing. Rows of p_req,
-- p_key, p_excl are grouped by request. A key granted to an earlier request
-- of the same call (shared in both) is not taken twice. For a request that
-- fails part way, the keys it took are released before moving on. A row with
-- a NULL key asks for nothing (a request the caller granted from its own lock
-- table) and just draws a fencing token. Returns one row per granted request
-- with a fresh fencing token.
CREATE FUNCTION {{schema}}.lock_batch(
    p_unlock bigint[], p_unlock_excl boolean[],
    p_req integer[], p_key bigint[], p_excl boolean[])
RETURNS TABLE (req integer, fence bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n    integer := coalesce(array_length(p_req, 1), 0);
    i    integer := 1;
    j    integer;
    cur  integer;
    ok   boolean;
    held bigint[] := '{}';
    gotk bigint[];
    gotx boolean[];
BEGIN
    FOR j IN 1 .. coalesce(array_length(p_unlock, 1), 0) LOOP
        IF p_unlock_excl[j] THEN
            PERFORM pg_advisory_unlock(p_unlock[j]);
        ELSE
            PERFORM pg_advisory_unlock_shared(p_unlock[j]);
        END IF;
    END LOOP;
    WHILE i <= n LOOP
        cur := p_req[i];
        ok := true;
        gotk := '{}';
        gotx := '{}';
        WHILE i <= n AND p_req[i] = cur LOOP
            IF ok AND p_key[i] IS NOT NULL AND NOT (p_key[i] = ANY (held)) THEN
                IF p_excl[i] THEN
                    ok := pg_try_advisory_lock(p_key[i]);
                ELSE
                    ok := pg_try_advisory_lock_shared(p_key[i]);
                END IF;
                IF ok THEN
                    gotk := gotk || p_key[i];
                    gotx := gotx || p_excl[i];
                END IF;
            END IF;
            i := i + 1;
        END LOOP;
        IF ok THEN
            held := held || gotk;
            req := cur;
            fence := nextval('{{schema}}.fence_seq');
            RETURN NEXT;
        ELSE
            FOR j IN 1 .. coalesce(array_length(gotk, 1), 0) LOOP
                IF gotx[j] THEN
                    PERFORM pg_advisory_unlock(gotk[j]);
                ELSE
                    PERFORM pg_advisory_unlock_shared(gotk[j]);
                END IF;
            END LOOP;
        END IF;
    END LOOP;
END
$$;
