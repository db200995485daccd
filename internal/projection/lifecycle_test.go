package projection_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
)

func TestLifecycle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t, projection.Options{Gate: true})
	t0 := time.Date(2026, 11, 26, 20, 0, 0, 0, time.UTC)
	ev := func(k events.Kind, build string, at time.Time, d events.Data) events.Event {
		return events.New(k, "p-42", build, at, d)
	}
	dur := int64(61000)
	steps := []struct {
		name      string
		ev        events.Event
		status    string
		current   *string
		completed bool
	}{
		{"queued", ev(events.KindQueued, "b-1", t0, events.Data{}), "queued", nil, false},
		{"started", ev(events.KindStarted, "b-1", t0.Add(time.Second), events.Data{Framework: str("nextjs")}), "building", nil, false},
		{"metrics", ev(events.KindMetricsRecorded, "b-1", t0.Add(2*time.Second), events.Data{NodeVersion: str("22")}), "building", str("b-1"), false},
		{"completed", ev(events.KindCompleted, "b-1", t0.Add(time.Minute), events.Data{Outcome: events.OutcomeSucceeded, DurationMS: &dur}), "deployed", str("b-1"), true},
		{"next queued", ev(events.KindQueued, "b-2", t0.Add(2*time.Minute), events.Data{}), "queued", str("b-1"), true},
		{"next started", ev(events.KindStarted, "b-2", t0.Add(3*time.Minute), events.Data{}), "building", str("b-1"), false},
		{"next metrics", ev(events.KindMetricsRecorded, "b-2", t0.Add(4*time.Minute), events.Data{}), "building", str("b-2"), false},
	}
	for i, st := range steps {
		res, err := s.Apply(ctx, nil, msgs(t, uint64(i+1), st.ev))
		if err != nil {
			t.Fatalf("%s: Apply = %v", st.name, err)
		}
		if res.Applied != 1 {
			t.Fatalf("%s: Applied = %d; want 1", st.name, res.Applied)
		}
		row, err := s.Project(ctx, "p-42")
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if row.BuildStatus != st.status {
			t.Errorf("%s: build_status = %q; want %q", st.name, row.BuildStatus, st.status)
		}
		if (row.CurrentBuildID == nil) != (st.current == nil) || (st.current != nil && *row.CurrentBuildID != *st.current) {
			t.Errorf("%s: current_build_id = %v; want %v", st.name, deref(row.CurrentBuildID), deref(st.current))
		}
		if (row.LastBuildCompleted != nil) != st.completed {
			t.Errorf("%s: last_build_completed = %v; want set=%v", st.name, row.LastBuildCompleted, st.completed)
		}
		if i >= 1 && (row.Framework == nil || *row.Framework != "nextjs") {
			t.Errorf("%s: framework = %v; want nextjs", st.name, deref(row.Framework))
		}
	}
	// The same events again change nothing and count as duplicates.
	var all []events.Event
	for _, st := range steps {
		all = append(all, st.ev)
	}
	res, err := s.Apply(ctx, nil, msgs(t, 100, all...))
	if err != nil {
		t.Fatal(err)
	}
	if res.Applied != 0 || res.Duplicates != len(all) || res.DeadLettered != 0 {
		t.Errorf("re-apply = %+v; want 0 applied, %d duplicates", res, len(all))
	}
	builds, err := s.RecentBuilds(ctx, "p-42", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(builds) != 2 || builds[0].BuildID != "b-2" || builds[1].Status != "succeeded" || *builds[1].DurationMS != dur {
		t.Errorf("RecentBuilds = %+v; want b-2 building, b-1 succeeded", builds)
	}
}

func TestConflictsAreDeadLettered(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t, projection.Options{})
	t0 := time.Now().Add(-time.Hour).UTC()
	first := events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{})
	sameIDOtherContent := first
	sameIDOtherContent.OccurredAt = t0.Add(time.Second)
	otherProject := events.New(events.KindStarted, "p-2", "b-1", t0, events.Data{})
	res, err := s.Apply(ctx, nil, msgs(t, 1, first))
	if err != nil {
		t.Fatal(err)
	}
	res, err = s.Apply(ctx, nil, msgs(t, 2, sameIDOtherContent, otherProject))
	if err != nil {
		t.Fatal(err)
	}
	if res.DeadLettered != 2 || res.Applied != 0 {
		t.Fatalf("Apply = %+v; want 2 dead letters", res)
	}
	dls, err := s.DeadLetters(ctx, projection.DeadLetterFilter{})
	if err != nil {
		t.Fatal(err)
	}
	got := map[uint64]string{}
	for _, d := range dls {
		got[d.StreamSeq] = d.Reason
	}
	if got[2] != string(events.ReasonIDConflict) || got[3] != string(events.ReasonBuildProjectClash) {
		t.Errorf("dead letters = %v; want 2:%s 3:%s", got, events.ReasonIDConflict, events.ReasonBuildProjectClash)
	}
}

func deref(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}

// A late queued event can move a build back in time: the store must then
// derive from the project's whole history, not only the builds it tracks.
// Under a fence, the partition's memory holds the project as a batch loaded
// it (its role holders) and must know that this is not its whole history.
func TestLateQueuedDemotesNewestBuild(t *testing.T) {
	t.Parallel()
	for _, fenced := range []bool{false, true} {
		t.Run(fmt.Sprintf("fenced=%v", fenced), func(t *testing.T) {
			t.Parallel()
			testLateQueuedDemotesNewestBuild(t, fenced)
		})
	}
}

