package projection

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// ProjectRow is a projects row as stored.
type ProjectRow struct {
	ProjectID          string     `json:"project_id"`
	BuildStatus        string     `json:"build_status"`
	CurrentBuildID     *string    `json:"current_build_id"`
	LastBuildStarted   *time.Time `json:"last_build_started"`
	LastBuildCompleted *time.Time `json:"last_build_completed"`
	Framework          *string    `json:"framework"`
	UpdatedAt          time.Time  `json:"updated_at"`
}

// MetricsRow is a project_build_metrics row as stored.
type MetricsRow struct {
	BuildID        string     `json:"build_id"`
	ProjectID      string     `json:"project_id"`
	Status         string     `json:"status"`
	StartedAt      time.Time  `json:"started_at"`
	CompletedAt    *time.Time `json:"completed_at"`
	DurationMS     *int64     `json:"duration_ms"`
	Framework      *string    `json:"framework"`
	NodeVersion    *string    `json:"node_version"`
	PackageManager *string    `json:"package_manager"`
	Attempt        *int64     `json:"attempt"`
	Error          *string    `json:"error"`
	QueuedAt       *time.Time `json:"queued_at"`
}

// DeadLetter is a kept message that could not be applied.
type DeadLetter struct {
	StreamSeq uint64    `json:"stream_seq"`
	Subject   string    `json:"subject"`
	Reason    string    `json:"reason"`
	Detail    string    `json:"detail"`
	Payload   []byte    `json:"-"`
	StoredAt  time.Time `json:"stored_at"`
	DeadAt    time.Time `json:"dead_at"`
	Retries   int       `json:"retries"`
}

const projectColumns = `project_id, build_status, current_build_id, last_build_started, last_build_completed, framework, updated_at`

const metricsColumns = `build_id, project_id, status, started_at, completed_at, duration_ms, framework, node_version, package_manager, attempt, error, queued_at`

// Project returns one project's row, or pgx.ErrNoRows.
func (s *Store) Project(ctx context.Context, projectID string) (ProjectRow, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+projectColumns+` FROM projects WHERE project_id = $1`, projectID)
	if err != nil {
		return ProjectRow{}, fmt.Errorf("read project %s: %w", projectID, err)
	}
	r, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByPos[ProjectRow])
	if err != nil {
		return ProjectRow{}, fmt.Errorf("read project %s: %w", projectID, err)
	}
	return r, nil
}

// RecentBuilds returns a project's metrics rows, newest first.
func (s *Store) RecentBuilds(ctx context.Context, projectID string, limit int) ([]MetricsRow, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+metricsColumns+` FROM project_build_metrics
		WHERE project_id = $1 ORDER BY started_at DESC, build_id DESC LIMIT $2`, projectID, limit)
	if err != nil {
		return nil, fmt.Errorf("read builds of %s: %w", projectID, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[MetricsRow])
	if err != nil {
		return nil, fmt.Errorf("read builds of %s: %w", projectID, err)
	}
	return out, nil
}

// Projects returns every projects row ordered by project id.
func (s *Store) Projects(ctx context.Context) ([]ProjectRow, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+projectColumns+` FROM projects ORDER BY project_id`)
	if err != nil {
		return nil, fmt.Errorf("read projects: %w", err)
	}
	return pgx.CollectRows(rows, pgx.RowToStructByPos[ProjectRow])
}

// Metrics returns every project_build_metrics row ordered by build id.
func (s *Store) Metrics(ctx context.Context) ([]MetricsRow, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+metricsColumns+` FROM project_build_metrics ORDER BY build_id`)
	if err != nil {
		return nil, fmt.Errorf("read metrics: %w", err)
	}
	return pgx.CollectRows(rows, pgx.RowToStructByPos[MetricsRow])
}

// DeadLetterFilter selects dead letters; zero values match all.
type DeadLetterFilter struct {
	Reason string
	Seq    uint64
}

