package fold_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fold"
	"github.com/buildstate/buildstate/internal/fsm"
)

var t0 = time.Date(2026, 11, 26, 20, 0, 0, 0, time.UTC)

// msg is ev as the log stores it at sequence seq.
func msg(t testing.TB, seq uint64, ev events.Event) *fold.Decoded {
	t.Helper()
	b, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	d := fold.Decode("builds", fold.Message{Seq: seq, Subject: events.Subject("builds", ev.ProjectID, ev.Kind()),
		Data: b, StoredAt: t0.Add(time.Hour)})
	return &d
}

// stored is ev's step as the store holds it.
func stored(ev events.Event) *fsm.Step {
	return &fsm.Step{EventID: ev.ID, At: ev.OccurredAt, Data: ev.Data}
}

func TestAddOnLoadedState(t *testing.T) {
	applied := events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{})
	other := events.New(events.KindStarted, "p-2", "b-2", t0, events.Data{})
	tests := []struct {
		name   string
		ev     events.Event
		want   fold.Outcome
		reason events.Reason
	}{
		{"an id applied before, same content: duplicate", applied, fold.Duplicate, ""},
		{"an id applied before, other content: refused", func() events.Event {
			e := applied
			e.OccurredAt = t0.Add(time.Second)
			return e
		}(), fold.Refused, events.ReasonIDConflict},
		{"a build claimed by another project: refused", func() events.Event {
			e := other
			e.ProjectID = "p-1"
			return e
		}(), fold.Refused, events.ReasonBuildProjectClash},
		{"a build claimed by its own project: counted", events.New(events.KindCompleted, "p-2", "b-2", t0.Add(time.Minute),
			events.Data{Outcome: events.OutcomeSucceeded}), fold.Counted, ""},
		{"a new build: counted", events.New(events.KindQueued, "p-3", "b-3", t0, events.Data{}), fold.Counted, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := fold.NewPartition()
			p.Load(fold.Stored{
				Claims: map[string]string{"b-1": "p-1", "b-2": "p-2"},
				IDs:    map[string][]byte{applied.ID: digest(applied)},
			})
			out, err := p.Add(msg(t, 7, tt.ev))
			if out != tt.want {
				t.Errorf("Add(%s) = %v, %v; want %v", tt.ev.ID, out, err, tt.want)
			}
			if tt.reason != "" && (!errors.Is(err, events.ErrInvalid) || events.ReasonOf(err) != tt.reason) {
				t.Errorf("Add(%s) = %v; want reason %s", tt.ev.ID, err, tt.reason)
			}
			ch, err := p.Changes(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			counted := tt.want == fold.Counted
			if got := len(ch.Applied) == 1; got != counted {
				t.Errorf("Changes().Applied = %+v; want one id: %v", ch.Applied, counted)
			}
			if got := len(ch.Refused) == 1; got != (tt.want == fold.Refused) {
				t.Errorf("Changes().Refused = %+v", ch.Refused)
			}
			// Only a build nobody had is claimed.
			wantClaims := 0
			if counted && tt.ev.BuildID == "b-3" {
				wantClaims = 1
			}
			if len(ch.Claims) != wantClaims {
				t.Errorf("Changes().Claims = %+v; want %d", ch.Claims, wantClaims)
			}
		})
	}
}

func digest(ev events.Event) []byte {
	d := ev.Digest()
	return d[:]
}

// A fold on loaded facts writes only what its messages changed: the steps
// they won, the roles if they moved, and the plan from the stored rows.
func TestChangesAgainstStored(t *testing.T) {
	q1 := events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{})
	s1 := events.New(events.KindStarted, "p-1", "b-1", t0.Add(time.Second), events.Data{})
	p := fold.NewPartition()
	p.Load(fold.Stored{
		Projects: map[string]map[string]*fsm.Build{"p-1": {"b-1": {ID: "b-1", ProjectID: "p-1", Queued: stored(q1), Started: stored(s1)}}},
		Claims:   map[string]string{"b-1": "p-1"},
		IDs:      map[string][]byte{q1.ID: digest(q1), s1.ID: digest(s1)},
	})
	older := events.New(events.KindStarted, "p-1", "b-1", t0.Add(-time.Hour), events.Data{}) // loses to s1
	done := events.New(events.KindCompleted, "p-1", "b-1", t0.Add(time.Minute), events.Data{Outcome: events.OutcomeFailed})
	for i, ev := range []events.Event{q1, older, done} {
		if _, err := p.Add(msg(t, uint64(10+i), ev)); err != nil {
			t.Fatalf("Add(%s) = %v", ev.ID, err)
		}
	}
	if inc := p.Incomplete(); len(inc) != 0 {
		t.Errorf("Incomplete() = %v; want none", inc)
	}
	ch, err := p.Changes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(ch.Claims) != 0 {
		t.Errorf("Claims = %+v; want none (b-1 was claimed)", ch.Claims)
	}
	if len(ch.Facts) != 1 || ch.Facts[0].Kind != events.KindCompleted || ch.Facts[0].Seq != 12 || ch.Facts[0].Step.EventID != done.ID {
		t.Errorf("Facts = %+v; want the completion at seq 12 only", ch.Facts)
	}
	if len(ch.Roles) != 0 {
		t.Errorf("Roles = %+v; want unchanged", ch.Roles)
	}
	if len(ch.Plans) != 1 || ch.Plans[0].From != fsm.StatusBuilding || ch.Plans[0].To != fsm.StatusFailed {
		t.Errorf("Plans = %+v; want building -> failed", ch.Plans)
	}
	if len(ch.Applied) != 2 || ch.Applied[0].EventID > ch.Applied[1].EventID {
		t.Errorf("Applied = %+v; want the two new ids in id order", ch.Applied)
	}
}

// A late queued event that moves a loaded role holder back means a build
// not loaded may hold the role: the project must be folded on its whole
// history.
func TestIncompleteOnDemotion(t *testing.T) {
	s1 := events.New(events.KindStarted, "p-1", "b-1", t0.Add(time.Hour), events.Data{})
	late := events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{})
	st := fold.Stored{
		Projects: map[string]map[string]*fsm.Build{"p-1": {"b-1": {ID: "b-1", ProjectID: "p-1", Started: stored(s1)}}},
		Whole:    map[string]bool{},
		Claims:   map[string]string{"b-1": "p-1"},
	}
	p := fold.NewPartition()
	p.Load(st)
	if _, err := p.Add(msg(t, 5, late)); err != nil {
		t.Fatal(err)
	}
	if got := p.Incomplete(); len(got) != 1 || got[0] != "p-1" {
		t.Fatalf("Incomplete() = %v; want [p-1]", got)
	}
	st.Whole["p-1"] = true
	p = fold.NewPartition()
	p.Load(st)
	if _, err := p.Add(msg(t, 5, late)); err != nil {
		t.Fatal(err)
	}
	if got := p.Incomplete(); len(got) != 0 {
		t.Errorf("Incomplete() on the whole history = %v; want none", got)
	}
}

func TestSealedRefusesMore(t *testing.T) {
	p := fold.NewPartition()
	p.Seal()
	if _, err := p.Add(msg(t, 1, events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{}))); !errors.Is(err, fold.ErrSealed) {
		t.Errorf("Add after Seal = %v; want ErrSealed", err)
	}
}
