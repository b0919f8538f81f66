-- Read models (issue 5): tables folded from the event store by the projection runner. Each
-- projection owns its tables; a rebuild builds them anew beside these and swaps them in one
-- transaction. Nothing here is the truth: every row can be rebuilt from `events`.

CREATE TABLE projection_checkpoints (
    name            text        PRIMARY KEY,
    -- The last store position whose effect is in the projection's tables.
    position        bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- Set when the projection stopped on an event it could not apply.
    failed_position bigint,
    error           text
);

-- runs: list and detail.
CREATE TABLE rm_runs (
    run_id           uuid        PRIMARY KEY,
    title            text        NOT NULL,
    pipeline         text        NOT NULL,
    status           text        NOT NULL,
    auto_approve     boolean     NOT NULL,
    submitted_at     timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    ended_at         timestamptz,
    stages_total     integer     NOT NULL,
    stages_completed integer     NOT NULL DEFAULT 0,
    revisions        integer     NOT NULL DEFAULT 0,
    reviewed_by      text,
    -- Why the run is BLOCKED / FAILED / CANCELLED / waiting for an answer.
    status_reason    text,
    last_position    bigint      NOT NULL
);
CREATE INDEX rm_runs_submitted ON rm_runs (submitted_at DESC, run_id);

CREATE TABLE rm_run_stages (
    run_id       uuid        NOT NULL,
    stage        text        NOT NULL,
    team         text        NOT NULL,
    ordinal      integer     NOT NULL,
    status       text        NOT NULL,
    iterations   integer     NOT NULL DEFAULT 0,
    objective_id uuid,
    started_at   timestamptz,
    ended_at     timestamptz,
    PRIMARY KEY (run_id, stage)
);

-- graph: TEAM nodes (one per stage) and a HUMAN node; HANDOFF, CLARIFICATION, ESCALATION edges.
CREATE TABLE rm_graph_nodes (
    run_id     uuid        NOT NULL,
    node_id    text        NOT NULL,
    kind       text        NOT NULL,
    team       text,
    label      text        NOT NULL,
    status     text        NOT NULL,
    iterations integer     NOT NULL DEFAULT 0,
    started_at timestamptz,
    ended_at   timestamptz,
    PRIMARY KEY (run_id, node_id)
);

CREATE TABLE rm_graph_edges (
    run_id     uuid        NOT NULL,
    edge_id    text        NOT NULL,
    kind       text        NOT NULL,
    source     text        NOT NULL,
    target     text        NOT NULL,
    label      text,
    state      text        NOT NULL,
    hop        integer     NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (run_id, edge_id)
);

-- cost: per run, team, alias, provider and model; group by any of them.
CREATE TABLE rm_cost_objectives (
    objective_id uuid PRIMARY KEY,
    run_id       uuid NOT NULL,
    team         text NOT NULL
);

CREATE TABLE rm_costs (
    run_id        uuid             NOT NULL,
    team          text             NOT NULL,
    alias         text             NOT NULL,
    provider      text             NOT NULL,
    model         text             NOT NULL,
    calls         bigint           NOT NULL DEFAULT 0,
    input_tokens  bigint           NOT NULL DEFAULT 0,
    output_tokens bigint           NOT NULL DEFAULT 0,
    cost_usd      double precision NOT NULL DEFAULT 0,
    fallbacks     bigint           NOT NULL DEFAULT 0,
    downgrades    bigint           NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, team, alias, provider, model)
);

-- activity: one human-readable line per event worth telling.
CREATE TABLE rm_activity (
    position bigint      PRIMARY KEY,
    run_id   uuid,
    at       timestamptz NOT NULL,
    kind     text        NOT NULL,
    text     text        NOT NULL
);
CREATE INDEX rm_activity_run ON rm_activity (run_id, position);

GRANT SELECT, INSERT, UPDATE ON projection_checkpoints TO factory;
GRANT SELECT, INSERT, UPDATE, DELETE ON rm_runs, rm_run_stages, rm_graph_nodes, rm_graph_edges,
    rm_cost_objectives, rm_costs, rm_activity TO factory;
