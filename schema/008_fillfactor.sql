-- Room on each page for updated rows (issue 10: cheaper writes). A row
-- updated on a full page moves to another one and every index of its table
-- gets an entry for the new version; with room on its page, and no indexed
-- column changed, Postgres writes a heap-only tuple (HOT): no index entry,
-- and the old versions are pruned in place as pages are read. The projects
-- row and the roles are updated by nearly every batch that names their
-- project (the row twice: its status, then its current build); a metrics
-- row about twice in its build's life. Measured on the metrics upsert, 120k
-- updates of 60k rows in batches of 500: 80 of 59,750 updates HOT and
-- 820–910 ms at the default fill (100), 725–750 ms at 75. It applies to
-- pages written from now on; `projector rebuild` writes every page anew.
ALTER TABLE projects SET (fillfactor = 50);
ALTER TABLE projector_roles SET (fillfactor = 50);
ALTER TABLE project_build_metrics SET (fillfactor = 75);
