package projection

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// LiveSchema is the schema of the live read model (MigratePool migrates it).
const LiveSchema = "public"

// ErrShadowBusy is returned by OpenShadow when another process holds the
// shadow schema of that name (a rebuild or verify is running).
var ErrShadowBusy = errors.New("shadow schema is in use")

// shadowLockClass is the advisory key space (two-int form, next to the
// rebuild gate's gateClass) of the session locks that keep a shadow schema to
// one process: (shadowLockClass, hashtext(name)).
const shadowLockClass = 0x6274

// Shadow is a fresh copy of the read model's tables (every migration applied)
// in a schema of its own, filled by a replay through Store, then swapped in
// for the live tables (Swap), compared with them (Diff), dropped (Drop) or
// left for inspection (Close).
//
// Its store reaches the schema through a pool of its own whose search_path
// is the shadow schema: the store's SQL is unqualified, so the same code
// writes the live model and a shadow. The shadow pool commits without
// waiting for the WAL flush (synchronous_commit off): a shadow lost in a
// crash is rebuilt, and the swap itself commits on the live pool, durably.
// It also runs without JIT compilation (see create).
type Shadow struct {
	name  string
	live  *pgxpool.Pool
	pool  *pgxpool.Pool
	store *Store
	lock  *pgxpool.Conn // holds the session lock on the name
}

// OpenShadow creates the shadow schema name afresh (dropping any left
// there), applies the migrations to it and returns it with a store over it
// (opts as given, but without the rebuild gate). It fails with ErrShadowBusy
// when another process has the same shadow open.
func OpenShadow(ctx context.Context, live *pgxpool.Pool, name string, opts Options) (*Shadow, error) {
	if name == "" || name == LiveSchema || strings.HasPrefix(name, "pg_") {
		return nil, fmt.Errorf("open shadow: %q cannot be a shadow schema", name)
	}
	lock, err := live.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("open shadow %s: %w", name, err)
	}
	var got bool
	if err := lock.QueryRow(ctx, `SELECT pg_try_advisory_lock($1::int4, hashtext($2))`, shadowLockClass, name).Scan(&got); err != nil {
		lock.Release()
		return nil, fmt.Errorf("open shadow %s: lock: %w", name, err)
	}
	if !got {
		lock.Release()
		return nil, fmt.Errorf("open shadow %s: %w (another rebuild or verify is running)", name, ErrShadowBusy)
	}
	s := &Shadow{name: name, live: live, lock: lock}
	if err := s.create(ctx, opts); err != nil {
		s.Close()
		return nil, fmt.Errorf("open shadow %s: %w", name, err)
	}
	return s, nil
}

func (s *Shadow) create(ctx context.Context, opts Options) error {
	if _, err := s.lock.Exec(ctx, `DROP SCHEMA IF EXISTS `+s.ident()+` CASCADE`); err != nil {
		return fmt.Errorf("drop old schema: %w", err)
	}
	cfg := s.live.Config()
	cfg.ConnConfig.RuntimeParams["search_path"] = s.ident()
	cfg.ConnConfig.RuntimeParams["synchronous_commit"] = "off"
	// A bulk load builds each index from all its rows at once: with room to
	// sort them in memory it does not spill to disk (the default 64MB does
	// for the keys of a million facts).
	cfg.ConnConfig.RuntimeParams["maintenance_work_mem"] = "256MB"
	// The replay's statements carry arrays of thousands of rows: their cost
	// estimates pass jit_above_cost, and compiling them took longer than
	// running them (measured: apply took 1.4x to 2.2x as long with JIT on).
	ConfigurePool(cfg)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("pool: %w", err)
	}
	s.pool = pool
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer conn.Release()
	if err := Migrate(ctx, conn.Conn(), s.name); err != nil {
		return err
	}
	opts.Gate = false
	s.store = New(pool, opts)
	return nil
}

// Name is the shadow's schema.
func (s *Shadow) Name() string { return s.name }

// Store writes and reads the shadow's tables.
func (s *Shadow) Store() *Store { return s.store }

// Close releases the shadow's connections and its lock, and leaves the
// schema as it is (for inspection, or for the next OpenShadow to drop).
func (s *Shadow) Close() {
	if s.pool != nil {
		s.pool.Close()
		s.pool = nil
	}
	if s.lock != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := s.lock.Exec(ctx, `SELECT pg_advisory_unlock($1::int4, hashtext($2))`, shadowLockClass, s.name); err != nil {
			// The lock dies with the session: do not hand this one out again.
			_ = s.lock.Conn().Close(ctx)
		}
		s.lock.Release()
		s.lock = nil
	}
}

