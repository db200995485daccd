package bench_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/buildstate/buildstate/internal/bench"
	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/workload"
)

// TestBenchSmall runs every scenario of the bench at a tiny size and checks
// what they did, not how fast: the projector processes (one, then two on one
// durable) leave the same rows as one Apply of the same messages; the
// baseline ran every statement of every event; the live run saw every event
// become visible.
func TestBenchSmall(t *testing.T) {
	ctx := context.Background()
	env, err := bench.Setup(ctx, bench.Options{Log: testWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(env.Close)

	w := bench.Workload{Seed: 7, Events: 2000, Projects: 150, DupRate: 0.05}
	bl, err := env.PublishBacklog(ctx, "test", w)
	if err != nil {
		t.Fatal(err)
	}
	if bl.Events != 2000 || bl.LastSeq != 2000 || bl.Distinct >= bl.Events {
		t.Fatalf("backlog: %d messages, last seq %d, %d distinct; want 2000, 2000, fewer distinct (duplicates)", bl.Events, bl.LastSeq, bl.Distinct)
	}
	want := applyOnce(t, env, bl)

	for _, n := range []int{1, 2} {
		r, err := env.Catchup(ctx, bl, bench.CatchupConfig{Instances: n, Batch: 100, Timeout: 2 * time.Minute})
		if err != nil {
			t.Fatalf("Catchup(%d instances): %v", n, err)
		}
		if r.Rows.Applied != bl.Distinct || r.Elapsed <= 0 || len(r.Usage) != n || r.MaxPeakRSS() <= 0 {
			t.Errorf("Catchup(%d instances) = %d applied, %s, %d usages, peak RSS %d; want %d applied and real figures",
				n, r.Rows.Applied, r.Elapsed, len(r.Usage), r.MaxPeakRSS(), bl.Distinct)
		}
		if diff := want.diff(readModel(t, r.DatabaseURL)); diff != "" {
			t.Errorf("Catchup(%d instances) rows differ from one Apply of the same messages: %s", n, diff)
		}
	}

	natural := workload.Natural(bl.Workload)
	base, _, err := env.Baseline(ctx, natural)
	if err != nil {
		t.Fatal(err)
	}
	var statements int
	for _, ev := range natural {
		statements += map[events.Kind]int{events.KindQueued: 1, events.KindStarted: 1, events.KindMetricsRecorded: 2, events.KindCompleted: 2}[ev.Kind()]
	}
	if base.Events != len(natural) || base.Statements+base.GaveUp != statements || base.Elapsed <= 0 {
		t.Errorf("Baseline = %d events, %d statements + %d given up; want %d events, %d statements in all",
			base.Events, base.Statements, base.GaveUp, len(natural), statements)
	}

	live, err := env.Live(ctx, bench.LiveConfig{Rate: 500, Duration: 2 * time.Second, Batch: 100})
	if err != nil {
		t.Fatal(err)
	}
	if l := live.Latency; live.Published != 1000 || l.N != 1000 || live.Missing != 0 || l.P50 <= 0 || l.P99 < l.P50 || l.Max < l.P99 || live.Usage.RSS <= 0 {
		t.Errorf("Live = %d published, %d missing, latency %+v, RSS %d; want 1000 events measured, ordered percentiles, an RSS",
			live.Published, live.Missing, l, live.Usage.RSS)
	}
	if live.Batches.Count == 0 {
		t.Errorf("Live: no batches in the projector's metrics")
	}
}

// applyOnce applies the backlog's messages in one Apply on a database of
// its own and returns the read model.
func applyOnce(t *testing.T, env *bench.Env, bl bench.Backlog) model {
	t.Helper()
	ctx := context.Background()
	url, err := env.NewDatabase(ctx, "apply")
	if err != nil {
		t.Fatal(err)
	}
	nm, err := bench.Messages(bl.Workload, bl.Stream.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]projection.Message, len(nm))
	for i, m := range nm {
		msgs[i] = projection.Message{Seq: uint64(i + 1), Subject: m.Subject, Data: m.Data, StoredAt: time.Now()}
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	res, err := projection.New(pool, projection.Options{Prefix: bl.Stream.Prefix}).Apply(ctx, nil, msgs)
	if err != nil {
		t.Fatal(err)
	}
	if res.Applied != bl.Distinct || res.DeadLettered != 0 {
		t.Fatalf("Apply = %+v; want %d applied, no dead letters", res, bl.Distinct)
	}
	return readModel(t, url)
}

// model is a read model, each row as JSON (pointers by value).
type model struct {
	Projects []string
	Metrics  []string
}

// diff describes the first difference of m and got ("" if none).
func (m model) diff(got model) string {
	for _, tab := range []struct {
		name      string
		want, got []string
	}{{"projects", m.Projects, got.Projects}, {"project_build_metrics", m.Metrics, got.Metrics}} {
		for i := range max(len(tab.want), len(tab.got)) {
			var w, g string
			if i < len(tab.want) {
				w = tab.want[i]
			}
			if i < len(tab.got) {
				g = tab.got[i]
			}
			if w != g {
				return fmt.Sprintf("%s has %d rows, want %d; row %d is\n  %s\nwant\n  %s", tab.name, len(tab.got), len(tab.want), i, g, w)
			}
		}
	}
	return ""
}

func rowsJSON[T any](t *testing.T, rows []T) []string {
	t.Helper()
	out := make([]string, len(rows))
	for i, r := range rows {
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = string(b)
	}
	return out
}

// readModel reads the rows, updated_at (the time of the write) left out.
func readModel(t *testing.T, url string) model {
	t.Helper()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	s := projection.New(pool, projection.Options{})
	projects, err := s.Projects(ctx)
	if err != nil {
		t.Fatal(err)
	}
	metrics, err := s.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range projects {
		projects[i].UpdatedAt = time.Time{}
	}
	if len(projects) == 0 || len(metrics) == 0 {
		t.Fatalf("read model has %d projects, %d metrics rows; want some", len(projects), len(metrics))
	}
	return model{Projects: rowsJSON(t, projects), Metrics: rowsJSON(t, metrics)}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }
