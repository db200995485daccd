package bench

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/buildstate/buildstate/internal/events"
)

// The seed's approach (../shared/seed): one worker applies each event as it
// comes with direct statements, each its own transaction: phase 1 when a
// build starts (status building, started time, completion cleared), the
// metrics row when metrics are recorded and then phase 2 (the current build
// pointer), the status and completion when it completes. A statement that
// hits one of the two seed constraints (23514 check, 23503 foreign key) is
// retried up to 3 attempts with 100 ms * attempt of backoff, then given up.
// The seed updates rows that exist; here a project's first event creates its
// row (INSERT ... ON CONFLICT), the rest is the seed's UPDATEs.
const (
	baselineQueuedSQL = `
INSERT INTO projects (project_id, build_status, updated_at) VALUES ($1, 'queued', now())
ON CONFLICT (project_id) DO UPDATE SET build_status = 'queued', updated_at = now()`
	baselinePhase1SQL = `
INSERT INTO projects (project_id, build_status, framework, last_build_started, last_build_completed, updated_at)
VALUES ($1, 'building', $2, $3, NULL, now())
ON CONFLICT (project_id) DO UPDATE
SET build_status = 'building', framework = coalesce(excluded.framework, projects.framework),
    last_build_started = excluded.last_build_started, last_build_completed = NULL, updated_at = now()`
	baselineMetricsSQL = `
INSERT INTO project_build_metrics (build_id, project_id, status, started_at, framework, node_version, package_manager, attempt)
VALUES ($1, $2, 'building', $3, $4, $5, $6, $7)
ON CONFLICT (build_id) DO UPDATE
SET framework = excluded.framework, node_version = excluded.node_version,
    package_manager = excluded.package_manager, attempt = excluded.attempt`
	baselinePhase2SQL   = `UPDATE projects SET current_build_id = $2, updated_at = now() WHERE project_id = $1`
	baselineCompleteSQL = `
UPDATE projects SET build_status = $2, last_build_completed = $3, updated_at = now() WHERE project_id = $1`
	baselineCompleteMetricsSQL = `
UPDATE project_build_metrics SET status = $2, completed_at = $3, duration_ms = $4, error = $5 WHERE build_id = $1`
)

// BaselineResult is what the seed's worker did.
type BaselineResult struct {
	Events           int           // events fed to it
	Statements       int           // statements that succeeded
	ConstraintErrors int           // 23514/23503 errors hit, retries included
	GaveUp           int           // statements given up after 3 attempts
	Slept            time.Duration // of the elapsed time, spent in retry backoff
	Elapsed          time.Duration
}

// EventsPerSec is the worker's rate.
func (r BaselineResult) EventsPerSec() float64 { return float64(r.Events) / r.Elapsed.Seconds() }

// Baseline runs the seed's worker over evs (give it workload.Natural
// order) on a fresh database with the same schema.
func (e *Env) Baseline(ctx context.Context, evs []events.Event) (BaselineResult, string, error) {
	url, err := e.NewDatabase(ctx, "baseline")
	if err != nil {
		return BaselineResult{}, "", err
	}
	res, err := RunBaseline(ctx, url, evs)
	return res, url, err
}

// RunBaseline runs the seed's worker over evs on the database at url.
func RunBaseline(ctx context.Context, url string, evs []events.Event) (BaselineResult, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return BaselineResult{}, fmt.Errorf("baseline: %w", err)
	}
	defer conn.Close(ctx)
	res := BaselineResult{Events: len(evs)}
	exec := func(sql string, args ...any) error {
		for attempt := 1; ; attempt++ {
			_, err := conn.Exec(ctx, sql, args...)
			if err == nil {
				res.Statements++
				return nil
			}
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || (pgErr.Code != "23514" && pgErr.Code != "23503") {
				return err
			}
			res.ConstraintErrors++
			if attempt >= 3 {
				res.GaveUp++
				return nil // the seed logs it and goes on to the next event
			}
			wait := time.Duration(attempt) * 100 * time.Millisecond
			res.Slept += wait
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(wait):
			}
		}
	}
	start := time.Now()
	for _, ev := range evs {
		var err error
		d := ev.Data
		switch ev.Kind() {
		case events.KindQueued:
			err = exec(baselineQueuedSQL, ev.ProjectID)
		case events.KindStarted:
			err = exec(baselinePhase1SQL, ev.ProjectID, d.Framework, ev.OccurredAt)
		case events.KindMetricsRecorded:
			if err = exec(baselineMetricsSQL, ev.BuildID, ev.ProjectID, ev.OccurredAt,
				d.Framework, d.NodeVersion, d.PackageManager, d.Attempt); err == nil {
				err = exec(baselinePhase2SQL, ev.ProjectID, ev.BuildID)
			}
		case events.KindCompleted:
			status := map[events.Outcome]string{events.OutcomeSucceeded: "deployed",
				events.OutcomeFailed: "failed", events.OutcomeCanceled: "canceled"}[d.Outcome]
			if err = exec(baselineCompleteSQL, ev.ProjectID, status, ev.OccurredAt); err == nil {
				err = exec(baselineCompleteMetricsSQL, ev.BuildID, string(d.Outcome), ev.OccurredAt, d.DurationMS, d.Error)
			}
		}
		if err != nil {
			return res, fmt.Errorf("baseline: %s %s: %w", ev.Type, ev.ID, err)
		}
	}
	res.Elapsed = time.Since(start)
	return res, nil
}