// Drop removes the shadow schema and closes the shadow.
func (s *Shadow) Drop(ctx context.Context) error {
	if s.pool != nil {
		s.pool.Close()
		s.pool = nil
	}
	defer s.Close()
	if _, err := s.lock.Exec(ctx, `DROP SCHEMA IF EXISTS `+s.ident()+` CASCADE`); err != nil {
		return fmt.Errorf("drop shadow %s: %w", s.name, err)
	}
	return nil
}

func (s *Shadow) ident() string { return pgx.Identifier{s.name}.Sanitize() }

// Swap replaces the live read model with the shadow, atomically, and
// closes the shadow. In one transaction on the live pool it:
//
//  1. takes the rebuild gate exclusive (pg_advisory_xact_lock): every live
//     Apply takes it shared as its first statement, so the batch in flight
//     finishes first and the next ones wait, holding nothing else;
//  2. runs catchUp, which applies the messages stored since the shadow's
//     replay began to the shadow's store (other connections, no gate);
//  3. drops the live tables that the shadow has, moves the shadow's tables
//     (projector_applied, projector_facts, projector_builds and
//     projector_dead_letters with the read model, and schema_version) into
//     the live schema, and drops the empty shadow schema;
//  4. commits.
//
// Readers see the old tables until the commit and the new ones after it,
// never a half-built model. A live projector keeps its durable consumer's
// position: its waiting batch, and everything after, is applied to the new
// tables, where an event that the shadow already has is a duplicate by id
// (projector_applied came with the shadow) and changes nothing, and an event
// it does not have is applied. Since catchUp read the stream up to its end
// under the gate, nothing the projector acknowledged before the swap is
// missing from the new tables: nothing is skipped, nothing applied twice.
//
// Anything else that depends on the live tables (a view, a foreign key from
// another table) makes the drop fail, and then the live model is untouched.
func (s *Shadow) Swap(ctx context.Context, catchUp func(ctx context.Context) error) error {
	err := pgx.BeginFunc(ctx, s.live, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1::int4, $2::int4)`, gateClass, gateID); err != nil {
			return fmt.Errorf("take the rebuild gate: %w", err)
		}
		if catchUp != nil {
			if err := catchUp(ctx); err != nil {
				return fmt.Errorf("catch up: %w", err)
			}
		}
		if err := s.carryFences(ctx, tx); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, shadowTablesSQL, s.name)
		if err != nil {
			return fmt.Errorf("list shadow tables: %w", err)
		}
		tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return fmt.Errorf("list shadow tables: %w", err)
		}
		if len(tables) == 0 {
			return fmt.Errorf("shadow %s has no tables", s.name)
		}
		live := make([]string, len(tables))
		for i, t := range tables {
			live[i] = pgx.Identifier{LiveSchema, t}.Sanitize()
		}
		if _, err := tx.Exec(ctx, `DROP TABLE IF EXISTS `+strings.Join(live, ", ")); err != nil {
			return fmt.Errorf("drop live tables: %w", err)
		}
		for _, t := range tables {
			if _, err := tx.Exec(ctx, `ALTER TABLE `+pgx.Identifier{s.name, t}.Sanitize()+` SET SCHEMA `+pgx.Identifier{LiveSchema}.Sanitize()); err != nil {
				return fmt.Errorf("move %s: %w", t, err)
			}
		}
		if _, err := tx.Exec(ctx, `DROP SCHEMA `+s.ident()); err != nil {
			return fmt.Errorf("drop shadow schema: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("swap %s: %w", s.name, err)
	}
	s.Close()
	return nil
}

// carryFences gives the shadow's projector_partitions, which replaces the
// live one, the live rows with every epoch raised: every fence taken on the
// live table fails at its next commit, on the moved table (ErrFenced), and
// its holder acquires again. A table that restarted at epoch 0 would let an
// owner fenced before the swap match an epoch acquired after it. The live
// table is locked first, so no acquire slips in between.
func (s *Shadow) carryFences(ctx context.Context, tx pgx.Tx) error {
	live := pgx.Identifier{LiveSchema, "projector_partitions"}.Sanitize()
	shadow := pgx.Identifier{s.name, "projector_partitions"}.Sanitize()
	var both bool
	if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL`, live, shadow).Scan(&both); err != nil {
		return fmt.Errorf("carry fences: %w", err)
	}
	if !both {
		return nil
	}
	if _, err := tx.Exec(ctx, `LOCK TABLE `+live+` IN ACCESS EXCLUSIVE MODE`); err != nil {
		return fmt.Errorf("carry fences: %w", err)
	}
	_, err := tx.Exec(ctx, `INSERT INTO `+shadow+` AS p (layout, partition, epoch, owner, applied_seq, acquired_at)
SELECT layout, partition, epoch + 1, '`+rebuildOwner+`', applied_seq, now() FROM `+live+`
ON CONFLICT (layout, partition) DO UPDATE SET epoch = EXCLUDED.epoch, owner = EXCLUDED.owner,
    applied_seq = greatest(p.applied_seq, EXCLUDED.applied_seq), acquired_at = EXCLUDED.acquired_at`)
	if err != nil {
		return fmt.Errorf("carry fences: %w", err)
	}
	return nil
}

