-- The builds waiting on their worker, one row each (issue 10: fewer rows an
-- event). Migration 005 marked them on their facts (projector_facts.pending,
-- a partial index): a completion then updated its build's queued and
-- started facts, two updates off the table's hot path that moved each row
-- and its key (measured: 7 µs of Postgres CPU an event of a catch-up, a
-- fifth of its writes). Here a build that starts waiting gets a row, an
-- update when it starts, and a delete when its completion comes; the table
-- holds only the open builds, so `projector stuck` and the
-- buildstate_builds_stuck gauge read them whole, as they read the partial
-- index before.
--
-- state: 'queued' (no start yet, since the queued event) or 'building'
-- (started, since the started event): fsm.Build.Waiting.
CREATE TABLE projector_open_builds (
    build_id   text COLLATE "C" PRIMARY KEY,
    project_id text COLLATE "C" NOT NULL,
    state      text NOT NULL CHECK (state IN ('queued', 'building')),
    since      timestamptz NOT NULL
) WITH (fillfactor = 50);

INSERT INTO projector_open_builds (build_id, project_id, state, since)
SELECT DISTINCT ON (f.build_id) f.build_id, f.project_id,
       CASE f.kind WHEN 'started' THEN 'building' ELSE 'queued' END, f.occurred_at
FROM projector_facts f
WHERE f.pending
ORDER BY f.build_id, f.kind = 'started' DESC;

DROP INDEX projector_facts_pending_idx;
ALTER TABLE projector_facts DROP COLUMN pending;