// DeadLetters returns kept messages in stream order.
func (s *Store) DeadLetters(ctx context.Context, f DeadLetterFilter) ([]DeadLetter, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT stream_seq, subject, reason, detail, payload, stored_at, dead_at, retries
		FROM projector_dead_letters
		WHERE ($1 = '' OR reason = $1) AND ($2::bigint = 0 OR stream_seq = $2)
		ORDER BY stream_seq`, f.Reason, int64(f.Seq))
	if err != nil {
		return nil, fmt.Errorf("read dead letters: %w", err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[DeadLetter])
	if err != nil {
		return nil, fmt.Errorf("read dead letters: %w", err)
	}
	return out, nil
}

// Retry re-drives the dead letters f selects: each is applied again as the
// message it was (same sequence, subject, payload and stored time). One that
// now applies, or turns out to be a duplicate, leaves the dead-letter table;
// one still invalid stays with its new reason and a raised retry count.
// Running it twice changes nothing more.
func (s *Store) Retry(ctx context.Context, f DeadLetterFilter) (Result, error) {
	dls, err := s.DeadLetters(ctx, f)
	if err != nil {
		return Result{}, err
	}
	if len(dls) == 0 {
		return Result{}, nil
	}
	msgs := make([]Message, len(dls))
	b := batch{retries: map[uint64]int{}}
	for i, d := range dls {
		msgs[i] = Message{Seq: d.StreamSeq, Subject: d.Subject, Data: d.Payload, StoredAt: d.StoredAt}
		b.redrive = append(b.redrive, int64(d.StreamSeq))
		b.retries[d.StreamSeq] = d.Retries + 1
	}
	res, err := s.apply(ctx, msgs, b)
	if err != nil {
		return Result{}, fmt.Errorf("retry dead letters: %w", err)
	}
	return res, nil
}

// StuckBuild is a build whose worker has not reported for too long.
type StuckBuild struct {
	BuildID   string    `json:"build_id"`
	ProjectID string    `json:"project_id"`
	State     string    `json:"state"` // StuckQueued or StuckBuilding
	Since     time.Time `json:"since"` // occurred_at of the build's queued or started event
}

// The states of a StuckBuild.
const (
	StuckQueued   = "queued"   // queued, no start, no completion
	StuckBuilding = "building" // started, no completion
)

// stuckSQL reads the stuck builds from projector_facts, the only table that
// knows of a queued build with no start (it has no metrics row, and the
// projects row shows the newest build only). It reads the pending facts
// alone (a queued or started fact whose build has no completion: pending,
// migration 004) through the partial index projector_facts_pending_idx,
// which holds nothing else, so the work is proportional to the builds still
// open, not to the history; a queued fact's "no start" is one probe of the
// primary key (build_id, kind).
const stuckSQL = `
SELECT f.build_id, f.project_id, CASE f.kind WHEN 'queued' THEN 'queued' ELSE 'building' END, f.occurred_at
FROM projector_facts f
WHERE f.pending
  AND ((f.kind = 'started' AND f.occurred_at <= $2)
    OR (f.kind = 'queued' AND f.occurred_at <= $1
        AND NOT EXISTS (SELECT 1 FROM projector_facts s WHERE s.build_id = f.build_id AND s.kind = 'started')))
ORDER BY f.occurred_at, f.build_id`

// Stuck lists the builds queued at or before queuedBefore that have no start,
// and those started at or before startedBefore that have no completion,
// oldest first.
func (s *Store) Stuck(ctx context.Context, queuedBefore, startedBefore time.Time) ([]StuckBuild, error) {
	rows, err := s.pool.Query(ctx, stuckSQL, queuedBefore, startedBefore)
	if err != nil {
		return nil, fmt.Errorf("read stuck builds: %w", err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[StuckBuild])
	if err != nil {
		return nil, fmt.Errorf("read stuck builds: %w", err)
	}
	for i := range out {
		out[i].Since = out[i].Since.UTC()
	}
	return out, nil
}