// Analyze refreshes the planner's statistics of the shadow's tables. Fresh
// tables have none, and until autovacuum comes by the planner takes them for
// nearly empty: it picks sequential scans with the batch's id arrays as
// filters, whose cost grows with table size times batch size (measured:
// the replay of 77k events at 1000 per batch ran at ~300 events/s). A replay
// calls it as the tables grow; the statistics move with the tables on Swap.
func (s *Shadow) Analyze(ctx context.Context) error {
	rows, err := s.lock.Query(ctx, shadowTablesSQL, s.name)
	if err != nil {
		return fmt.Errorf("analyze %s: %w", s.name, err)
	}
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("analyze %s: %w", s.name, err)
	}
	idents := make([]string, len(tables))
	for i, t := range tables {
		idents[i] = pgx.Identifier{s.name, t}.Sanitize()
	}
	if _, err := s.lock.Exec(ctx, `ANALYZE `+strings.Join(idents, ", ")); err != nil {
		return fmt.Errorf("analyze %s: %w", s.name, err)
	}
	return nil
}

const shadowTablesSQL = `
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname`

// Sides of a Diff row.
const (
	SideLive   = "live"
	SideShadow = "shadow"
)

// DiffRow is a row found on one side only (a row that differs shows as one
// DiffRow per side). One of Project and Metrics is set; Project.UpdatedAt is
// not compared and left zero.
type DiffRow struct {
	Side    string
	Project *ProjectRow
	Metrics *MetricsRow
}

// Diff is what differs between the live read model and a shadow.
type Diff struct {
	Projects int       // projects rows on one side only, both sides counted
	Metrics  int       // project_build_metrics rows on one side only
	Rows     []DiffRow // the first of them: projects by id then metrics by build id, live before shadow
}

// Empty reports whether the two models are equal.
func (d Diff) Empty() bool { return d.Projects == 0 && d.Metrics == 0 }

const diffProjectCols = `project_id, build_status, current_build_id, last_build_started, last_build_completed, framework`

// The two EXCEPTs compare whole rows, NULL equal to NULL.
const diffProjectsSQL = `
WITH l AS (SELECT ` + diffProjectCols + ` FROM %[1]s.projects),
     r AS (SELECT ` + diffProjectCols + ` FROM %[2]s.projects),
     d AS (SELECT 'live' AS side, * FROM (SELECT * FROM l EXCEPT SELECT * FROM r) AS x
           UNION ALL
           SELECT 'shadow', * FROM (SELECT * FROM r EXCEPT SELECT * FROM l) AS y)
SELECT count(*) OVER (), side, ` + diffProjectCols + ` FROM d ORDER BY project_id COLLATE "C", side LIMIT $1`

const diffMetricsSQL = `
WITH l AS (SELECT ` + metricsColumns + ` FROM %[1]s.project_build_metrics),
     r AS (SELECT ` + metricsColumns + ` FROM %[2]s.project_build_metrics),
     d AS (SELECT 'live' AS side, * FROM (SELECT * FROM l EXCEPT SELECT * FROM r) AS x
           UNION ALL
           SELECT 'shadow', * FROM (SELECT * FROM r EXCEPT SELECT * FROM l) AS y)
SELECT count(*) OVER (), side, ` + metricsColumns + ` FROM d ORDER BY build_id COLLATE "C", side LIMIT $1`

