-- The worker processes that claim objectives (the in-process handoff, teams/src/handoff.rs).
--
-- An objective started by a process for a team its own worker serves is claimed for that
-- worker (`ObjectiveAssigned.claimed_by` = the worker's instance id) and handed to it in
-- memory; no work message is queued for it. If that process dies, its open claims must be
-- found and their work queued for the others: that is what this table is for. Each worker
-- process that claims keeps its row here, renewed with its presence (the FACTORY_WORKERS key):
--   instance        the worker's instance id, as claims name it;
--   since_position  a position before every claim of it still open: each objective it
--                   claimed at a position <= this has ended its local attempts (or is left
--                   waiting for a clarification). It only moves forward;
--   seen_at         the last renewal, by the database's clock.
-- A row not renewed for longer than the presence lasts, whose key has gone, belongs to a
-- process that claims no more: any worker process then queues the work of its claims
-- assigned after `since_position` and still open, and deletes the row (the sweep,
-- teams/src/worker.rs). Operational bookkeeping, like relay_checkpoints: every claim is in
-- the events themselves; this only says how far back to look, and whom for.
CREATE TABLE worker_instances (
    instance       text        PRIMARY KEY,
    since_position bigint      NOT NULL,
    seen_at        timestamptz NOT NULL
);

GRANT SELECT, INSERT, UPDATE, DELETE ON worker_instances TO factory;
