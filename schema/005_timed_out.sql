-- Builds whose worker vanished (`projector stuck`, issue 9 §3).

-- data.timed_out of a winning completion: true for one published by a
-- time-out (`projector stuck --time-out`), which loses to any completion
-- without it (docs/contract.md). A constant default: PostgreSQL adds the
-- column without rewriting the table; existing facts are not time-outs.
ALTER TABLE projector_facts ADD COLUMN timed_out boolean NOT NULL DEFAULT false;

-- pending: true on a queued or started fact while its build has no
-- completion (the store sets it when it writes the fact and clears it when
-- the completion comes). The partial index holds only those facts, the
-- builds still waiting on a worker, so `projector stuck` and the
-- buildstate_builds_stuck gauge read the open builds, not the whole history.
ALTER TABLE projector_facts ADD COLUMN pending boolean NOT NULL DEFAULT false;

UPDATE projector_facts f SET pending = true
WHERE f.kind IN ('queued', 'started')
  AND NOT EXISTS (SELECT 1 FROM projector_facts c WHERE c.build_id = f.build_id AND c.kind = 'completed');

CREATE INDEX projector_facts_pending_idx ON projector_facts (occurred_at) WHERE pending;
