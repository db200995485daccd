// Package fsm holds the build lifecycle rules: how the winning events of a
// project's builds fold into its read-model rows (Derive), and the
// per-project state machine (looplab/fsm) whose transitions emit the ordered
// writes that take the stored rows to the derived ones (Decide). It imports
// no infrastructure.
package fsm

import (
	"slices"
	"time"

	"github.com/buildstate/buildstate/internal/events"
)

// Status is a project's build_status; StatusNone means no row yet.
type Status string

const (
	StatusNone     Status = "none"
	StatusQueued   Status = "queued"
	StatusBuilding Status = "building"
	StatusDeployed Status = "deployed"
	StatusFailed   Status = "failed"
	StatusCanceled Status = "canceled"
)

// Step is the winning event of one kind for one build.
type Step struct {
	EventID string
	At      time.Time
	Data    events.Data
}

// beats is the contract's winner rule: a step without data.timed_out beats
// one with it (only completions carry it: a completion from the build's
// worker, however late, ends a time-out), whatever their times; otherwise the
// later occurred_at, ties to the greater id.
func (s *Step) beats(o *Step) bool {
	if o == nil {
		return true
	}
	if s.Data.TimedOut != o.Data.TimedOut {
		return o.Data.TimedOut
	}
	if !s.At.Equal(o.At) {
		return s.At.After(o.At)
	}
	return s.EventID > o.EventID
}

// Build is what is known of one build: the winning event of each kind.
type Build struct {
	ID        string
	ProjectID string
	Queued    *Step
	Started   *Step
	Metrics   *Step
	Completed *Step
}

// Step returns the slot of kind k.
func (b *Build) Step(k events.Kind) **Step {
	switch k {
	case events.KindQueued:
		return &b.Queued
	case events.KindStarted:
		return &b.Started
	case events.KindMetricsRecorded:
		return &b.Metrics
	default:
		return &b.Completed
	}
}

// Merge folds ev into b and reports whether it won its slot. Merging the same
// event twice, or an older one, changes nothing.
func (b *Build) Merge(ev events.Event) bool {
	slot := b.Step(ev.Kind())
	s := &Step{EventID: ev.ID, At: ev.OccurredAt, Data: ev.Data}
	if !s.beats(*slot) {
		return false
	}
	*slot = s
	return true
}

// Waiting is what a build without a completion waits on its worker for:
// to start it (WaitingStart, since its queued event) or, once started, to
// finish it (WaitingFinish, since its started event). ok is false for a
// completed build and for one with neither step: it waits on nobody. These
// are the builds `projector stuck` looks at.
func (b *Build) Waiting() (w Wait, ok bool) {
	switch {
	case b.Completed != nil:
		return Wait{}, false
	case b.Started != nil:
		return Wait{For: WaitingFinish, Since: b.Started.At}, true
	case b.Queued != nil:
		return Wait{For: WaitingStart, Since: b.Queued.At}, true
	}
	return Wait{}, false
}

// Wait is what an open build waits for, and since when (Build.Waiting).
type Wait struct {
	For   string // WaitingStart or WaitingFinish
	Since time.Time
}

// What an open build waits for (Wait.For): the names of its stuck states.
const (
	WaitingStart  = "queued"   // queued, no start
	WaitingFinish = "building" // started, no completion
)

// requested is when the build was asked for: queued time, else started time.
func (b *Build) requested() (time.Time, bool) {
	switch {
	case b.Queued != nil:
		return b.Queued.At, true
	case b.Started != nil:
		return b.Started.At, true
	}
	return time.Time{}, false
}

// newer orders builds by (requested time, build id).
func newer(a, b *Build) bool {
	ta, _ := a.requested()
	tb, _ := b.requested()
	if !ta.Equal(tb) {
		return ta.After(tb)
	}
	return a.ID > b.ID
}

// Row is a projects row (updated_at is the store's).
type Row struct {
	ProjectID          string
	Status             Status
	CurrentBuildID     *string
	LastBuildStarted   *time.Time
	LastBuildCompleted *time.Time
	Framework          *string
}

// MetricsRow is a project_build_metrics row.
type MetricsRow struct {
	BuildID        string
	ProjectID      string
	Status         string
	QueuedAt       *time.Time
	StartedAt      time.Time
	CompletedAt    *time.Time
	DurationMS     *int64
	Framework      *string
	NodeVersion    *string
	PackageManager *string
	Attempt        *int64
	Error          *string
}

// View is everything the read model holds for one project.
type View struct {
	Row     *Row                  // nil while the project has no visible build
	Metrics map[string]MetricsRow // by build id
}

