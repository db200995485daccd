package fsm_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	lfsm "github.com/looplab/fsm"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
)

// refused marks a cell of the table whose event the state must refuse.
const refused fsm.Status = ""

var machineEvents = []string{fsm.EventQueue, fsm.EventStart, fsm.EventSucceed, fsm.EventFail, fsm.EventCancel, fsm.EventRecord}

// lifecycle is the machine as a table: the state each event leads to from
// each state, events in the order of machineEvents.
var lifecycle = []struct {
	from fsm.Status
	to   [6]fsm.Status // queue, start, succeed, fail, cancel, record
}{
	{fsm.StatusNone, [6]fsm.Status{fsm.StatusQueued, fsm.StatusBuilding, fsm.StatusDeployed, fsm.StatusFailed, fsm.StatusCanceled, fsm.StatusNone}},
	{fsm.StatusQueued, [6]fsm.Status{fsm.StatusQueued, fsm.StatusBuilding, fsm.StatusDeployed, fsm.StatusFailed, fsm.StatusCanceled, refused}},
	{fsm.StatusBuilding, [6]fsm.Status{fsm.StatusQueued, fsm.StatusBuilding, fsm.StatusDeployed, fsm.StatusFailed, fsm.StatusCanceled, refused}},
	{fsm.StatusDeployed, [6]fsm.Status{fsm.StatusQueued, fsm.StatusBuilding, fsm.StatusDeployed, fsm.StatusFailed, fsm.StatusCanceled, refused}},
	{fsm.StatusFailed, [6]fsm.Status{fsm.StatusQueued, fsm.StatusBuilding, fsm.StatusDeployed, fsm.StatusFailed, fsm.StatusCanceled, refused}},
	{fsm.StatusCanceled, [6]fsm.Status{fsm.StatusQueued, fsm.StatusBuilding, fsm.StatusDeployed, fsm.StatusFailed, fsm.StatusCanceled, refused}},
}

func TestMachine(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for _, row := range lifecycle {
		for i, event := range machineEvents {
			want := row.to[i]
			t.Run(fmt.Sprintf("%s/%s", row.from, event), func(t *testing.T) {
				m := fsm.NewMachine(row.from)
				err := m.Event(ctx, event)
				if want == refused {
					if !errors.As(err, &lfsm.InvalidEventError{}) {
						t.Errorf("Event(%s) in %s = %v; want InvalidEventError", event, row.from, err)
					}
					if m.Current() != string(row.from) {
						t.Errorf("refused Event(%s) moved %s to %s", event, row.from, m.Current())
					}
					return
				}
				if err != nil && !errors.As(err, &lfsm.NoTransitionError{}) {
					t.Fatalf("Event(%s) in %s = %v; want nil", event, row.from, err)
				}
				if got := fsm.Status(m.Current()); got != want {
					t.Errorf("Event(%s) in %s -> %s; want %s", event, row.from, got, want)
				}
			})
		}
	}
	t.Run("unknown event", func(t *testing.T) {
		err := fsm.NewMachine(fsm.StatusQueued).Event(ctx, "deploy")
		if !errors.As(err, &lfsm.UnknownEventError{}) {
			t.Errorf("Event(deploy) = %v; want UnknownEventError", err)
		}
	})
}

// TestTransitionsMatchTable checks that fsm.Transitions has exactly the
// table's rows: a row added to the code must be added to the table.
func TestTransitionsMatchTable(t *testing.T) {
	t.Parallel()
	want := map[[2]string]fsm.Status{}
	for _, row := range lifecycle {
		for i, event := range machineEvents {
			if row.to[i] != refused {
				want[[2]string{string(row.from), event}] = row.to[i]
			}
		}
	}
	got := map[[2]string]fsm.Status{}
	for _, ev := range fsm.Transitions {
		for _, src := range ev.Src {
			k := [2]string{src, ev.Name}
			if _, dup := got[k]; dup {
				t.Errorf("Transitions lists %s from %s twice", ev.Name, src)
			}
			got[k] = fsm.Status(ev.Dst)
		}
	}
	for k, to := range got {
		if w, ok := want[k]; !ok || w != to {
			t.Errorf("Transitions has %s --%s--> %s; the table says %q", k[0], k[1], to, w)
		}
	}
	for k, to := range want {
		if _, ok := got[k]; !ok {
			t.Errorf("Transitions lacks %s --%s--> %s", k[0], k[1], to)
		}
	}
}

