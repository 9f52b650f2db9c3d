-- tasking schema version 5: what observability needs from the fleet.
-- {{schema}} is the quoted schema name.

-- A worker's slots and heartbeat TTL, written when it registers, so that
-- Client.Stats can say how busy each worker is (its running tasks out of
-- its slots) and which workers are live, without asking them. 0 and the
-- default TTL for rows written by an older release.
ALTER TABLE {{schema}}.workers ADD COLUMN slots integer NOT NULL DEFAULT 0;
ALTER TABLE {{schema}}.workers ADD COLUMN ttl_ms bigint NOT NULL DEFAULT 30000;
