-- The read model. Unqualified names: the projector applies these files to the
-- live schema and, for rebuild and verify, to a shadow schema.

CREATE TABLE project_build_metrics (
    build_id        text PRIMARY KEY,
    project_id      text NOT NULL,
    status          text NOT NULL
        CONSTRAINT project_build_metrics_status_check
        CHECK (status IN ('building', 'succeeded', 'failed', 'canceled')),
    started_at      timestamptz NOT NULL,
    completed_at    timestamptz,
    duration_ms     bigint,
    framework       text,
    node_version    text,
    package_manager text,
    attempt         bigint,
    error           text,
    CONSTRAINT project_build_metrics_timing_logical
        CHECK (completed_at IS NULL OR completed_at >= started_at)
);

CREATE INDEX project_build_metrics_project_idx ON project_build_metrics (project_id, started_at DESC);

CREATE TABLE projects (
    project_id           text PRIMARY KEY,
    build_status         text NOT NULL
        CONSTRAINT projects_build_status_check
        CHECK (build_status IN ('queued', 'building', 'deployed', 'failed', 'canceled')),
    current_build_id     text
        CONSTRAINT projects_current_build_fk REFERENCES project_build_metrics (build_id),
    last_build_started   timestamptz,
    last_build_completed timestamptz,
    framework            text,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    -- The seed's constraint, strict: no exemption for active builds.
    CONSTRAINT projects_build_timing_logical CHECK (
        last_build_completed IS NULL OR last_build_started IS NULL
        OR last_build_completed >= last_build_started)
);

-- The projector's own tables.

-- Which project a build belongs to: the first claim wins; a later event that
-- names the build under another project is a dead letter.
CREATE TABLE projector_builds (
    build_id   text PRIMARY KEY,
    project_id text NOT NULL
);

CREATE INDEX projector_builds_project_idx ON projector_builds (project_id);

-- The winning event per build and kind (latest occurred_at, ties to the
-- greater id): the facts the read model is derived from.
CREATE TABLE projector_facts (
    build_id    text NOT NULL,
    kind        text NOT NULL,
    project_id  text NOT NULL,
    event_id    text NOT NULL,
    occurred_at timestamptz NOT NULL,
    stream_seq  bigint NOT NULL,
    -- the event's data, typed (each kind uses its own subset)
    framework       text,
    node_version    text,
    package_manager text,
    attempt         bigint,
    outcome         text,
    duration_ms     bigint,
    error           text,
    PRIMARY KEY (build_id, kind)
);


-- The builds each project's row is derived from (fsm.Roles): a batch loads
-- these and its own builds, not the project's whole history.
CREATE TABLE projector_roles (
    project_id      text PRIMARY KEY,
    newest_build    text,
    started_build   text,
    current_build   text,
    framework_build text
);

-- Every applied event id with a digest of its content: the mark that an event
-- is applied, written in the same transaction as the rows it changed.
CREATE TABLE projector_applied (
    event_id   text PRIMARY KEY,
    digest     bytea NOT NULL,
    stream_seq bigint NOT NULL
);

-- Messages that cannot be applied, kept with their reason and payload.
CREATE TABLE projector_dead_letters (
    stream_seq  bigint PRIMARY KEY,
    subject     text NOT NULL,
    reason      text NOT NULL,
    detail      text NOT NULL,
    payload     bytea NOT NULL,
    stored_at   timestamptz NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now(),
    retries     integer NOT NULL DEFAULT 0
);

CREATE INDEX projector_dead_letters_reason_idx ON projector_dead_letters (reason);