func kinds(p fsm.Plan) []fsm.ActionKind {
	out := make([]fsm.ActionKind, len(p.Actions))
	for i, a := range p.Actions {
		out[i] = a.Kind
	}
	return out
}

const (
	status  = fsm.WriteStatus
	metric  = fsm.WriteMetrics
	current = fsm.PointCurrent
)

func TestDecide(t *testing.T) {
	t.Parallel()
	ok, failed := events.OutcomeSucceeded, events.OutcomeFailed
	b1 := []events.Event{queued("b1", 0), started("b1", 10), metrics("b1", 20)}
	b1done := append(slices.Clone(b1), completed("b1", 60, ok))
	tests := []struct {
		name          string
		before, added []events.Event
		event         string
		to            fsm.Status
		actions       []fsm.ActionKind
	}{
		{"first queued", nil, []events.Event{queued("b1", 0)}, fsm.EventQueue, fsm.StatusQueued, []fsm.ActionKind{status}},
		{"first started without queued", nil, []events.Event{started("b1", 0)}, fsm.EventStart, fsm.StatusBuilding, []fsm.ActionKind{status}},
		{"metrics of an invisible build", nil, []events.Event{metrics("b1", 0)}, fsm.EventRecord, fsm.StatusNone, []fsm.ActionKind{metric}},
		{"queued after metrics: visible, queued_at set, pointer moves", []events.Event{metrics("b1", 5)}, []events.Event{queued("b1", 0)},
			fsm.EventQueue, fsm.StatusQueued, []fsm.ActionKind{status, metric, current}},
		{"whole build in one batch", nil, b1done, fsm.EventSucceed, fsm.StatusDeployed, []fsm.ActionKind{status, metric, current}},
		{"started", []events.Event{queued("b1", 0)}, []events.Event{started("b1", 10)},
			fsm.EventStart, fsm.StatusBuilding, []fsm.ActionKind{status}},
		{"metrics while building: self transition still writes", b1[:2], b1[2:],
			fsm.EventStart, fsm.StatusBuilding, []fsm.ActionKind{metric, current}},
		{"completed", b1, []events.Event{completed("b1", 60, failed)}, fsm.EventFail, fsm.StatusFailed, []fsm.ActionKind{status, metric}},
		{"next build queued keeps the last start", b1done, []events.Event{queued("b2", 100)},
			fsm.EventQueue, fsm.StatusQueued, []fsm.ActionKind{status}},
		{"next build started clears completion", append(slices.Clone(b1done), queued("b2", 100)), []events.Event{started("b2", 110)},
			fsm.EventStart, fsm.StatusBuilding, []fsm.ActionKind{status}},
		{"next build metrics moves the pointer", append(slices.Clone(b1done), queued("b2", 100), started("b2", 110)),
			[]events.Event{metrics("b2", 120)}, fsm.EventStart, fsm.StatusBuilding, []fsm.ActionKind{metric, current}},
		{"older build's metrics corrected", append(slices.Clone(b1done), queued("b2", 100)),
			[]events.Event{e(events.KindMetricsRecorded, "b1", "b1-m2", 30, events.Data{NodeVersion: ptr("22")})},
			fsm.EventQueue, fsm.StatusQueued, []fsm.ActionKind{metric}},
		{"stale event changes nothing", b1done, []events.Event{e(events.KindStarted, "b1", "b1-s0", 5, events.Data{})},
			fsm.EventSucceed, fsm.StatusDeployed, nil},
		{"repeat changes nothing", b1done, b1done, fsm.EventSucceed, fsm.StatusDeployed, nil},
		{"an older build arriving late", append(slices.Clone(b1done), queued("b2", 100)),
			[]events.Event{queued("b0", -100), started("b0", -90), metrics("b0", -80), completed("b0", -70, failed)},
			fsm.EventQueue, fsm.StatusQueued, []fsm.ActionKind{metric}},
		{"newer build's metrics before its start", b1done, []events.Event{metrics("b2", 120)},
			fsm.EventSucceed, fsm.StatusDeployed, []fsm.ActionKind{metric}},
		{"then its start: status, then the pointer", append(slices.Clone(b1done), metrics("b2", 120)), []events.Event{started("b2", 110)},
			fsm.EventStart, fsm.StatusBuilding, []fsm.ActionKind{status, metric, current}},
		{"canceled with skewed clock", b1, []events.Event{completed("b1", 5, events.OutcomeCanceled)},
			fsm.EventCancel, fsm.StatusCanceled, []fsm.ActionKind{status, metric}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := derive(tt.before...)
			after := derive(append(slices.Clone(tt.before), tt.added...)...)
			plan, err := fsm.Decide(context.Background(), "p", before, after)
			if err != nil {
				t.Fatalf("Decide = %v", err)
			}
			if plan.Event != tt.event || plan.To != tt.to {
				t.Errorf("Decide(%s -> %s) fired %s to %s; want %s to %s", showView(before), showView(after),
					plan.Event, plan.To, tt.event, tt.to)
			}
			if got := kinds(plan); !slices.Equal(got, tt.actions) {
				t.Errorf("Decide(%s -> %s) actions = %v; want %v", showView(before), showView(after), got, tt.actions)
			}
			checkPlan(t, before, after, plan)
		})
	}
}

