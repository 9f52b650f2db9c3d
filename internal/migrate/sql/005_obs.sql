-- tasking schema version 5: what observability needs from the fleet.
-- {{schema}} is the quoted schema name.

-- A worker's slots and heartbeat TTL, written when it registers, so that
-- Client.Stats can say how busy each worker is (its running tasks out of
-- its slots) and which workers are live, without asking them. 0 and the
-- default TTL for rows written by an older release.
ALTER TABLE {{schema}}.workers ADD COLUMN slots integer NOT NULL DEFAULT 0;
ALTER TABLE {{schema}}.workers ADD COLUMN ttl_ms bigint NOT NULL DEFAULT 30000;

-- The trace context (a W3C traceparent) of the dispatch that created a
-- task, for tasks dispatched by a client with a TracerProvider: a worker
-- that traces links the task's run span to it. Written by the dispatching
-- statement, read when the task is claimed; other dispatches write nothing.
-- No foreign key to tasks: it would put referential-integrity triggers on
-- every update of a task row, which the hot path (three updates per task)
-- should not pay for when nothing is traced. Delete a task's row here when
-- deleting the task.
CREATE TABLE {{schema}}.task_traces (
    task   bigint PRIMARY KEY,
    parent text NOT NULL
);
