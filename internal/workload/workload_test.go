package workload

import (
	"fmt"
	"math"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
)

var start = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestGenerateIsDeterministic(t *testing.T) {
	cfg := Config{Projects: 20, BuildsPerProject: 2, MaxBuildsPerProject: 5, DupRate: 0.1, Shuffle: true, Start: start}
	a, b := Generate(7, cfg), Generate(7, cfg)
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("Generate(7, %+v) differs between two calls", cfg)
	}
	if c := Generate(8, cfg); reflect.DeepEqual(a, c) {
		t.Fatalf("Generate(8, cfg) = Generate(7, cfg); want different workloads")
	}
}

func TestGenerateExtendsWithMoreProjects(t *testing.T) {
	small := Generate(3, Config{Projects: 5, Start: start})
	large := Generate(3, Config{Projects: 10, Start: start})
	if len(large) <= len(small) || !reflect.DeepEqual(large[:len(small)], small) {
		t.Fatalf("Generate(3, 10 projects) does not start with Generate(3, 5 projects)")
	}
}

func TestGenerateEventsAreValid(t *testing.T) {
	evs := Generate(1, Config{Projects: 300, MaxBuildsPerProject: 8, DupRate: 0.05, Shuffle: true, Start: start})
	now := start.Add(Span)
	for _, ev := range evs {
		if err := events.Validate(ev, now); err != nil {
			t.Fatalf("Validate(%+v) = %v; want nil", ev, err)
		}
		if ev.OccurredAt.Before(start) || !ev.OccurredAt.Before(start.Add(Span)) {
			t.Errorf("event %s occurred at %s; want within [%s, %s)", ev.ID, ev.OccurredAt, start, start.Add(Span))
		}
		body, err := ev.Marshal()
		if err != nil {
			t.Fatalf("Marshal(%s) = %v", ev.ID, err)
		}
		got, err := events.Decode("builds", events.Subject("builds", ev.ProjectID, ev.Kind()), body, now)
		if err != nil {
			t.Fatalf("Decode(%q) = %v; want nil", body, err)
		}
		if got.Digest() != ev.Digest() {
			t.Fatalf("Decode(%q) = %+v; want %+v", body, got, ev)
		}
	}
}

func TestGenerateDefaultStartIsInThePast(t *testing.T) {
	for _, ev := range Generate(2, Config{Projects: 50}) {
		if err := events.Validate(ev, time.Time{}); err != nil {
			t.Fatalf("Validate(%+v, now) = %v; want nil", ev, err)
		}
		if ev.OccurredAt.After(time.Now()) {
			t.Fatalf("event %s occurred at %s, in the future", ev.ID, ev.OccurredAt)
		}
	}
}

func TestGenerateDupRate(t *testing.T) {
	for _, rate := range []float64{0, 0.01, 0.05, 0.5, 1.5} {
		t.Run(fmt.Sprint(rate), func(t *testing.T) {
			evs := Generate(5, Config{Projects: 200, DupRate: rate, Shuffle: true, Start: start})
			first := map[string]events.Event{}
			for _, ev := range evs {
				if prev, ok := first[ev.ID]; ok {
					if prev.Digest() != ev.Digest() {
						t.Fatalf("id %s is used by two different events: %+v and %+v", ev.ID, prev, ev)
					}
					continue
				}
				first[ev.ID] = ev
			}
			distinct := len(first)
			dups := len(evs) - distinct
			// Copies drawn with replacement may hit one event twice: the
			// count of extra copies is exact, the distinct count is not
			// affected by it.
			if want := int(math.Round(float64(distinct) * rate)); dups != want {
				t.Errorf("Generate with DupRate %v: %d duplicates of %d events; want %d", rate, dups, distinct, want)
			}
		})
	}
}

func TestGenerateShape(t *testing.T) {
	tests := []struct {
		cfg      Config
		min, max int
	}{
		{Config{Projects: 10, Start: start, Clean: true}, 3, 3},
		{Config{Projects: 10, BuildsPerProject: 1, Start: start, Clean: true}, 1, 1},
		{Config{Projects: 50, BuildsPerProject: 2, MaxBuildsPerProject: 6, Start: start, Clean: true}, 2, 6},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%d-%d", tt.min, tt.max), func(t *testing.T) {
			builds := map[string]map[string]int{} // project -> build -> events
			for _, ev := range Generate(9, tt.cfg) {
				if builds[ev.ProjectID] == nil {
					builds[ev.ProjectID] = map[string]int{}
				}
				builds[ev.ProjectID][ev.BuildID]++
			}
			if len(builds) != tt.cfg.Projects {
				t.Fatalf("got %d projects; want %d", len(builds), tt.cfg.Projects)
			}
			sizes := map[int]bool{}
			for p, bs := range builds {
				if len(bs) < tt.min || len(bs) > tt.max {
					t.Errorf("project %s has %d builds; want %d to %d", p, len(bs), tt.min, tt.max)
				}
				sizes[len(bs)] = true
				for b, n := range bs {
					if n != 4 {
						t.Errorf("clean build %s has %d events; want 4", b, n)
					}
				}
			}
			if tt.max > tt.min && len(sizes) < 2 {
				t.Errorf("every project has the same number of builds; want a spread over [%d, %d]", tt.min, tt.max)
			}
		})
	}
}

// history is one build's distinct events by kind.
type history map[events.Kind][]events.Event

