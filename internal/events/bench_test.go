package events_test

import (
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/workload"
)

// decodeSample is a workload's events (all four kinds, in the proportions
// of a real log) as canonical bodies with their subjects.
func decodeSample(b *testing.B) (bodies [][]byte, subjects []string) {
	b.Helper()
	evs := workload.Generate(1, workload.Config{Projects: 200, Start: time.Now().Add(-workload.Span)})
	bodies = make([][]byte, len(evs))
	subjects = make([]string, len(evs))
	for i, ev := range evs {
		var err error
		if bodies[i], err = ev.Marshal(); err != nil {
			b.Fatal(err)
		}
		subjects[i] = events.Subject("builds", ev.ProjectID, ev.Kind())
	}
	return bodies, subjects
}

// BenchmarkDecode is Decode per event:
//
//	go test -run '^$' -bench Decode -benchmem ./internal/events
func BenchmarkDecode(b *testing.B) {
	bodies, subjects := decodeSample(b)
	now := time.Now()
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		j := i % len(bodies)
		if _, err := events.Decode("builds", subjects[j], bodies[j], now); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDigest is Event.Digest per event.
func BenchmarkDigest(b *testing.B) {
	evs := workload.Generate(1, workload.Config{Projects: 200, Start: time.Now().Add(-workload.Span)})
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		evs[i%len(evs)].Digest()
	}
}
