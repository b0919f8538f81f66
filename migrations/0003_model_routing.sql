-- Model routing changed at run time (`factory models set`, later `setRouting` in GraphQL):
-- an alias's chain of provider:model targets, over the one in the configuration. Every
-- change is kept in `model_routing_changes`, so who routed what where, when, can be read back.
CREATE TABLE model_routing (
    alias      text        PRIMARY KEY,
    targets    text[]      NOT NULL CHECK (cardinality(targets) > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_routing_changes (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alias      text        NOT NULL,
    -- NULL: the alias went back to its configured chain.
    targets    text[],
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text        NOT NULL
);

GRANT SELECT, INSERT, UPDATE, DELETE ON model_routing TO factory;
GRANT SELECT, INSERT ON model_routing_changes TO factory;