// Diff compares the shadow's projects and project_build_metrics with the
// live ones, row by row over every column but projects.updated_at, in one
// repeatable-read snapshot. It returns at most limit rows of each table.
func (s *Shadow) Diff(ctx context.Context, limit int) (Diff, error) {
	var d Diff
	live, shadow := pgx.Identifier{LiveSchema}.Sanitize(), s.ident()
	err := pgx.BeginTxFunc(ctx, s.live, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, fmt.Sprintf(diffProjectsSQL, live, shadow), limit)
		if err != nil {
			return fmt.Errorf("diff projects: %w", err)
		}
		var n int
		var r ProjectRow
		var side string
		if _, err := pgx.ForEachRow(rows, []any{&n, &side, &r.ProjectID, &r.BuildStatus, &r.CurrentBuildID,
			&r.LastBuildStarted, &r.LastBuildCompleted, &r.Framework}, func() error {
			d.Projects = n
			row := r
			d.Rows = append(d.Rows, DiffRow{Side: side, Project: &row})
			return nil
		}); err != nil {
			return fmt.Errorf("diff projects: %w", err)
		}
		rows, err = tx.Query(ctx, fmt.Sprintf(diffMetricsSQL, live, shadow), limit)
		if err != nil {
			return fmt.Errorf("diff metrics: %w", err)
		}
		var m MetricsRow
		if _, err := pgx.ForEachRow(rows, []any{&n, &side, &m.BuildID, &m.ProjectID, &m.Status, &m.StartedAt,
			&m.CompletedAt, &m.DurationMS, &m.Framework, &m.NodeVersion, &m.PackageManager, &m.Attempt, &m.Error,
			&m.QueuedAt}, func() error {
			d.Metrics = n
			row := m
			d.Rows = append(d.Rows, DiffRow{Side: side, Metrics: &row})
			return nil
		}); err != nil {
			return fmt.Errorf("diff metrics: %w", err)
		}
		return nil
	})
	if err != nil {
		return Diff{}, fmt.Errorf("compare %s with %s: %w", s.name, LiveSchema, err)
	}
	return d, nil
}

// Fault is a row that breaks a rule the read model must keep.
type Fault struct {
	Check  string `json:"check"`  // the rule (the constraint's name where there is one)
	Key    string `json:"key"`    // project_id or build_id of the row
	Detail string `json:"detail"` // what is wrong, with the values
}

// The rules as queries on the rows themselves, so that they also catch rows
// written while a constraint was dropped or NOT VALID. Each condition is on
// the columns, not on an output alias: WHERE is evaluated before SELECT
// names its outputs.
const checkSQL = `
SELECT * FROM (
SELECT 'projects_build_timing_logical' AS rule, project_id AS key,
       format('last_build_completed %s is before last_build_started %s', last_build_completed, last_build_started)
FROM projects
WHERE last_build_completed < last_build_started
UNION ALL
SELECT 'projects_current_build_fk', p.project_id,
       format('current_build_id %s has no project_build_metrics row', p.current_build_id)
FROM projects p
WHERE p.current_build_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM project_build_metrics m WHERE m.build_id = p.current_build_id)
UNION ALL
SELECT 'projects_current_build_owner', p.project_id,
       format('current_build_id %s is a build of project %s', p.current_build_id, m.project_id)
FROM projects p JOIN project_build_metrics m ON m.build_id = p.current_build_id
WHERE m.project_id <> p.project_id
UNION ALL
SELECT 'project_build_metrics_timing_logical', build_id,
       format('completed_at %s is before started_at %s', completed_at, started_at)
FROM project_build_metrics
WHERE completed_at < started_at
) AS faults
ORDER BY rule COLLATE "C", key COLLATE "C"
LIMIT $1`

// Check returns up to limit rows of the store's read model that break the
// seed's two constraints (timing, current build has metrics), the metrics
// timing rule, or point at another project's build as current.
func (s *Store) Check(ctx context.Context, limit int) ([]Fault, error) {
	rows, err := s.pool.Query(ctx, checkSQL, limit)
	if err != nil {
		return nil, fmt.Errorf("check read model: %w", err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[Fault])
	if err != nil {
		return nil, fmt.Errorf("check read model: %w", err)
	}
	return out, nil
}
