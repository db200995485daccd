package replay_test

import (
	"errors"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
	"github.com/buildstate/buildstate/internal/replay"
)

var t0 = time.Date(2026, 11, 26, 20, 0, 0, 0, time.UTC)

func body(t testing.TB, ev events.Event) []byte {
	t.Helper()
	b, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func subject(ev events.Event) string { return events.Subject("builds", ev.ProjectID, ev.Kind()) }

func TestFoldAdd(t *testing.T) {
	fw := "astro"
	queued := events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{})
	started := events.New(events.KindStarted, "p-1", "b-1", t0.Add(time.Second), events.Data{Framework: &fw})
	otherContent := started
	otherContent.OccurredAt = t0.Add(2 * time.Second)
	clash := events.New(events.KindStarted, "p-2", "b-1", t0.Add(time.Second), events.Data{})
	refusedClaim := started
	refusedClaim.BuildID = "b-new" // same id, other content, a build nobody has
	claimAfter := events.New(events.KindQueued, "p-2", "b-new", t0, events.Data{})
	future := events.New(events.KindQueued, "p-1", "b-2", t0.Add(2*time.Hour), events.Data{})
	stored := t0.Add(time.Minute)

	type add struct {
		seq     uint64
		subject string
		data    []byte
		applied bool
		reason  events.Reason // "" for no error
		order   bool          // want ErrOutOfOrder
	}
	tests := []struct {
		name string
		adds []add
		want replay.Counts
	}{
		{"new events count", []add{
			{seq: 1, subject: subject(queued), data: body(t, queued), applied: true},
			{seq: 2, subject: subject(started), data: body(t, started), applied: true},
		}, replay.Counts{Applied: 2}},
		{"a repeat with the same content is a duplicate", []add{
			{seq: 1, subject: subject(queued), data: body(t, queued), applied: true},
			{seq: 5, subject: subject(queued), data: body(t, queued)},
		}, replay.Counts{Applied: 1, Duplicates: 1}},
		{"a repeat with other content is refused", []add{
			{seq: 1, subject: subject(started), data: body(t, started), applied: true},
			{seq: 2, subject: subject(otherContent), data: body(t, otherContent), reason: events.ReasonIDConflict},
		}, replay.Counts{Applied: 1, Refused: 1}},
		{"a build named under a second project is refused", []add{
			{seq: 1, subject: subject(queued), data: body(t, queued), applied: true},
			{seq: 2, subject: subject(clash), data: body(t, clash), reason: events.ReasonBuildProjectClash},
		}, replay.Counts{Applied: 1, Refused: 1}},
		{"a refused event claims no build", []add{
			{seq: 1, subject: subject(started), data: body(t, started), applied: true},
			{seq: 2, subject: subject(refusedClaim), data: body(t, refusedClaim), reason: events.ReasonIDConflict},
			{seq: 3, subject: subject(claimAfter), data: body(t, claimAfter), applied: true},
		}, replay.Counts{Applied: 2, Refused: 1}},
		{"an invalid body is refused", []add{
			{seq: 1, subject: "builds.p-1.queued", data: []byte(`{"spec_version":1,`), reason: events.ReasonMalformedJSON},
		}, replay.Counts{Refused: 1}},
		{"occurred_at beyond the skew of the stored time is refused", []add{
			{seq: 1, subject: subject(future), data: body(t, future), reason: events.ReasonOccurredInFuture},
		}, replay.Counts{Refused: 1}},
		{"sequences must rise", []add{
			{seq: 3, subject: subject(queued), data: body(t, queued), applied: true},
			{seq: 3, subject: subject(started), data: body(t, started), order: true},
		}, replay.Counts{Applied: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := replay.NewFold("builds")
			for _, a := range tt.adds {
				applied, err := f.Add(a.seq, a.subject, a.data, stored)
				switch {
				case a.order:
					if !errors.Is(err, replay.ErrOutOfOrder) {
						t.Errorf("Add(seq %d) = %v; want ErrOutOfOrder", a.seq, err)
					}
				case a.reason != "":
					if !errors.Is(err, events.ErrInvalid) || events.ReasonOf(err) != a.reason {
						t.Errorf("Add(seq %d) = %v; want reason %s", a.seq, err, a.reason)
					}
				case err != nil:
					t.Errorf("Add(seq %d) = %v; want nil", a.seq, err)
				}
				if applied != a.applied {
					t.Errorf("Add(seq %d) applied = %v; want %v", a.seq, applied, a.applied)
				}
			}
			if got := f.Counts(); got != tt.want {
				t.Errorf("Counts() = %+v; want %+v", got, tt.want)
			}
		})
	}
}

func TestFoldView(t *testing.T) {
	fw, node := "nextjs", "22.11.0"
	attempt := int64(1)
	ms := int64(4000)
	evs := []events.Event{
		events.New(events.KindCompleted, "p-1", "b-1", t0.Add(5*time.Second), events.Data{Outcome: events.OutcomeSucceeded, DurationMS: &ms}),
		events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{}),
		events.New(events.KindMetricsRecorded, "p-1", "b-1", t0.Add(2*time.Second), events.Data{Framework: &fw, NodeVersion: &node, Attempt: &attempt}),
		events.New(events.KindStarted, "p-1", "b-1", t0.Add(time.Second), events.Data{}),
		events.New(events.KindQueued, "p-1", "b-2", t0.Add(time.Minute), events.Data{}),
	}
	f := replay.NewFold("builds")
	stored := t0.Add(time.Hour)
	for i, ev := range evs {
		if _, err := f.Add(uint64(i+1), subject(ev), body(t, ev), stored.Add(time.Duration(i)*time.Second)); err != nil {
			t.Fatalf("Add(%d) = %v", i+1, err)
		}
	}
	v := f.View("p-1")
	want := &fsm.Row{
		ProjectID: "p-1", Status: fsm.StatusQueued, CurrentBuildID: ptr("b-1"),
		LastBuildStarted: ptr(t0.Add(time.Second)), LastBuildCompleted: ptr(t0.Add(5 * time.Second)), Framework: &fw,
	}
	if !fsm.SameRow(v.Row, want) {
		t.Errorf("View(p-1).Row = %+v; want %+v", v.Row, want)
	}
	m, ok := v.Metrics["b-1"]
	if !ok || m.Status != "succeeded" || !m.StartedAt.Equal(t0.Add(time.Second)) || m.QueuedAt == nil || !m.QueuedAt.Equal(t0) {
		t.Errorf("View(p-1).Metrics[b-1] = %+v; want succeeded, started t0+1s, queued t0", m)
	}
	if len(v.Metrics) != 1 {
		t.Errorf("View(p-1) has %d metrics rows; want 1", len(v.Metrics))
	}
	if last := f.Last("p-1"); last.Seq != 5 || !last.StoredAt.Equal(stored.Add(4*time.Second)) {
		t.Errorf("Last(p-1) = %+v; want seq 5", last)
	}
	if v := f.View("p-9"); v.Row != nil || len(v.Metrics) != 0 {
		t.Errorf("View(p-9) = %+v; want empty", v)
	}
}

func ptr[T any](v T) *T { return &v }
