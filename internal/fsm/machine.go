package fsm

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	lfsm "github.com/looplab/fsm"
)

// The machine's events: each names the step the project's newest build has
// reached. Events arrive in any order, so every state may move to any step
// (a newer build resets a finished project to queued or building).
const (
	EventQueue   = "queue"
	EventStart   = "start"
	EventSucceed = "succeed"
	EventFail    = "fail"
	EventCancel  = "cancel"
	// EventRecord keeps a project with no visible build where it is, while
	// metrics of a build not yet queued or started are written.
	EventRecord = "record"
)

var allStates = []string{
	string(StatusNone), string(StatusQueued), string(StatusBuilding),
	string(StatusDeployed), string(StatusFailed), string(StatusCanceled),
}

// Transitions is the project lifecycle table. Decide fires exactly one of
// these per apply; the callbacks emit the writes.
var Transitions = lfsm.Events{
	{Name: EventQueue, Src: allStates, Dst: string(StatusQueued)},
	{Name: EventStart, Src: allStates, Dst: string(StatusBuilding)},
	{Name: EventSucceed, Src: allStates, Dst: string(StatusDeployed)},
	{Name: EventFail, Src: allStates, Dst: string(StatusFailed)},
	{Name: EventCancel, Src: allStates, Dst: string(StatusCanceled)},
	{Name: EventRecord, Src: []string{string(StatusNone)}, Dst: string(StatusNone)},
}

// ActionKind is one of the three writes, always emitted in this order.
type ActionKind int

const (
	// WriteStatus is the seed's phase 1: status, started and completed times
	// (the old completion cleared when a new build starts) and framework; the
	// current build pointer is left as stored.
	WriteStatus ActionKind = iota + 1
	// WriteMetrics upserts one project_build_metrics row.
	WriteMetrics
	// PointCurrent is the seed's phase 2: current_build_id moves, and only to
	// a build whose metrics row exists (written earlier in the same plan or
	// before it).
	PointCurrent
)

func (k ActionKind) String() string {
	switch k {
	case WriteStatus:
		return "write_status"
	case WriteMetrics:
		return "write_metrics"
	case PointCurrent:
		return "point_current"
	}
	return fmt.Sprintf("ActionKind(%d)", int(k))
}

// Action is one write of a plan.
type Action struct {
	Kind    ActionKind
	Row     *Row        // WriteStatus, PointCurrent
	Metrics *MetricsRow // WriteMetrics
}

// Plan is the ordered writes that take a project from one view to the next.
type Plan struct {
	ProjectID string
	Event     string
	From, To  Status
	Actions   []Action
}

// Decide fires the project's machine (in the stored state of before) with
// the event of after's newest build. The transition's callback emits the
// writes that turn before into after, in order: phase 1, metrics, phase 2.
// An empty plan means nothing changes.
func Decide(ctx context.Context, projectID string, before, after View) (Plan, error) {
	from := StatusNone
	if before.Row != nil {
		from = before.Row.Status
	}
	plan := Plan{ProjectID: projectID, From: from, To: from}
	event, err := eventFor(after)
	if err != nil {
		return plan, err
	}
	plan.Event = event
	m := machines.Get().(*lfsm.FSM)
	defer machines.Put(m)
	m.SetState(string(from))
	d := &decision{plan: &plan, before: before, after: after}
	if err := m.Event(ctx, event, d); err != nil && !errors.As(err, &lfsm.NoTransitionError{}) {
		return plan, fmt.Errorf("project %s: %s in state %s: %w", projectID, event, from, err)
	}
	return plan, nil
}

// decision is what a transition's callback needs to emit a plan's writes.
type decision struct {
	plan          *Plan
	before, after View
}

