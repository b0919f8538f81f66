-- Artifacts: files the teams produced, addressed by the sha256 of their content. The event
-- `ArtifactProduced` names path and digest; the bytes live here, once per content.
CREATE TABLE artifacts (
    sha256     text        PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    content    bytea       NOT NULL,
    bytes      bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (bytes = octet_length(content))
);

GRANT SELECT, INSERT ON artifacts TO factory;
