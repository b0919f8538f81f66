-- Payloads and metadata are stored as the JSON text the writer sent (`json`), not as
-- `jsonb`.
--
-- Nothing reads an event's payload by its fields in the database on the write or relay
-- path, but `jsonb` made every row pay for it three times: the text parsed into jsonb's
-- binary form on insert, printed back to text for the hash chain's canonical bytes in the
-- insert trigger, and printed again for the relay's read. With `json` the text is checked
-- once on insert (json_in validates it) and then is what it is: the hash covers the stored
-- text, and the relay reads it as stored. In psql, 3,000 events of a demo run (1.1 kB of
-- payload each on average) went through the insert trigger in 108 ms instead of 145.
--
-- The hash chain holds across the change: the canonical bytes are `payload::text` and
-- `metadata::text` before and after. A row stored before keeps jsonb's text form (the
-- conversion below writes exactly that text), which is what its hash covers; a row stored
-- after keeps the writer's text, which is what the trigger hashes. Queries by field
-- (`payload -> 'StageStarted' ->> 'stage'`) work on `json` as they did.
--
-- Processes must be restarted after it (docs/operations.md): a statement a connection
-- prepared before that returns these columns is refused after ("cached plan must not change
-- result type"). The conversion rewrites the table under an exclusive lock: appends and
-- reads wait for it (2.1 s for 100,000 events of demo runs, 122 MB, on the development machine).

-- A change of type resets the column's storage to the type's default; set again in the
-- same statement (applied before the rewrite), payloads stay uncompressed out of line as
-- migration 0010 set them. The rewrite stores every row that way, the ones compressed
-- before migration 0010 included.
ALTER TABLE events
    ALTER COLUMN payload TYPE json USING payload::text::json,
    ALTER COLUMN metadata TYPE json USING metadata::text::json,
    ALTER COLUMN payload SET STORAGE EXTERNAL;

-- The audit's function, over the new column types: the same expression, so the same bytes.
-- (Left over `jsonb`, a call with `json` columns would not resolve, or worse, a cast would
-- make it hash jsonb's text of rows stored as the writer's.)
DROP FUNCTION event_canonical_bytes(text, text, bigint, text, text, jsonb, jsonb, bigint, timestamptz, uuid);
CREATE FUNCTION event_canonical_bytes(
    p_aggregate_type text, p_aggregate_id text, p_sequence bigint, p_event_type text,
    p_event_version text, p_payload json, p_metadata json, p_position bigint,
    p_recorded_at timestamptz, p_run_id uuid
) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT convert_to(concat_ws(chr(31),
        p_aggregate_type, p_aggregate_id, p_sequence::text, p_event_type, p_event_version,
        p_position::text, (extract(epoch FROM p_recorded_at) * 1000000)::bigint::text,
        coalesce(p_run_id::text, ''), p_payload::text, p_metadata::text), 'UTF8')
$$;

-- The insert trigger, again as migration 0008 left it, word for word. Sessions that ran it
-- before the change of type hold its plans prepared for jsonb, and PostgreSQL refuses to
-- run those on json ("type of parameter ... does not match that when preparing the plan"):
-- replacing the function makes every session compile it afresh on its next call, so that
-- appends of a session that lived through the change work at once.
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
