package projection

import (
	"context"
	"fmt"
	"iter"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
)

// Bulk is a whole read model computed outside the database from the log
// (replay.Fold folds it with the store's rules), for Shadow.Load to write
// into a fresh shadow in one go.
type Bulk struct {
	// Projects yields every project with at least one applied event.
	Projects iter.Seq[*BulkProject]
	// Applied yields every applied event id with its first sequence.
	Applied iter.Seq[Applied]
	// Dead yields the messages the store would have dead-lettered.
	Dead iter.Seq[Refusal]
}

// BulkProject is a project and its builds.
type BulkProject struct {
	ID     string
	Builds []*BulkBuild
}

// BulkBuild is a build with, for each winning step, the stream sequence of
// the message that carried it (projector_facts.stream_seq).
type BulkBuild struct {
	fsm.Build
	Seqs [4]uint64 // by KindSlot
}

// KindSlot is the index of kind k in BulkBuild.Seqs.
func KindSlot(k events.Kind) int {
	switch k {
	case events.KindQueued:
		return 0
	case events.KindStarted:
		return 1
	case events.KindMetricsRecorded:
		return 2
	default:
		return 3
	}
}

var slotKinds = [4]events.Kind{events.KindQueued, events.KindStarted, events.KindMetricsRecorded, events.KindCompleted}

// Applied is a projector_applied row: an event id that counted, the digest
// of its content and the sequence of its first copy.
type Applied struct {
	EventID string
	Digest  [32]byte
	Seq     uint64
}

// Refusal is a message the projector cannot apply, with its reason: a
// projector_dead_letters row.
type Refusal struct {
	Msg    Message
	Reason events.Reason
	Detail string
}

// RefusalOf is msg refused with err (an error matching events.ErrInvalid).
func RefusalOf(msg Message, err error) Refusal {
	return Refusal{Msg: msg, Reason: events.ReasonOf(err), Detail: detailOf(err)}
}

// LoadStats counts the rows Load wrote, by table.
type LoadStats map[string]int

// Load writes b into the shadow's tables, which must be empty (as
// OpenShadow leaves them), with COPY: the same rows the store's Apply
// would have written for the same log, projects.updated_at and
// projector_dead_letters.dead_at aside (both are "now"). Two connections
// write at once: projector_applied, projector_dead_letters,
// projector_builds and projector_roles on one; project_build_metrics, then
// projects (whose current build must have its metrics row), then
// projector_facts on the other. Each COPY commits on its own: a shadow is
// not live until Swap, and a failed load leaves a shadow that the next
// OpenShadow drops.
func (s *Shadow) Load(ctx context.Context, b Bulk) (LoadStats, error) {
	stats := LoadStats{}
	counts := make([]int64, 7)
	now := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		var err error
		if counts[0], err = s.copy(gctx, "projector_applied", appliedColumns, appliedRows(b.Applied)); err != nil {
			return err
		}
		if counts[1], err = s.copy(gctx, "projector_dead_letters", deadColumns, deadRows(b.Dead, now)); err != nil {
			return err
		}
		if counts[2], err = s.copy(gctx, "projector_builds", []string{"build_id", "project_id"}, buildRows(b.Projects)); err != nil {
			return err
		}
		counts[3], err = s.copy(gctx, "projector_roles", rolesColumns, roleRows(b.Projects))
		return err
	})
	g.Go(func() error {
		var rows []*fsm.Row // written once every metrics row is in
		var err error
		if counts[4], err = s.copy(gctx, "project_build_metrics", loadMetricsColumns, metricsRows(b.Projects, &rows)); err != nil {
			return err
		}
		if counts[5], err = s.copy(gctx, "projects", projectsColumns, projectRows(rows, now)); err != nil {
			return err
		}
		counts[6], err = s.copy(gctx, "projector_facts", factsColumns, factRows(b.Projects))
		return err
	})
	err := g.Wait()
	for i, t := range []string{"projector_applied", "projector_dead_letters", "projector_builds", "projector_roles",
		"project_build_metrics", "projects", "projector_facts"} {
		stats[t] = int(counts[i])
	}
	if err != nil {
		return stats, fmt.Errorf("load shadow %s: %w", s.name, err)
	}
	return stats, nil
}

// copy streams rows into table with COPY on a connection of the shadow's pool.
func (s *Shadow) copy(ctx context.Context, table string, columns []string, rows iter.Seq[[]any]) (int64, error) {
	next, stop := iter.Pull(rows)
	defer stop()
	n, err := s.pool.CopyFrom(ctx, pgx.Identifier{table}, columns, pgx.CopyFromFunc(func() ([]any, error) {
		row, ok := next()
		if !ok {
			return nil, nil
		}
		return row, nil
	}))
	if err != nil {
		return n, fmt.Errorf("copy into %s: %w", table, err)
	}
	return n, nil
}

// The row functions below reuse one []any per table: CopyFrom encodes a
// row before it asks for the next.

var appliedColumns = []string{"event_id", "digest", "stream_seq"}

