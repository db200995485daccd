package projection

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// The queries behind the status page (internal/web) and `projector status`.

// ProjectPageQuery selects a page of projects ordered by project id.
type ProjectPageQuery struct {
	Search string // a substring of the project id, case-insensitive; "" matches all
	Offset int
	Limit  int
}

// ProjectPage is one page of projects and how many match in all.
type ProjectPage struct {
	Rows  []ProjectRow
	Total int
}

// ProjectPage returns the projects q selects, and the number matching, read
// in one snapshot.
func (s *Store) ProjectPage(ctx context.Context, q ProjectPageQuery) (ProjectPage, error) {
	var page ProjectPage
	pattern := "%" + likeEscaper.Replace(q.Search) + "%"
	err := pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM projects WHERE project_id ILIKE $1`, pattern).Scan(&page.Total); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT `+projectColumns+` FROM projects WHERE project_id ILIKE $1
			ORDER BY project_id LIMIT $2 OFFSET $3`, pattern, q.Limit, q.Offset)
		if err != nil {
			return err
		}
		page.Rows, err = pgx.CollectRows(rows, pgx.RowToStructByPos[ProjectRow])
		return err
	})
	if err != nil {
		return ProjectPage{}, fmt.Errorf("read projects page: %w", err)
	}
	return page, nil
}

// likeEscaper makes a search string match literally in LIKE (whose default
// escape character is the backslash).
var likeEscaper = strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`)

// TimelineEntry is one lifecycle event of a build that counts for the read
// model: the winning event of its build and kind (projector_facts).
type TimelineEntry struct {
	BuildID    string    `json:"build_id"`
	Kind       string    `json:"kind"`
	OccurredAt time.Time `json:"occurred_at"`
	StreamSeq  int64     `json:"stream_seq"`
	EventID    string    `json:"event_id"`
	Outcome    *string   `json:"outcome"`
	Error      *string   `json:"error"`
}

// Timeline returns a project's lifecycle events, newest first.
func (s *Store) Timeline(ctx context.Context, projectID string, limit int) ([]TimelineEntry, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT f.build_id, f.kind, f.occurred_at, f.stream_seq, f.event_id, f.outcome, f.error
		FROM projector_builds b JOIN projector_facts f ON f.build_id = b.build_id
		WHERE b.project_id = $1
		ORDER BY f.occurred_at DESC, f.stream_seq DESC LIMIT $2`, projectID, limit)
	if err != nil {
		return nil, fmt.Errorf("read timeline of %s: %w", projectID, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[TimelineEntry])
	if err != nil {
		return nil, fmt.Errorf("read timeline of %s: %w", projectID, err)
	}
	return out, nil
}

// NewestBuild returns the id of a project's newest build (the one its
// build_status is taken from), or "" when the project has none.
func (s *Store) NewestBuild(ctx context.Context, projectID string) (string, error) {
	var id *string
	err := s.pool.QueryRow(ctx, `SELECT newest_build FROM projector_roles WHERE project_id = $1`, projectID).Scan(&id)
	if err == pgx.ErrNoRows {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read newest build of %s: %w", projectID, err)
	}
	if id == nil {
		return "", nil
	}
	return *id, nil
}

// DeadLetterCount returns how many messages are kept as dead letters.
func (s *Store) DeadLetterCount(ctx context.Context) (int, error) {
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM projector_dead_letters`).Scan(&n); err != nil {
		return 0, fmt.Errorf("count dead letters: %w", err)
	}
	return n, nil
}

// DeadLetterReasons returns the reasons dead letters are kept for, in order.
func (s *Store) DeadLetterReasons(ctx context.Context) ([]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT DISTINCT reason FROM projector_dead_letters ORDER BY reason`)
	if err != nil {
		return nil, fmt.Errorf("read dead-letter reasons: %w", err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("read dead-letter reasons: %w", err)
	}
	return out, nil
}
