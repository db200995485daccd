-- When the build was queued (NULL if no queued event is known). Added after
-- the first release: `projector rebuild` fills it for builds projected before.
ALTER TABLE project_build_metrics ADD COLUMN queued_at timestamptz;
