package replay_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/replay"
	"github.com/buildstate/buildstate/internal/workload"
)

// The fold that time travel uses and the store that the projector and a
// rebuild use give the same read model from the same messy log, whatever
// the store's batch boundaries.
func TestFoldMatchesStore(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	store := projection.New(newDB(t), projection.Options{})
	history := messyHistory(t, 3, 150)
	now := time.Now()
	fold := replay.NewFold("builds")
	msgs := make([]projection.Message, len(history))
	for i, m := range history {
		msgs[i] = projection.Message{Seq: uint64(i + 1), Subject: m.subject, Data: m.data, StoredAt: now}
		if _, err := fold.Add(msgs[i].Seq, m.subject, m.data, now); err != nil && !errors.Is(err, events.ErrInvalid) {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(3, 3))
	var dead int
	for i := 0; i < len(msgs); {
		j := min(len(msgs), i+1+rng.IntN(200))
		res, err := store.Apply(ctx, nil, msgs[i:j])
		if err != nil {
			t.Fatal(err)
		}
		dead += res.DeadLettered
		i = j
	}
	sameLines(t, "store vs fold", rowsOf(t, store), foldRows(fold))
	if c := fold.Counts(); c.Refused != dead {
		t.Errorf("fold refused %d messages; the store dead-lettered %d", c.Refused, dead)
	}
}

// Rebuild replays the log into a shadow and swaps it in: a live model that
// was damaged comes back equal to the log's model, and what the live model
// had applied is known to the new tables.
func TestRebuildSwapsInTheLogsModel(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newDB(t)
	log := newLog(t)
	last := publishAll(t, log.JS, messyHistory(t, 5, 120))
	live := projection.New(pool, projection.Options{Gate: true})
	fold := replay.NewFold("builds")
	// The live path: small batches.
	err := log.Read(ctx, replay.Span{To: last, Batch: 13}, func(msgs []projection.Message) error {
		for _, m := range msgs {
			_, _ = fold.Add(m.Seq, m.Subject, m.Data, m.StoredAt)
		}
		_, err := live.Apply(ctx, nil, msgs)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	want := foldRows(fold)
	sameLines(t, "live vs fold", rowsOf(t, live), want)
	if _, err := pool.Exec(ctx, `UPDATE projects SET build_status = 'canceled', framework = 'damaged' WHERE project_id = 'p-7'`); err != nil {
		t.Fatal(err)
	}
	var progress strings.Builder
	res, err := replay.Rebuild(ctx, pool, log, replay.RebuildOptions{
		Options: replay.Options{Batch: 250, Progress: &progress, ProgressEvery: time.Nanosecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Swapped || res.Replay.Messages != int(last) || res.Replay.Through != last {
		t.Errorf("Rebuild = %+v; want swapped, %d messages through %d", res, last, last)
	}
	sameLines(t, "after rebuild", rowsOf(t, live), want)
	if !strings.Contains(progress.String(), "events (") || !strings.Contains(progress.String(), "/s") {
		t.Errorf("progress lines = %q; want done/total and rate", progress.String())
	}
	// Every event is known to the swapped-in tables: a redelivery of the
	// whole log changes nothing.
	err = log.Read(ctx, replay.Span{To: last}, func(msgs []projection.Message) error {
		r, err := live.Apply(ctx, nil, msgs)
		if r.Applied != 0 {
			t.Errorf("re-apply after rebuild applied %d events; want 0", r.Applied)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	sameLines(t, "after redelivery", rowsOf(t, live), want)
}

func TestReadSpan(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	log := newLog(t)
	var hist []raw
	at := time.Now().Add(-time.Hour)
	for i := range 30 {
		p := []string{"p-a", "p-b", "p-c"}[i%3]
		ev := events.New(events.KindQueued, p, p+"-b"+string(rune('a'+i)), at, events.Data{})
		hist = append(hist, raw{events.Subject("builds", p, ev.Kind()), mustMarshal(t, ev)})
	}
	publishAll(t, log.JS, hist[:20])
	time.Sleep(20 * time.Millisecond)
	cut := time.Now()
	time.Sleep(20 * time.Millisecond)
	publishAll(t, log.JS, hist[20:])

	read := func(span replay.Span) []uint64 {
		t.Helper()
		var seqs []uint64
		err := log.Read(ctx, span, func(msgs []projection.Message) error {
			if len(msgs) > max(span.Batch, 1) && span.Batch > 0 {
				t.Errorf("batch of %d; want at most %d", len(msgs), span.Batch)
			}
			for _, m := range msgs {
				seqs = append(seqs, m.Seq)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("Read(%+v) = %v", span, err)
		}
		return seqs
	}
	seq := func(from, to, step uint64) []uint64 {
		var out []uint64
		for s := from; s <= to; s += step {
			out = append(out, s)
		}
		return out
	}
	tests := []struct {
		name string
		span replay.Span
		want []uint64
	}{
		{"all", replay.Span{To: 30, Batch: 7}, seq(1, 30, 1)},
		{"a window", replay.Span{From: 10, To: 15, Batch: 4}, seq(11, 15, 1)},
		{"past the end stops at the end", replay.Span{From: 25, To: 99}, seq(26, 30, 1)},
		{"empty", replay.Span{From: 30, To: 30}, nil},
		{"one project", replay.Span{Filter: "builds.p-b.*", To: 30, Batch: 2}, seq(2, 30, 3)},
		{"one project up to a sequence", replay.Span{Filter: "builds.p-b.*", To: 10}, seq(2, 8, 3)},
		{"up to a time", replay.Span{To: 30, Until: cut}, seq(1, 20, 1)},
		{"nothing under the filter", replay.Span{Filter: "builds.p-z.*", To: 30}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := read(tt.span)
			if len(got) != len(tt.want) || (len(got) > 0 && (got[0] != tt.want[0] || got[len(got)-1] != tt.want[len(tt.want)-1])) {
				t.Errorf("Read(%+v) = %v; want %v", tt.span, got, tt.want)
			}
		})
	}
	stop := errors.New("stop")
	calls := 0
	err := log.Read(ctx, replay.Span{To: 30, Batch: 5}, func([]projection.Message) error { calls++; return stop })
	if !errors.Is(err, stop) || calls != 1 {
		t.Errorf("Read with a failing fn = %v after %d calls; want stop after 1", err, calls)
	}
}

// ProjectAt replays one project's subjects only; up to any point its view
// equals that of a fold of the whole log up to the same point.
func TestProjectAt(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	log := newLog(t)
	evs := workload.Generate(8, workload.Config{Projects: 12, BuildsPerProject: 3, DupRate: 0.1, Shuffle: true})
	var hist []raw
	for _, ev := range evs {
		hist = append(hist, raw{events.Subject("builds", ev.ProjectID, ev.Kind()), mustMarshal(t, ev)})
	}
	last := publishAll(t, log.JS, hist)
	var all []projection.Message
	if err := log.Read(ctx, replay.Span{To: last}, func(m []projection.Message) error { all = append(all, m...); return nil }); err != nil {
		t.Fatal(err)
	}
	for _, point := range []uint64{last / 4, last / 2, last} {
		fold := replay.NewFold("builds")
		for _, m := range all[:point] {
			_, _ = fold.Add(m.Seq, m.Subject, m.Data, m.StoredAt)
		}
		for _, p := range []string{"p-0", "p-5", "p-11"} {
			pv, err := replay.ProjectAt(ctx, log, p, replay.At{Seq: point})
			if err != nil {
				t.Fatal(err)
			}
			want := fold.View(p)
			if !fsm.SameRow(pv.View.Row, want.Row) || len(pv.View.Metrics) != len(want.Metrics) {
				t.Errorf("ProjectAt(%s, seq %d) = %+v; want %+v", p, point, pv.View.Row, want.Row)
			}
			if pv.Through != point || pv.Last.Seq > point || !pv.History.Whole() {
				t.Errorf("ProjectAt(%s, seq %d): through %d, last %d, whole %v", p, point, pv.Through, pv.Last.Seq, pv.History.Whole())
			}
		}
	}
	if _, err := replay.ProjectAt(ctx, log, "p.>", replay.At{}); err == nil {
		t.Errorf("ProjectAt(\"p.>\") = nil error; want the project id refused")
	}
}

// A stream whose limits dropped its first messages cannot be rebuilt
// unless the caller accepts it.
func TestRebuildRefusesTruncatedStream(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newDB(t)
	log := newLog(t)
	cfg := jetstream.StreamConfig{Name: "SHORT", Subjects: []string{"short.>"}, MaxMsgs: 5, Storage: jetstream.MemoryStorage}
	if _, err := log.JS.CreateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		ev := events.New(events.KindQueued, "p-1", "b-"+string(rune('a'+i)), time.Now().Add(-time.Minute), events.Data{})
		if _, err := log.JS.Publish(ctx, events.Subject("short", "p-1", ev.Kind()), mustMarshal(t, ev)); err != nil {
			t.Fatal(err)
		}
	}
	short := replay.Log{JS: log.JS, Stream: "SHORT", Prefix: "short"}
	_, err := replay.Rebuild(ctx, pool, short, replay.RebuildOptions{})
	if !errors.Is(err, replay.ErrTruncated) || !strings.Contains(err.Error(), "first sequence is 4") ||
		!strings.Contains(err.Error(), "max_msgs 5") || !strings.Contains(err.Error(), "README") {
		t.Fatalf("Rebuild of a truncated stream = %v; want ErrTruncated naming the first sequence, the limit and the README", err)
	}
	res, err := replay.Rebuild(ctx, pool, short, replay.RebuildOptions{Options: replay.Options{AllowTruncated: true}})
	if err != nil {
		t.Fatalf("Rebuild --allow-truncated = %v", err)
	}
	if res.Replay.Messages != 5 {
		t.Errorf("Rebuild --allow-truncated replayed %d messages; want the 5 left", res.Replay.Messages)
	}
}
