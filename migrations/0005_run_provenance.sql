-- Who submitted a run (RequirementSubmitted v2's `submitted_by`; "unknown" for v1 events)
-- and, for a fork, the run and position it started from (RunForked).
ALTER TABLE rm_runs
    ADD COLUMN submitted_by text NOT NULL DEFAULT 'unknown',
    ADD COLUMN forked_from  uuid,
    ADD COLUMN forked_at    bigint;