// machines are reused: building a looplab machine costs more than deciding.
// Each one's state is set before every use; the callback takes its inputs
// from the event's arguments.
var machines = sync.Pool{New: func() any {
	return lfsm.NewFSM(string(StatusNone), Transitions, lfsm.Callbacks{
		"after_event": func(_ context.Context, e *lfsm.Event) {
			d := e.Args[0].(*decision)
			d.plan.To = Status(e.Dst)
			d.plan.Actions = writes(d.plan.ProjectID, Status(e.Dst), d.before, d.after)
		},
	})
}}

// NewMachine returns a machine in the given state with the lifecycle table,
// for rendering and inspection.
func NewMachine(s Status) *lfsm.FSM { return lfsm.NewFSM(string(s), Transitions, lfsm.Callbacks{}) }

// Mermaid renders the transition table as a Mermaid state diagram.
func Mermaid() (string, error) {
	return lfsm.VisualizeForMermaidWithGraphType(NewMachine(StatusNone), lfsm.StateDiagram)
}

func eventFor(after View) (string, error) {
	if after.Row == nil {
		return EventRecord, nil
	}
	switch after.Row.Status {
	case StatusQueued:
		return EventQueue, nil
	case StatusBuilding:
		return EventStart, nil
	case StatusDeployed:
		return EventSucceed, nil
	case StatusFailed:
		return EventFail, nil
	case StatusCanceled:
		return EventCancel, nil
	}
	return "", fmt.Errorf("derived status %q has no event", after.Row.Status)
}

// writes lists what differs between before and after, with the status the
// machine moved to, in the order that keeps both constraints true at every
// statement: phase 1, metrics rows, phase 2.
func writes(projectID string, to Status, before, after View) []Action {
	var out []Action
	if after.Row != nil {
		row := *after.Row
		row.Status = to
		row.CurrentBuildID = nil
		if before.Row != nil {
			row.CurrentBuildID = before.Row.CurrentBuildID
		}
		if before.Row == nil || !sameStatusPart(*before.Row, row) {
			out = append(out, Action{Kind: WriteStatus, Row: &row})
		}
	}
	ids := make([]string, 0, len(after.Metrics))
	for id := range after.Metrics {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		m := after.Metrics[id]
		if old, ok := before.Metrics[id]; !ok || !SameMetrics(old, m) {
			out = append(out, Action{Kind: WriteMetrics, Metrics: &m})
		}
	}
	if after.Row != nil {
		var was *string
		if before.Row != nil {
			was = before.Row.CurrentBuildID
		}
		if !eq(was, after.Row.CurrentBuildID) {
			row := *after.Row
			row.Status = to
			out = append(out, Action{Kind: PointCurrent, Row: &row})
		}
	}
	return out
}

func sameStatusPart(a, b Row) bool {
	return a.Status == b.Status && eqTime(a.LastBuildStarted, b.LastBuildStarted) &&
		eqTime(a.LastBuildCompleted, b.LastBuildCompleted) && eq(a.Framework, b.Framework)
}

// SameRow reports whether two projects rows are equal.
func SameRow(a, b *Row) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.ProjectID == b.ProjectID && sameStatusPart(*a, *b) && eq(a.CurrentBuildID, b.CurrentBuildID)
}

// SameMetrics reports whether two metrics rows are equal.
func SameMetrics(a, b MetricsRow) bool {
	return a.BuildID == b.BuildID && a.ProjectID == b.ProjectID && a.Status == b.Status &&
		eqTime(a.QueuedAt, b.QueuedAt) &&
		a.StartedAt.Equal(b.StartedAt) && eqTime(a.CompletedAt, b.CompletedAt) &&
		eq(a.DurationMS, b.DurationMS) && eq(a.Framework, b.Framework) && eq(a.NodeVersion, b.NodeVersion) &&
		eq(a.PackageManager, b.PackageManager) && eq(a.Attempt, b.Attempt) && eq(a.Error, b.Error)
}

func eq[T comparable](a, b *T) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

func eqTime(a, b *time.Time) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Equal(*b)
}
