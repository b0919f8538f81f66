-- The event store: the Factory's immutable audit memory.
--
-- cqrs-es/postgres-es write (aggregate_type, aggregate_id, sequence, event_type,
-- event_version, payload, metadata). Everything else is computed here, by the database, on
-- insert, so that no writer can skip or forge it:
--   position     global order of every event (the relay publishes in this order)
--   xid          the inserting transaction's id, taken BEFORE the position is drawn; the
--                relay's safe horizon relies on that order (docs/architecture.md)
--   recorded_at  when the row was inserted
--   run_id       from metadata.run_id, so one run's events can be read in order
--   hash         sha256(previous hash of the same aggregate || canonical bytes of this event)
-- UPDATE, DELETE and TRUNCATE raise an error; the application role may only INSERT and SELECT.

CREATE SEQUENCE events_position_seq AS bigint;

CREATE TABLE events (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL CHECK (sequence >= 1),
    event_type     text        NOT NULL,
    event_version  text        NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    position       bigint      NOT NULL,
    xid            xid8        NOT NULL,
    recorded_at    timestamptz NOT NULL,
    run_id         uuid,
    hash           bytea       NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_position_idx ON events (position);
CREATE INDEX events_run_idx ON events (run_id, position) WHERE run_id IS NOT NULL;

-- The bytes a hash covers. Documented in docs/architecture.md so that an auditor can
-- recompute the chain outside the database. jsonb's text form is canonical (keys sorted).
CREATE FUNCTION event_canonical_bytes(
    p_aggregate_type text, p_aggregate_id text, p_sequence bigint, p_event_type text,
    p_event_version text, p_payload jsonb, p_metadata jsonb, p_position bigint,
    p_recorded_at timestamptz, p_run_id uuid
) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT convert_to(concat_ws(chr(31),
        p_aggregate_type, p_aggregate_id, p_sequence::text, p_event_type, p_event_version,
        p_position::text, (extract(epoch FROM p_recorded_at) * 1000000)::bigint::text,
        coalesce(p_run_id::text, ''), p_payload::text, p_metadata::text), 'UTF8')
$$;

-- Whether the relay wants a NOTIFY on commit (see events_before_insert). Unlogged: it is a
-- hint, not data: no relay asked until one does (each relay asks when it takes over).
CREATE UNLOGGED TABLE relay_wake (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),
    requested boolean NOT NULL
);
INSERT INTO relay_wake (requested) VALUES (false);

CREATE FUNCTION events_before_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    previous bytea;
BEGIN
    -- The transaction id first, then the position: every position is drawn by a
    -- transaction whose id was assigned before it (the relay's horizon proof needs this).
    NEW.xid := pg_current_xact_id();
    NEW.position := nextval('events_position_seq');
    NEW.recorded_at := clock_timestamp();
    NEW.run_id := nullif(NEW.metadata ->> 'run_id', '')::uuid;
    IF NEW.sequence > 1 THEN
        SELECT e.hash INTO previous FROM events e
         WHERE e.aggregate_type = NEW.aggregate_type
           AND e.aggregate_id = NEW.aggregate_id
           AND e.sequence = NEW.sequence - 1;
        IF previous IS NULL THEN
            RAISE EXCEPTION 'event %/% sequence % has no predecessor: sequences must have no gaps',
                NEW.aggregate_type, NEW.aggregate_id, NEW.sequence
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    END IF;
    NEW.hash := sha256(coalesce(previous, ''::bytea) || event_canonical_bytes(
        NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.event_type,
        NEW.event_version, NEW.payload, NEW.metadata, NEW.position, NEW.recorded_at,
        NEW.run_id));
    -- Wake the relay at commit, but only when it asked to be woken (it is idle): NOTIFY
    -- takes a database-wide lock at commit that stops concurrent commits from sharing a
    -- WAL flush, so a busy relay polls instead. Read after the position is drawn, with a
    -- fresh snapshot: a relay that set the flag later sees this position when it looks again.
    IF coalesce((SELECT w.requested FROM relay_wake w), false) THEN
        PERFORM pg_notify('factory_events', '');
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER events_before_insert BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_before_insert();

CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event store is append-only: % on events is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

-- The relay's safe horizon (docs/architecture.md, commands/src/relay.rs):
--   last_position  the highest position drawn so far;
--   bound          a transaction id assigned after reading it: every transaction that drew a
--                  position <= last_position got its id earlier (the insert trigger takes the
--                  id before the position), so its id is below `bound`;
--   xmin           the oldest transaction still running, from a snapshot taken after that.
-- last_position is safe once a snapshot's xmin >= bound: every id below bound has ended.
-- (A snapshot's xmax is NOT "the next id to assign" but "latest completed + 1": running
-- transactions above it are invisible to xmin, so xmax cannot serve as the bound.)
-- Separate statements on purpose: in READ COMMITTED each takes its own snapshot, in order.
CREATE FUNCTION events_horizon(OUT last_position bigint, OUT bound bigint, OUT xmin bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END INTO last_position
      FROM events_position_seq s;
    bound := pg_current_xact_id()::text::bigint;
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint INTO xmin;
END
$$;

-- postgres-es snapshots (used by aggregates configured with snapshotting).
CREATE TABLE snapshots (
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          jsonb  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- The relay's progress: the last position whose PubAck was received, and the stream
-- sequence JetStream gave it.
CREATE TABLE relay_checkpoints (
    name            text        PRIMARY KEY,
    position        bigint      NOT NULL,
    stream_sequence bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The application role: INSERT and SELECT on events, nothing more.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'factory') THEN
        CREATE ROLE factory NOLOGIN;
    END IF;
END
$$;

REVOKE ALL ON events FROM PUBLIC;
GRANT SELECT, INSERT ON events TO factory;
GRANT USAGE, SELECT ON SEQUENCE events_position_seq TO factory;
GRANT SELECT, INSERT, UPDATE, DELETE ON snapshots TO factory;
GRANT SELECT, INSERT, UPDATE ON relay_checkpoints TO factory;
GRANT SELECT, INSERT, UPDATE ON relay_wake TO factory;
GRANT EXECUTE ON FUNCTION events_horizon() TO factory;
-- Readiness (`/readyz`) checks which migrations are applied.
GRANT SELECT ON _sqlx_migrations TO factory;
