package events_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/buildstate/buildstate/internal/events"
)

// The partition is FNV-1a 32 of the project id mod n; these values were
// computed independently (Python: the 32-bit FNV-1a of the bytes) and are the
// partitions nats-server's transform gave in the natsjs test.
func TestPartitionIsFNV1a(t *testing.T) {
	for _, tc := range []struct {
		project string
		n, want int
	}{
		{"p-1", 16, 5}, {"", 16, 5}, {"p-1", 1, 0}, {"p-1", 0, 0},
	} {
		if got := events.Partition(tc.project, tc.n); got != tc.want {
			t.Errorf("Partition(%q, %d) = %d, want %d", tc.project, tc.n, got, tc.want)
		}
	}
	// Spread: 20,000 projects over 16 partitions, each within 10% of 1,250.
	counts := make([]int, 16)
	for i := range 20000 {
		counts[events.Partition(fmt.Sprintf("p-%d", i), 16)]++
	}
	if lo, hi := slices.Min(counts), slices.Max(counts); lo < 1125 || hi > 1375 {
		t.Errorf("partition sizes %v: spread %d..%d", counts, lo, hi)
	}
}

func TestStoredSubjects(t *testing.T) {
	l, err := events.LayoutOf(16)
	if err != nil {
		t.Fatal(err)
	}
	k := events.Partition("p-1", 16)
	stored := fmt.Sprintf("p16.%d.builds.p-1.started", k)
	if _, _, err := events.ParseSubject("builds", "p16.x.builds.p-1.started"); err == nil {
		t.Error("ParseSubject accepted a partition that is not a number")
	}
	for _, tc := range []struct {
		subject string
		ok      bool
	}{
		{"builds.p-1.started", true},
		{stored, true},
		{fmt.Sprintf("p16.%d.builds.p-1.started", (k+1)%16), false}, // another partition than the project's
		{fmt.Sprintf("p16.%d.other.p-1.started", k), false},         // another prefix
		{"p16.16.builds.p-1.started", false},                        // no partition 16 of 16
		{"p1.0.builds.p-1.started", false},                          // p1 has no stored form
		{fmt.Sprintf("p16.%d.builds.p-1", k), false},
	} {
		project, kind, err := events.ParseSubject("builds", tc.subject)
		switch {
		case tc.ok && (err != nil || project != "p-1" || kind != events.KindStarted):
			t.Errorf("ParseSubject(%q) = %q, %q, %v; want p-1, started", tc.subject, project, kind, err)
		case !tc.ok && !errors.Is(err, events.ErrInvalid):
			t.Errorf("ParseSubject(%q) = %q, %q, %v; want it refused", tc.subject, project, kind, err)
		case !tc.ok && events.ReasonOf(err) != events.ReasonBadSubject:
			t.Errorf("ParseSubject(%q): reason %q, want %q", tc.subject, events.ReasonOf(err), events.ReasonBadSubject)
		}
	}
	src, dst := l.Transform("builds")
	if src != "builds.*.*" || dst != "p16.{{partition(16,1)}}.builds.{{wildcard(1)}}.{{wildcard(2)}}" {
		t.Errorf("Transform = %q → %q", src, dst)
	}
	if got := l.ProjectSubjects("builds", "p-1"); !slices.Equal(got, []string{"builds.p-1.*", fmt.Sprintf("p16.%d.builds.p-1.*", k)}) {
		t.Errorf("ProjectSubjects = %v", got)
	}
	if _, err := events.LayoutOf(0); err == nil {
		t.Error("LayoutOf(0) accepted")
	}
}
