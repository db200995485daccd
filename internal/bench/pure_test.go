package bench_test

import (
	"context"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
	"github.com/buildstate/buildstate/internal/workload"
)

// The pure parts of the apply path, per event or per project:
//
//	go test -run '^$' -bench . -benchmem ./internal/bench

func sample(b *testing.B) []events.Event {
	b.Helper()
	return workload.Generate(1, workload.Config{Projects: 200, Start: time.Now().Add(-workload.Span)})
}

func BenchmarkDecode(b *testing.B) {
	evs := sample(b)
	bodies := make([][]byte, len(evs))
	subjects := make([]string, len(evs))
	for i, ev := range evs {
		var err error
		if bodies[i], err = ev.Marshal(); err != nil {
			b.Fatal(err)
		}
		subjects[i] = events.Subject("builds", ev.ProjectID, ev.Kind())
	}
	now := time.Now()
	for i := 0; b.Loop(); i++ {
		j := i % len(evs)
		if _, err := events.Decode("builds", subjects[j], bodies[j], now); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDigest(b *testing.B) {
	evs := sample(b)
	for i := 0; b.Loop(); i++ {
		evs[i%len(evs)].Digest()
	}
}

// projectHistories groups a workload's events by project.
func projectHistories(evs []events.Event) [][]events.Event {
	idx := map[string]int{}
	var out [][]events.Event
	for _, ev := range evs {
		i, ok := idx[ev.ProjectID]
		if !ok {
			i = len(out)
			idx[ev.ProjectID] = i
			out = append(out, nil)
		}
		out[i] = append(out[i], ev)
	}
	return out
}

func fold(evs []events.Event) []*fsm.Build {
	byID := map[string]*fsm.Build{}
	var out []*fsm.Build
	for _, ev := range evs {
		b := byID[ev.BuildID]
		if b == nil {
			b = &fsm.Build{ID: ev.BuildID, ProjectID: ev.ProjectID}
			byID[ev.BuildID] = b
			out = append(out, b)
		}
		b.Merge(ev)
	}
	return out
}

// BenchmarkDecide is one project's decision as a batch makes it: derive the
// views before and after its last event, fire the machine.
func BenchmarkDecide(b *testing.B) {
	type pair struct {
		id            string
		before, after []*fsm.Build
	}
	var ps []pair
	for _, h := range projectHistories(sample(b)) {
		ps = append(ps, pair{h[0].ProjectID, fold(h[:len(h)-1]), fold(h)})
	}
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		p := ps[i%len(ps)]
		if _, err := fsm.Decide(ctx, p.id, fsm.Derive(p.id, p.before), fsm.Derive(p.id, p.after)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecideOnly fires the machine on views derived beforehand.
func BenchmarkDecideOnly(b *testing.B) {
	type pair struct {
		id            string
		before, after fsm.View
	}
	var ps []pair
	for _, h := range projectHistories(sample(b)) {
		id := h[0].ProjectID
		ps = append(ps, pair{id, fsm.Derive(id, fold(h[:len(h)-1])), fsm.Derive(id, fold(h))})
	}
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		p := ps[i%len(ps)]
		if _, err := fsm.Decide(ctx, p.id, p.before, p.after); err != nil {
			b.Fatal(err)
		}
	}
}
