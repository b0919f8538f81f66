-- The relay's safe horizon waits only for transactions that append events.
--
-- Until now it waited for the snapshot's xmin to pass its bound: for EVERY older transaction
-- of the cluster, in any database, to end. One long transaction that never touches `events`
-- (a read-model rebuild's chunk here, any batch job in another database of the cluster, a
-- session left idle in a transaction) held every event back for as long as it ran.
--
-- Now an appending transaction marks itself: the insert trigger takes a shared
-- transaction-scoped advisory lock, the appenders' lock, BEFORE it draws the position (after
-- the transaction id, as before). So every transaction that drew a position <= V (the last
-- drawn position when the horizon is read) held that lock when V was read, and holds it
-- until it ends. `events_oldest_appender(bound)` finds the oldest transaction below `bound`
-- that still holds it: pg_locks gives each holder's own transaction-id lock (32 bits),
-- widened to a full id against `bound`. A lock is released only after the
-- transaction's end is visible to new snapshots, so once no holder is left below `bound`,
-- everything up to V can be read.
--
-- The old rule stays as the fast path: when nothing older than the bound runs at all, no
-- lock table is read. Shared advisory locks never conflict with each other; appenders do
-- not wait on one another. (Not covered: a PREPARE TRANSACTION that appended events; its
-- locks have no backend. The Factory does not use two-phase commit.)

-- Applied on a live store: an appender that drew its position under the old trigger holds
-- no appenders' lock, and the new horizon would not wait for it. So appends are held off
-- (and the ones in flight waited for) until this migration commits; readers go on.
LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE;

-- The appenders' lock: advisory, two int4 keys ('FACT', 1); pg_locks shows it as
-- classid = 1178682196, objid = 1, objsubid = 2, in this database.
CREATE FUNCTION events_mark_appender() RETURNS void LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock_shared(1178682196, 1)
$$;

-- A holder's own transaction-id lock shows its id in 32 bits; it is widened against `bound`
-- (ids within 2^31 of each other compare by their difference modulo 2^32, as PostgreSQL
-- does). Holders at or after `bound` do not matter. (Not the snapshot's running ids: a
-- transaction that took its id after the latest completion is missing from them, the same
-- trap as reading a snapshot's xmax.)
CREATE FUNCTION events_oldest_appender(bound bigint) RETURNS bigint LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(min(h.id), bound)
      FROM (SELECT bound - ((bound - t.transactionid::text::bigint) % 4294967296 + 4294967296) % 4294967296 AS id
              FROM pg_locks a
              JOIN pg_locks t ON t.pid = a.pid
             WHERE a.locktype = 'advisory'
               AND a.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
               AND a.classid = 1178682196 AND a.objid = 1 AND a.objsubid = 2
               AND a.granted
               AND t.locktype = 'transactionid' AND t.mode = 'ExclusiveLock' AND t.granted) h
     WHERE h.id > bound - 2147483648 AND h.id < bound
$$;

CREATE OR REPLACE FUNCTION events_before_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    previous bytea;
BEGIN
    -- The transaction id first, then the appenders' lock, then the position: every position
    -- is drawn by a transaction whose id was assigned before it, and that holds the
    -- appenders' lock until it ends (the relay's horizon proof needs both).
    NEW.xid := pg_current_xact_id();
    PERFORM events_mark_appender();
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

-- As before, but `xmin` is now the oldest APPENDING transaction still running below `bound`
-- (or `bound` when there is none): last_position is safe once xmin >= bound.
CREATE OR REPLACE FUNCTION events_horizon(OUT last_position bigint, OUT bound bigint, OUT xmin bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END INTO last_position
      FROM events_position_seq s;
    bound := pg_current_xact_id()::text::bigint;
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint INTO xmin;
    IF xmin < bound THEN
        xmin := events_oldest_appender(bound);
    END IF;
END
$$;

GRANT EXECUTE ON FUNCTION events_mark_appender() TO factory;
GRANT EXECUTE ON FUNCTION events_oldest_appender(bigint) TO factory;