func histories(evs []events.Event) map[string]history {
	hs := map[string]history{}
	for _, ev := range Natural(evs) {
		if hs[ev.BuildID] == nil {
			hs[ev.BuildID] = history{}
		}
		hs[ev.BuildID][ev.Kind()] = append(hs[ev.BuildID][ev.Kind()], ev)
	}
	return hs
}

func TestGenerateIrregularities(t *testing.T) {
	count := func(cfg Config) map[string]int {
		evs := Generate(11, cfg)
		hs := histories(evs)
		n := map[string]int{}
		for _, h := range hs {
			if len(h[events.KindQueued]) == 0 {
				n["no queued"]++
			}
			if len(h[events.KindQueued]) == 0 && len(h[events.KindStarted]) > 0 {
				n["started without queued"]++
			}
			if len(h[events.KindMetricsRecorded]) == 0 {
				n["no metrics"]++
			}
			if len(h[events.KindCompleted]) == 0 {
				n["unfinished"]++
			}
			for _, evs := range h {
				if len(evs) > 1 {
					n["correction"]++
				}
			}
			if s, c := h[events.KindStarted], h[events.KindCompleted]; len(s) > 0 && len(c) > 0 && c[0].OccurredAt.Before(s[0].OccurredAt) {
				n["clock skew"]++
			}
		}
		n["overlap"] = overlaps(evs)
		return n
	}

	got := count(Config{Projects: 1000, Start: start})
	for _, k := range []string{"no queued", "started without queued", "no metrics", "unfinished", "correction", "clock skew", "overlap"} {
		if got[k] == 0 {
			t.Errorf("no build with %s in 1000 projects; want some", k)
		}
	}
	clean := count(Config{Projects: 1000, Start: start, Clean: true})
	for _, k := range []string{"no queued", "no metrics", "unfinished", "correction", "clock skew", "overlap"} {
		if clean[k] != 0 {
			t.Errorf("clean workload has %d builds with %s; want none", clean[k], k)
		}
	}
	t.Logf("irregular builds in 1000 projects: %v", got)
}

// overlaps counts builds queued before the previous build of the same
// project (by build number) completed.
func overlaps(evs []events.Event) int {
	type span struct{ queued, completed time.Time }
	spans := map[string]map[int]*span{}
	for _, ev := range evs {
		var n int
		if _, err := fmt.Sscanf(ev.BuildID[len(ev.ProjectID):], "-b%d", &n); err != nil {
			continue
		}
		if spans[ev.ProjectID] == nil {
			spans[ev.ProjectID] = map[int]*span{}
		}
		s := spans[ev.ProjectID][n]
		if s == nil {
			s = &span{}
			spans[ev.ProjectID][n] = s
		}
		switch ev.Kind() {
		case events.KindQueued:
			s.queued = ev.OccurredAt
		case events.KindCompleted:
			s.completed = ev.OccurredAt
		}
	}
	count := 0
	for _, bs := range spans {
		for n, s := range bs {
			prev := bs[n-1]
			if prev != nil && !prev.completed.IsZero() && !s.queued.IsZero() && s.queued.Before(prev.completed) {
				count++
			}
		}
	}
	return count
}

func TestGenerateBuildIDsAreGloballyUnique(t *testing.T) {
	evs := Generate(4, Config{Projects: 2000, BuildsPerProject: 1, MaxBuildsPerProject: 12, DupRate: 0.05, Start: start})
	projectOf := map[string]string{}
	for _, ev := range evs {
		if p, ok := projectOf[ev.BuildID]; ok && p != ev.ProjectID {
			t.Fatalf("build %s is under projects %s and %s; want one", ev.BuildID, p, ev.ProjectID)
		}
		projectOf[ev.BuildID] = ev.ProjectID
	}
}

func TestNatural(t *testing.T) {
	evs := Generate(6, Config{Projects: 300, MaxBuildsPerProject: 5, DupRate: 0.2, Shuffle: true, Start: start})
	nat := Natural(evs)

	distinct := map[string]bool{}
	for _, ev := range evs {
		distinct[ev.ID] = true
	}
	if len(nat) != len(distinct) {
		t.Fatalf("Natural(%d events with %d distinct ids) has %d events; want %d", len(evs), len(distinct), len(nat), len(distinct))
	}
	seen := map[string]bool{}
	for i, ev := range nat {
		if seen[ev.ID] {
			t.Fatalf("Natural: id %s appears twice", ev.ID)
		}
		seen[ev.ID] = true
		if i == 0 {
			continue
		}
		prev := nat[i-1]
		if ev.OccurredAt.Before(prev.OccurredAt) ||
			ev.OccurredAt.Equal(prev.OccurredAt) && slices.Index(events.Kinds, ev.Kind()) < slices.Index(events.Kinds, prev.Kind()) {
			t.Fatalf("Natural: %s (%s %s) comes after %s (%s %s); want sorted by occurred_at, then kind",
				ev.ID, ev.OccurredAt, ev.Kind(), prev.ID, prev.OccurredAt, prev.Kind())
		}
	}
	if again := Natural(slices.Clone(nat)); !reflect.DeepEqual(again, nat) {
		t.Errorf("Natural(Natural(evs)) != Natural(evs)")
	}
	if len(evs) > 0 && &nat[0] == &evs[0] {
		t.Errorf("Natural returned its input; want a copy")
	}
}