func testLateQueuedDemotesNewestBuild(t *testing.T, fenced bool) {
	ctx := context.Background()
	s := newStore(t, projection.Options{Gate: true})
	t0 := time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
	steps := []events.Event{
		events.New(events.KindQueued, "p-9", "b-old", t0.Add(10*time.Second), events.Data{}),
		events.New(events.KindStarted, "p-9", "b-old", t0.Add(11*time.Second), events.Data{Framework: str("vite")}),
		events.New(events.KindMetricsRecorded, "p-9", "b-old", t0.Add(12*time.Second), events.Data{}),
		events.New(events.KindCompleted, "p-9", "b-old", t0.Add(13*time.Second), events.Data{Outcome: events.OutcomeSucceeded}),
		// Third build: requested at 15 s, only queued.
		events.New(events.KindQueued, "p-9", "b-mid", t0.Add(15*time.Second), events.Data{}),
		// b-new is seen started at 20 s (so it is the newest) ...
		events.New(events.KindStarted, "p-9", "b-new", t0.Add(20*time.Second), events.Data{}),
	}
	for i, ev := range steps {
		if _, err := s.Apply(ctx, nil, msgs(t, uint64(i+1), ev)); err != nil {
			t.Fatal(err)
		}
	}
	row, err := s.Project(ctx, "p-9")
	if err != nil {
		t.Fatal(err)
	}
	if row.BuildStatus != "building" {
		t.Fatalf("before the late queued event: build_status = %q; want building (b-new)", row.BuildStatus)
	}
	var fence *projection.Fence
	if fenced {
		// A new owner: its memory starts with p-9 in the store; a repeat of
		// b-new's start makes a batch load p-9's role holders (b-new, b-old)
		// into memory, without b-mid.
		f, err := s.Acquire(ctx, projection.LayoutP1, 0, "test")
		if err != nil {
			t.Fatal(err)
		}
		fence = f
		if res, err := s.Apply(ctx, fence, msgs(t, 9, steps[5])); err != nil || res.Duplicates != 1 {
			t.Fatalf("repeat under the fence = %+v, %v; want 1 duplicate", res, err)
		}
	}
	// ... until its queued event, at 5 s, arrives: now b-mid (15 s) is the newest.
	late := events.New(events.KindQueued, "p-9", "b-new", t0.Add(5*time.Second), events.Data{})
	if _, err := s.Apply(ctx, fence, msgs(t, 10, late)); err != nil {
		t.Fatal(err)
	}
	row, err = s.Project(ctx, "p-9")
	if err != nil {
		t.Fatal(err)
	}
	if row.BuildStatus != "queued" {
		t.Errorf("after the late queued event: build_status = %q; want queued (b-mid is newest)", row.BuildStatus)
	}
	if row.LastBuildStarted == nil || !row.LastBuildStarted.Equal(t0.Add(11*time.Second)) {
		t.Errorf("last_build_started = %v; want b-old's start %v (b-new now ranks below b-old)", row.LastBuildStarted, t0.Add(11*time.Second))
	}
	if row.CurrentBuildID == nil || *row.CurrentBuildID != "b-old" {
		t.Errorf("current_build_id = %v; want b-old", deref(row.CurrentBuildID))
	}
}

// A batch acts as if its messages were applied one by one: a refused event
// neither blocks a later event with its id nor claims its build.
func TestRefusedEventsClaimNothing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	t0 := time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
	z := events.New(events.KindQueued, "pz", "bz", t0, events.Data{})
	x1 := events.New(events.KindQueued, "py", "bz", t0, events.Data{}) // bz is pz's: refused
	x2 := x1
	x2.BuildID = "by" // same id, other content; x1 was never applied, so x2 is valid
	e1 := events.New(events.KindQueued, "p1", "b1", t0, events.Data{})
	e2 := e1
	e2.ProjectID, e2.BuildID = "p2", "b9"                              // id of an applied event, other content: refused
	e3 := events.New(events.KindQueued, "p3", "b9", t0, events.Data{}) // b9 was never owned

	for name, batches := range map[string][][]events.Event{
		"one batch":   {{z, x1, x2, e1, e2, e3}},
		"one by one":  {{z}, {x1}, {x2}, {e1}, {e2}, {e3}},
		"two batches": {{z, x1}, {x2, e1, e2, e3}},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			s := newStore(t, projection.Options{})
			seq := uint64(1)
			for _, b := range batches {
				if _, err := s.Apply(ctx, nil, msgs(t, seq, b...)); err != nil {
					t.Fatal(err)
				}
				seq += uint64(len(b))
			}
			for _, p := range []string{"pz", "py", "p1", "p3"} {
				if _, err := s.Project(ctx, p); err != nil {
					t.Errorf("project %s: %v; want a row", p, err)
				}
			}
			if _, err := s.Project(ctx, "p2"); err == nil {
				t.Errorf("project p2 has a row; want none (its only event was refused)")
			}
			dls, err := s.DeadLetters(ctx, projection.DeadLetterFilter{})
			if err != nil {
				t.Fatal(err)
			}
			got := map[uint64]string{}
			for _, d := range dls {
				got[d.StreamSeq] = d.Reason
			}
			want := map[uint64]string{2: string(events.ReasonBuildProjectClash), 5: string(events.ReasonIDConflict)}
			if len(got) != len(want) || got[2] != want[2] || got[5] != want[5] {
				t.Errorf("dead letters = %v; want %v", got, want)
			}
		})
	}
}
