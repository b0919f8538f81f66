-- The insert trigger does per row only what is per row.
--
-- Appends now come in statements of many rows (group commit: the units of work ready at the
-- same moment share one statement, commands/src/group_commit.rs). Two things the row trigger
-- did for every row belong to the statement:
--   * whether the relay asked to be woken: a read of `relay_wake` per row (about 10 us each
--     under load) is now one per statement, in an AFTER ... FOR EACH STATEMENT trigger. It
--     is still read after every position of the statement is drawn, with a fresh snapshot,
--     so a relay that set the flag later sees those positions when it looks again;
--   * nothing else moves: the transaction id, the appenders' lock, the position, the time,
--     the hash stay per row, in that order (the relay's horizon proof, migration 0006).
-- The canonical bytes are written out in the trigger instead of calling
-- `event_canonical_bytes` (a SQL function call per row that PostgreSQL does not inline here),
-- the same expression over the same columns: the audit still recomputes every hash with
-- `event_canonical_bytes` and finds them equal (tests/tests/store.rs). So is the appenders'
-- lock taken directly, as `events_mark_appender` takes it.

CREATE OR REPLACE FUNCTION events_before_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    previous bytea;
BEGIN
    -- The transaction id first, then the appenders' lock, then the position: every position
    -- is drawn by a transaction whose id was assigned before it, and that holds the
    -- appenders' lock until it ends (the relay's horizon proof needs both).
    NEW.xid := pg_current_xact_id();
    PERFORM pg_advisory_xact_lock_shared(1178682196, 1);
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
    -- event_canonical_bytes(...), written out.
    NEW.hash := sha256(coalesce(previous, ''::bytea) || convert_to(concat_ws(chr(31),
        NEW.aggregate_type, NEW.aggregate_id, NEW.sequence::text, NEW.event_type, NEW.event_version,
        NEW.position::text, (extract(epoch FROM NEW.recorded_at) * 1000000)::bigint::text,
        coalesce(NEW.run_id::text, ''), NEW.payload::text, NEW.metadata::text), 'UTF8'));
    RETURN NEW;
END
$$;

-- Wake the relay at commit, but only when it asked to be woken (it is idle): NOTIFY takes a
-- database-wide lock at commit that stops concurrent commits from sharing a WAL flush, so a
-- busy relay polls instead.
CREATE FUNCTION events_wake_relay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce((SELECT w.requested FROM relay_wake w), false) THEN
        PERFORM pg_notify('factory_events', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_wake_relay AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_wake_relay();
