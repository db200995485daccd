package replay_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/replay"
)

// BenchmarkFoldDecoded measures the rules alone (Fold.AddDecoded): 2,000
// projects of 5 builds of 4 events each, every 20th event repeated, decoded
// beforehand (outside the timer).
func BenchmarkFoldDecoded(b *testing.B) {
	fw := "nextjs"
	kinds := []events.Kind{events.KindQueued, events.KindStarted, events.KindMetricsRecorded, events.KindCompleted}
	var msgs []projection.Message
	stored := t0.Add(24 * time.Hour)
	for p := range 2000 {
		for bld := range 5 {
			for k, kind := range kinds {
				d := events.Data{}
				switch kind {
				case events.KindStarted:
					d.Framework = &fw
				case events.KindCompleted:
					d.Outcome = events.OutcomeSucceeded
				}
				ev := events.New(kind, fmt.Sprintf("p-%d", p), fmt.Sprintf("p-%d-b-%d", p, bld),
					t0.Add(time.Duration(bld*10+k)*time.Minute), d)
				m := projection.Message{Seq: uint64(len(msgs) + 1), Subject: subject(ev), Data: body(b, ev), StoredAt: stored}
				msgs = append(msgs, m)
				if len(msgs)%20 == 0 {
					m.Seq++
					msgs = append(msgs, m)
				}
			}
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		f := replay.NewFold("builds")
		dec := f.Decode(msgs, replay.Decoded{})
		b.StartTimer()
		if err := f.AddDecoded(dec); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(msgs)), "ns/event")
}