func appliedRows(applied iter.Seq[Applied]) iter.Seq[[]any] {
	return func(yield func([]any) bool) {
		row := make([]any, 3)
		for a := range applied {
			row[0], row[1], row[2] = a.EventID, a.Digest[:], int64(a.Seq)
			if !yield(row) {
				return
			}
		}
	}
}

var deadColumns = []string{"stream_seq", "subject", "reason", "detail", "payload", "stored_at", "dead_at", "retries"}

func deadRows(dead iter.Seq[Refusal], now time.Time) iter.Seq[[]any] {
	return func(yield func([]any) bool) {
		if dead == nil {
			return
		}
		row := make([]any, 8)
		for d := range dead {
			at := d.Msg.StoredAt
			if at.IsZero() {
				at = now
			}
			row[0], row[1], row[2], row[3] = int64(d.Msg.Seq), d.Msg.Subject, string(d.Reason), d.Detail
			row[4], row[5], row[6], row[7] = nonNil(d.Msg.Data), at, now, int32(0)
			if !yield(row) {
				return
			}
		}
	}
}

func buildRows(projects iter.Seq[*BulkProject]) iter.Seq[[]any] {
	return func(yield func([]any) bool) {
		row := make([]any, 2)
		for p := range projects {
			for _, b := range p.Builds {
				row[0], row[1] = b.ID, p.ID
				if !yield(row) {
					return
				}
			}
		}
	}
}

var rolesColumns = []string{"project_id", "newest_build", "started_build", "current_build", "framework_build"}

func roleRows(projects iter.Seq[*BulkProject]) iter.Seq[[]any] {
	return func(yield func([]any) bool) {
		row := make([]any, 5)
		for p := range projects {
			r := fsm.RolesOf(p.builds())
			// The store writes a project's roles when they change from none;
			// the newest build is the first role any build takes.
			if r.Newest == "" {
				continue
			}
			row[0], row[1], row[2], row[3], row[4] = p.ID, orNull(r.Newest), orNull(r.Started), orNull(r.Current), orNull(r.Framework)
			if !yield(row) {
				return
			}
		}
	}
}

var loadMetricsColumns = []string{"build_id", "project_id", "status", "started_at", "completed_at", "duration_ms",
	"framework", "node_version", "package_manager", "attempt", "error", "queued_at"}

// metricsRows yields the metrics rows of every project and collects the
// projects rows into *rows.
func metricsRows(projects iter.Seq[*BulkProject], rows *[]*fsm.Row) iter.Seq[[]any] {
	return func(yield func([]any) bool) {
		row := make([]any, 12)
		for p := range projects {
			v := fsm.Derive(p.ID, p.builds())
			if v.Row != nil {
				*rows = append(*rows, v.Row)
			}
			for _, m := range v.Metrics {
				row[0], row[1], row[2], row[3], row[4], row[5] = m.BuildID, m.ProjectID, m.Status, m.StartedAt, m.CompletedAt, m.DurationMS
				row[6], row[7], row[8], row[9], row[10], row[11] = m.Framework, m.NodeVersion, m.PackageManager, m.Attempt, m.Error, m.QueuedAt
				if !yield(row) {
					return
				}
			}
		}
	}
}

var projectsColumns = []string{"project_id", "build_status", "current_build_id", "last_build_started",
	"last_build_completed", "framework", "updated_at"}

func projectRows(rows []*fsm.Row, now time.Time) iter.Seq[[]any] {
	return func(yield func([]any) bool) {
		row := make([]any, 7)
		for _, r := range rows {
			row[0], row[1], row[2], row[3] = r.ProjectID, string(r.Status), r.CurrentBuildID, r.LastBuildStarted
			row[4], row[5], row[6] = r.LastBuildCompleted, r.Framework, now
			if !yield(row) {
				return
			}
		}
	}
}

var factsColumns = []string{"build_id", "kind", "project_id", "event_id", "occurred_at", "stream_seq",
	"framework", "node_version", "package_manager", "attempt", "outcome", "duration_ms", "error"}

func factRows(projects iter.Seq[*BulkProject]) iter.Seq[[]any] {
	return func(yield func([]any) bool) {
		row := make([]any, 13)
		for p := range projects {
			for _, b := range p.Builds {
				for slot, k := range slotKinds {
					st := *b.Step(k)
					if st == nil {
						continue
					}
					d := st.Data
					var outcome *string
					if d.Outcome != "" {
						o := string(d.Outcome)
						outcome = &o
					}
					row[0], row[1], row[2], row[3], row[4], row[5] = b.ID, string(k), p.ID, st.EventID, st.At, int64(b.Seqs[slot])
					row[6], row[7], row[8], row[9] = d.Framework, d.NodeVersion, d.PackageManager, d.Attempt
					row[10], row[11], row[12] = outcome, d.DurationMS, d.Error
					if !yield(row) {
						return
					}
				}
			}
		}
	}
}

func (p *BulkProject) builds() []*fsm.Build {
	out := make([]*fsm.Build, len(p.Builds))
	for i, b := range p.Builds {
		out[i] = &b.Build
	}
	return out
}