func TestDecideRefusesRecordOnceVisible(t *testing.T) {
	t.Parallel()
	before := derive(queued("b1", 0), started("b1", 10))
	plan, err := fsm.Decide(context.Background(), "p", before, fsm.View{Metrics: map[string]fsm.MetricsRow{}})
	if err == nil {
		t.Fatalf("Decide(building -> no row) = %+v, nil; want an error (record is refused from building)", plan)
	}
	if !errors.As(err, &lfsm.InvalidEventError{}) {
		t.Errorf("Decide(building -> no row) = %v; want it to wrap InvalidEventError", err)
	}
}

// checkPlan checks the order invariant (phase 1 < metrics < phase 2, each at
// most once per row), and that applying the plan's actions one by one to
// before keeps both seed constraints true after every action and ends at after.
func checkPlan(t *testing.T, before, after fsm.View, plan fsm.Plan) {
	t.Helper()
	if after.Row != nil && plan.To != after.Row.Status {
		t.Errorf("plan.To = %s; want the derived status %s", plan.To, after.Row.Status)
	}
	if after.Row == nil && plan.To != fsm.StatusNone {
		t.Errorf("plan.To = %s; want none while no build is visible", plan.To)
	}
	last := fsm.ActionKind(0)
	seen := map[string]bool{}
	for i, a := range plan.Actions {
		if a.Kind < last {
			t.Errorf("action %d is %s after %s; want phase 1 < metrics < phase 2", i, a.Kind, last)
		}
		if a.Kind != fsm.WriteMetrics && a.Kind == last {
			t.Errorf("action %d: %s twice", i, a.Kind)
		}
		if a.Kind == fsm.WriteMetrics {
			if seen[a.Metrics.BuildID] {
				t.Errorf("action %d: metrics of %s twice", i, a.Metrics.BuildID)
			}
			seen[a.Metrics.BuildID] = true
		}
		last = a.Kind
	}

	// Replay the plan against a copy of before.
	var row *fsm.Row
	if before.Row != nil {
		r := *before.Row
		row = &r
	}
	rows := map[string]fsm.MetricsRow{}
	for id, m := range before.Metrics {
		rows[id] = m
	}
	for i, a := range plan.Actions {
		switch a.Kind {
		case fsm.WriteStatus:
			cur := (*string)(nil)
			if row != nil {
				cur = row.CurrentBuildID
			}
			r := *a.Row
			r.CurrentBuildID = cur // phase 1 leaves the pointer as stored
			row = &r
		case fsm.WriteMetrics:
			rows[a.Metrics.BuildID] = *a.Metrics
		case fsm.PointCurrent:
			if row == nil {
				t.Fatalf("action %d: point_current before the project row exists", i)
			}
			row.CurrentBuildID = a.Row.CurrentBuildID
			if c := a.Row.CurrentBuildID; c != nil {
				if _, ok := after.Metrics[*c]; !ok {
					t.Errorf("action %d: point_current to %s, which has no metrics row in after", i, *c)
				}
			}
		}
		if row != nil {
			if c := row.CurrentBuildID; c != nil {
				if _, ok := rows[*c]; !ok {
					t.Errorf("after action %d (%s): current_build_id %s has no metrics row (projects_current_build_fk)", i, a.Kind, *c)
				}
			}
			if s, c := row.LastBuildStarted, row.LastBuildCompleted; s != nil && c != nil && c.Before(*s) {
				t.Errorf("after action %d (%s): completed %v < started %v (projects_build_timing_logical)", i, a.Kind, *c, *s)
			}
		}
		if a.Kind == fsm.WriteMetrics && a.Metrics.CompletedAt != nil && a.Metrics.CompletedAt.Before(a.Metrics.StartedAt) {
			t.Errorf("action %d: metrics %s completed before started", i, a.Metrics.BuildID)
		}
	}
	got := fsm.View{Row: row, Metrics: rows}
	if !sameView(got, after) {
		t.Errorf("replaying the plan gives\n  %s\nwant\n  %s", showView(got), showView(after))
	}
}

