package projection

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
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
	StreamSeq uint64 `json:"stream_seq"`
	// Subject is the subject as text; when the subject is not valid UTF-8
	// or holds NUL, that text shows U+FFFD and SubjectBytes has its bytes.
	Subject      string    `json:"subject"`
	SubjectBytes []byte    `json:"-"`
	Prefix       string    `json:"subject_prefix,omitempty"` // the prefix it was kept under ("": unknown)
	Reason       string    `json:"reason"`
	Detail       string    `json:"detail"`
	Payload      []byte    `json:"-"`
	StoredAt     time.Time `json:"stored_at"`
	DeadAt       time.Time `json:"dead_at"`
	Retries      int       `json:"retries"`
}

// RawSubject is the subject byte for byte.
func (d DeadLetter) RawSubject() string {
	if d.SubjectBytes != nil {
		return string(d.SubjectBytes)
	}
	return d.Subject
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
	After  uint64 // only sequences above this
	Limit  int    // at most this many (0: all)
}

// DeadLetters returns kept messages in stream order.
func (s *Store) DeadLetters(ctx context.Context, f DeadLetterFilter) ([]DeadLetter, error) {
	limit := int64(f.Limit)
	if limit <= 0 {
		limit = -1
	}
	rows, err := s.pool.Query(ctx, `
		SELECT stream_seq, subject, subject_bytes, coalesce(subject_prefix, ''), reason, detail, payload, stored_at, dead_at, retries
		FROM projector_dead_letters
		WHERE ($1 = '' OR reason = $1) AND ($2::bigint = 0 OR stream_seq = $2) AND stream_seq > $3
		ORDER BY stream_seq
		LIMIT CASE WHEN $4::bigint < 0 THEN NULL ELSE $4::bigint END`, f.Reason, int64(f.Seq), int64(f.After), limit)
	if err != nil {
		return nil, fmt.Errorf("read dead letters: %w", err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[DeadLetter])
	if err != nil {
		return nil, fmt.Errorf("read dead letters: %w", err)
	}
	return out, nil
}

// retryChunk is how many dead letters Retry re-drives in one transaction.
const retryChunk = 500

// retryAcquires bounds how often one Retry acquires the partition.
const retryAcquires = 20

// Retry re-drives the dead letters f selects (f.After and f.Limit aside),
// retryChunk at a time in stream order: each is applied again as the
// message it was (same sequence, subject bytes, payload and stored time),
// decoded under the subject prefix it was kept under. One that now applies,
// or turns out to be a duplicate, leaves the dead-letter table; one still
// refused stays with its new reason and a raised retry count. Running it
// twice changes nothing more.
//
// Retry writes as the partition's owner: it acquires the partition (the
// live projector's next batch is fenced, and it acquires again, with a fresh
// memory), and when the live projector takes it back between two chunks it
// acquires again, up to retryAcquires times.
func (s *Store) Retry(ctx context.Context, f DeadLetterFilter) (Result, error) {
	var total Result
	f.After, f.Limit = 0, retryChunk
	layout, err := s.partitionedLayout(ctx)
	if err != nil {
		return total, fmt.Errorf("retry dead letters: %w", err)
	}
	fences := map[partitionKey]*Fence{}
	acquires := 0
	// applyOwned applies under the partition's fence, acquiring it when it has none.
	applyOwned := func(under *Store, k partitionKey, msgs []Message, retries map[uint64]int) (Result, error) {
		for {
			if fences[k] == nil {
				if acquires++; acquires > retryAcquires {
					return Result{}, fmt.Errorf("the live projector took the partition back %d times; run it again", retryAcquires)
				}
				fc, err := s.Acquire(ctx, k.layout, k.partition, "dead-letters retry")
				if err != nil {
					return Result{}, err
				}
				fences[k] = fc
			}
			res, err := under.applyIsolating(ctx, fences[k], msgs, retries)
			if !errors.Is(err, ErrFenced) {
				return res, err
			}
			fences[k] = nil
		}
	}
	type group struct {
		prefix string
		key    partitionKey
	}
	for {
		dls, err := s.DeadLetters(ctx, f)
		if err != nil {
			return total, err
		}
		if len(dls) == 0 {
			return total, nil
		}
		f.After = dls[len(dls)-1].StreamSeq
		// One apply per prefix the letters were kept under and partition
		// they belong to.
		byGroup := map[group][]DeadLetter{}
		var groups []group
		for _, d := range dls {
			p := cmp.Or(d.Prefix, s.opts.Prefix)
			g := group{p, partitionOf(layout, p, d.RawSubject())}
			if byGroup[g] == nil {
				groups = append(groups, g)
			}
			byGroup[g] = append(byGroup[g], d)
		}
		for _, g := range groups {
			under := *s
			under.opts.Prefix = g.prefix
			msgs := make([]Message, 0, len(byGroup[g]))
			retries := map[uint64]int{}
			for _, d := range byGroup[g] {
				msgs = append(msgs, Message{Seq: d.StreamSeq, Subject: d.RawSubject(), Data: d.Payload, StoredAt: d.StoredAt})
				retries[d.StreamSeq] = d.Retries + 1
			}
			res, err := applyOwned(&under, g.key, msgs, retries)
			if err != nil {
				return total, fmt.Errorf("retry dead letters: %w", err)
			}
			total.add(res)
		}
	}
}

// partitionKey names a row of projector_partitions.
type partitionKey struct {
	layout    string
	partition int
}

// partitionOf is the row of projector_partitions whose writer holds a
// message stored on subject (events.Layout.SubjectPartition): p1's for a
// stray, which names no project.
func partitionOf(layout events.Layout, prefix, subject string) partitionKey {
	if k, ok := layout.SubjectPartition(prefix, subject); ok && layout.Partitioned() {
		return partitionKey{layout.Name(), k}
	}
	return partitionKey{LayoutP1, 0}
}

// partitionedLayout is the partitioned layout projectors write under (a
// stream has one at a time: natsjs.EnsureLayout; a repartition retires the
// former one's rows for good, RetireLayouts), or p1.
func (s *Store) partitionedLayout(ctx context.Context) (events.Layout, error) {
	var name string
	err := s.pool.QueryRow(ctx, `SELECT layout FROM projector_partitions WHERE layout <> $1 AND owner NOT LIKE 'retired:%' ORDER BY acquired_at DESC NULLS LAST LIMIT 1`, LayoutP1).Scan(&name)
	if errors.Is(err, pgx.ErrNoRows) {
		return events.Layout{Partitions: 1}, nil
	}
	if err != nil {
		return events.Layout{}, fmt.Errorf("layout: %w", err)
	}
	return events.ParseLayout(name)
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
	StuckQueued   = fsm.WaitingStart  // queued, no start, no completion
	StuckBuilding = fsm.WaitingFinish // started, no completion
)

// stuckSQL reads the stuck builds from projector_open_builds (migration
// 007), which holds the builds waiting on their worker and nothing else: a
// queued build with no start has no metrics row, and the projects row shows
// the newest build only. The work is proportional to the builds still open,
// not to the history.
const stuckSQL = `
SELECT o.build_id, o.project_id, o.state, o.since
FROM projector_open_builds o
WHERE (o.state = 'building' AND o.since <= $2) OR (o.state = 'queued' AND o.since <= $1)
ORDER BY o.since, o.build_id`

// StuckLimits say how long a build may wait on its worker before it is stuck.
type StuckLimits struct {
	QueuedFor   time.Duration // queued, with no start
	BuildingFor time.Duration // started, with no completion
}

// DefaultStuckLimits are an hour queued and three hours building: the
// defaults of `projector stuck`, of the buildstate_builds_stuck gauge and of
// the status page.
var DefaultStuckLimits = StuckLimits{QueuedFor: time.Hour, BuildingFor: 3 * time.Hour}

// Check refuses limits that are not positive.
func (l StuckLimits) Check() error {
	if l.QueuedFor <= 0 || l.BuildingFor <= 0 {
		return fmt.Errorf("stuck limits must be positive: queued-for %s, building-for %s", l.QueuedFor, l.BuildingFor)
	}
	return nil
}

// Stuck lists the builds stuck at now under l (queued at or before
// now - l.QueuedFor with no start; started at or before now - l.BuildingFor
// with no completion), oldest first.
func (s *Store) Stuck(ctx context.Context, l StuckLimits, now time.Time) ([]StuckBuild, error) {
	rows, err := s.pool.Query(ctx, stuckSQL, now.Add(-l.QueuedFor), now.Add(-l.BuildingFor))
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

// StuckCounts is how many builds are stuck, by the step they are stuck at.
type StuckCounts struct {
	Queued  int // queued, no start, no completion
	Started int // started, no completion
}

// Total is the number of stuck builds.
func (c StuckCounts) Total() int { return c.Queued + c.Started }

// StuckCounts counts what Stuck lists.
func (s *Store) StuckCounts(ctx context.Context, l StuckLimits, now time.Time) (StuckCounts, error) {
	var c StuckCounts
	err := s.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE s.state = 'queued'), count(*) FILTER (WHERE s.state = 'building')
		FROM (`+stuckSQL+`) AS s (build_id, project_id, state, since)`,
		now.Add(-l.QueuedFor), now.Add(-l.BuildingFor)).Scan(&c.Queued, &c.Started)
	if err != nil {
		return StuckCounts{}, fmt.Errorf("count stuck builds: %w", err)
	}
	return c, nil
}
