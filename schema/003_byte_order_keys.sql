-- Keys in byte order. The ids are ASCII or opaque, and the projector
-- compares them by bytes (the contract's tie break); a linguistic default
-- collation (en_US.UTF-8, or even C.UTF-8 through glibc) compares each pair
-- with strcoll and cannot use abbreviated keys when it sorts. With "C" the
-- key indexes cost half as much to build (measured: 900,000 keys in 1.1 s
-- instead of 2.1 s), which is most of a rebuild's index work, and every
-- lookup compares bytes. Lists ordered by these columns come in byte order.
ALTER TABLE projects DROP CONSTRAINT projects_current_build_fk;

ALTER TABLE project_build_metrics
    ALTER COLUMN build_id TYPE text COLLATE "C",
    ALTER COLUMN project_id TYPE text COLLATE "C";
ALTER TABLE projects
    ALTER COLUMN project_id TYPE text COLLATE "C",
    ALTER COLUMN current_build_id TYPE text COLLATE "C";
ALTER TABLE projector_builds
    ALTER COLUMN build_id TYPE text COLLATE "C",
    ALTER COLUMN project_id TYPE text COLLATE "C";
ALTER TABLE projector_facts
    ALTER COLUMN build_id TYPE text COLLATE "C",
    ALTER COLUMN kind TYPE text COLLATE "C",
    ALTER COLUMN project_id TYPE text COLLATE "C",
    ALTER COLUMN event_id TYPE text COLLATE "C";
ALTER TABLE projector_roles
    ALTER COLUMN project_id TYPE text COLLATE "C";
ALTER TABLE projector_applied
    ALTER COLUMN event_id TYPE text COLLATE "C";

ALTER TABLE projects ADD CONSTRAINT projects_current_build_fk
    FOREIGN KEY (current_build_id) REFERENCES project_build_metrics (build_id);