// Roles names the builds a project's row is derived from: the newest
// visible build (status), the newest with a start (the two times), the newest
// with metrics (current build) and the newest reporting a framework. Each is
// the greatest by (requested time, build id) among the builds that qualify;
// "" when none does.
type Roles struct {
	Newest, Started, Current, Framework string
}

// Holds reports whether build id holds any role.
func (r Roles) Holds(id string) bool {
	return id != "" && (r.Newest == id || r.Started == id || r.Current == id || r.Framework == id)
}

// IDs lists the distinct role holders.
func (r Roles) IDs() []string {
	var out []string
	for _, id := range []string{r.Newest, r.Started, r.Current, r.Framework} {
		if id != "" && !slices.Contains(out, id) {
			out = append(out, id)
		}
	}
	return out
}

// RolesOf finds the role holders among builds.
func RolesOf(builds []*Build) Roles {
	var newest, started, current, fw *Build
	for _, b := range builds {
		if _, ok := b.requested(); !ok {
			continue
		}
		if newest == nil || newer(b, newest) {
			newest = b
		}
		if b.Started != nil && (started == nil || newer(b, started)) {
			started = b
		}
		if b.Metrics != nil && (current == nil || newer(b, current)) {
			current = b
		}
		if framework(b) != nil && (fw == nil || newer(b, fw)) {
			fw = b
		}
	}
	id := func(b *Build) string {
		if b == nil {
			return ""
		}
		return b.ID
	}
	return Roles{Newest: id(newest), Started: id(started), Current: id(current), Framework: id(fw)}
}

// Demoted reports whether a merge may have cost the build a role to a build
// that is not in view: its requested time went down (a queued event earlier
// than its start arrived) or it stopped reporting a framework. A store that
// derives from the role holders and the changed builds only must then load
// all of the project's builds.
func Demoted(before, after *Build) bool {
	tb, okb := before.requested()
	ta, _ := after.requested()
	if okb && ta.Before(tb) {
		return true
	}
	return framework(before) != nil && framework(after) == nil
}

// Derive applies the read-model rules (docs/contract.md) to a project's
// builds: all of them, or at least its role holders and every build whose
// metrics row is wanted.
func Derive(projectID string, builds []*Build) View {
	v := View{Metrics: map[string]MetricsRow{}}
	byID := make(map[string]*Build, len(builds))
	for _, b := range builds {
		byID[b.ID] = b
		if b.Metrics != nil {
			v.Metrics[b.ID] = metricsRow(b)
		}
	}
	r := RolesOf(builds)
	if r.Newest == "" {
		return v
	}
	row := &Row{ProjectID: projectID, Status: statusOf(byID[r.Newest])}
	if b := byID[r.Started]; b != nil {
		row.LastBuildStarted = ptr(b.Started.At)
		if b.Completed != nil {
			row.LastBuildCompleted = ptr(later(b.Completed.At, b.Started.At))
		}
	}
	if r.Current != "" {
		row.CurrentBuildID = ptr(r.Current)
	}
	if b := byID[r.Framework]; b != nil {
		row.Framework = framework(b)
	}
	v.Row = row
	return v
}

func statusOf(b *Build) Status {
	switch {
	case b.Completed != nil:
		switch b.Completed.Data.Outcome {
		case events.OutcomeFailed:
			return StatusFailed
		case events.OutcomeCanceled:
			return StatusCanceled
		}
		return StatusDeployed
	case b.Started != nil:
		return StatusBuilding
	}
	return StatusQueued
}

// framework is the build's reported framework: metrics' first, else started's.
func framework(b *Build) *string {
	if b.Metrics != nil && b.Metrics.Data.Framework != nil {
		return b.Metrics.Data.Framework
	}
	if b.Started != nil && b.Started.Data.Framework != nil {
		return b.Started.Data.Framework
	}
	return nil
}

func metricsRow(b *Build) MetricsRow {
	m := MetricsRow{
		BuildID:        b.ID,
		ProjectID:      b.ProjectID,
		Status:         "building",
		StartedAt:      b.Metrics.At,
		Framework:      framework(b),
		NodeVersion:    b.Metrics.Data.NodeVersion,
		PackageManager: b.Metrics.Data.PackageManager,
		Attempt:        b.Metrics.Data.Attempt,
	}
	if b.Queued != nil {
		m.QueuedAt = ptr(b.Queued.At)
	}
	if b.Started != nil {
		m.StartedAt = b.Started.At
	}
	if c := b.Completed; c != nil {
		m.Status = string(c.Data.Outcome)
		m.CompletedAt = ptr(later(c.At, m.StartedAt))
		m.DurationMS = c.Data.DurationMS
		m.Error = c.Data.Error
	}
	return m
}

func later(a, b time.Time) time.Time {
	if a.Before(b) {
		return b
	}
	return a
}

func ptr[T any](v T) *T { return &v }