// TestDecideAnyPrefix is the general claim behind the table: for random
// histories, from any earlier state (any subset of the events already
// applied) the plan takes the stored rows to the derived ones with both
// constraints true at every step.
func TestDecideAnyPrefix(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	outcomes := []events.Outcome{events.OutcomeSucceeded, events.OutcomeFailed, events.OutcomeCanceled}
	for i := range 2000 {
		var all []events.Event
		for b := range 1 + rng.IntN(4) {
			build := fmt.Sprintf("b%d", b)
			base := rng.IntN(100)
			for _, k := range events.Kinds {
				for c := range rng.IntN(3) { // 0, 1 or 2 events of this kind
					d := events.Data{}
					if k == events.KindCompleted {
						d.Outcome = outcomes[rng.IntN(3)]
					}
					if rng.IntN(2) == 0 {
						d.Framework = ptr(fmt.Sprintf("fw%d", rng.IntN(3)))
					}
					all = append(all, e(k, build, fmt.Sprintf("%s-%s-%d", build, k, c), base+rng.IntN(40)-10, d))
				}
			}
		}
		rng.Shuffle(len(all), func(a, b int) { all[a], all[b] = all[b], all[a] })
		cut := rng.IntN(len(all) + 1)
		before, after := derive(all[:cut]...), derive(all...)
		plan, err := fsm.Decide(context.Background(), "p", before, after)
		if err != nil {
			t.Fatalf("case %d: Decide = %v", i, err)
		}
		checkPlan(t, before, after, plan)
		if t.Failed() {
			t.Fatalf("case %d: events %v, %d applied before", i, showEvents(all), cut)
		}
	}
}

func showEvents(evs []events.Event) []string {
	out := make([]string, len(evs))
	for i, ev := range evs {
		out[i] = fmt.Sprintf("%s:%s@%s", ev.ID, ev.Kind(), ev.OccurredAt.Sub(t0).Round(time.Second))
	}
	return out
}
