package bench_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/bench"
)

// TestRaw runs the raw baseline at a tiny size in both ack modes and checks
// what it did, not how fast: every message fetched and acked (the ack floor
// at the last one: Raw returns only then), its consumer deleted, and real
// figures. Batch 300 does not divide the 2,000 messages, so AckAll finishes
// only if the last message is acked too.
func TestRaw(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	env, err := bench.Setup(ctx, bench.Options{Log: testWriter{t}, NATSOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(env.Close)
	if env.Projector != "" || env.AdminURL != "" || env.Source == "" {
		t.Errorf("Setup(NATSOnly) = projector %q, Postgres %q, source %q; want no projector, no Postgres, the module's commit",
			env.Projector, env.AdminURL, env.Source)
	}
	bl, err := env.PublishBacklog(ctx, "raw", bench.Workload{Seed: 3, Events: 2000, Projects: 100, DupRate: 0.05})
	if err != nil {
		t.Fatal(err)
	}
	var series bench.RawSeries
	for _, ack := range []bench.RawAck{bench.AckEach, bench.AckAll} {
		r, err := env.Raw(ctx, bl, bench.RawConfig{Ack: ack, Batch: 300})
		if err != nil {
			t.Fatalf("Raw(%s): %v", ack, err)
		}
		if r.Ack != ack || r.Messages != 2000 || r.Elapsed <= 0 || r.CPU <= 0 || r.MsgsPerSec() <= 0 {
			t.Errorf("Raw(%s) = %+v; want %s, 2000 messages and real figures", ack, r, ack)
		}
		series = append(series, r)
	}
	if got := series.Median(bench.AckAll); got != series[1].MsgsPerSec() {
		t.Errorf("Median(ack all) = %v; want the one ack-all run's %v", got, series[1].MsgsPerSec())
	}
	st, err := env.JetStream().Stream(ctx, bl.Stream.Name)
	if err != nil {
		t.Fatal(err)
	}
	names := st.ConsumerNames(ctx)
	for name := range names.Name() {
		if strings.HasPrefix(name, "bench-raw-") {
			t.Errorf("consumer %s left on %s after Raw", name, bl.Stream.Name)
		}
	}
	if err := names.Err(); err != nil {
		t.Fatal(err)
	}
}

func TestRawSeriesMedian(t *testing.T) {
	run := func(ack bench.RawAck, secs float64) bench.RawResult {
		return bench.RawResult{Ack: ack, Messages: 1000, Elapsed: time.Duration(secs * float64(time.Second))}
	}
	for _, tt := range []struct {
		name      string
		s         bench.RawSeries
		each, all float64
	}{
		{"empty", nil, 0, 0},
		{"one each", bench.RawSeries{run(bench.AckEach, 1)}, 1000, 0},
		{"odd", bench.RawSeries{run(bench.AckEach, 1), run(bench.AckAll, 0.5), run(bench.AckEach, 4), run(bench.AckEach, 2)}, 500, 2000},
		{"even", bench.RawSeries{run(bench.AckAll, 1), run(bench.AckAll, 0.5), run(bench.AckAll, 0.25), run(bench.AckAll, 2)}, 0, 1500},
	} {
		if got := tt.s.Median(bench.AckEach); got != tt.each {
			t.Errorf("%s: Median(ack each) = %v; want %v", tt.name, got, tt.each)
		}
		if got := tt.s.Median(bench.AckAll); got != tt.all {
			t.Errorf("%s: Median(ack all) = %v; want %v", tt.name, got, tt.all)
		}
	}
}
