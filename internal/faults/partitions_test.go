package faults

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/replay"
)

func str(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// TestPartitionedLayout switches a stream of layout p1 that holds half a
// backlog to four partitions while two projectors run on it, publishes the
// other half, and checks: the server stores the new messages under
// p4.<k>.builds.… with k = events.Partition of their project; the durable
// applies what was stored before the switch, then each partition's writer
// its partition; the rows equal the reference, every distinct id applied
// once; each partition has its row in projector_partitions. A projector
// asking for another count is refused and says which to use.
func TestPartitionedLayout(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	evs := backlog(611, 1200)
	raw := rawEvents(t, evs)
	half := len(raw) / 2
	before := r.publishRaw(t, raw[:half])

	four := func(c *projector.Config) { c.Partitions = 4 }
	ps := []*inProcess{startInProcess(t, r, 250, four), startInProcess(t, r, 250, four)}
	after := r.publishRaw(t, raw[half:])
	msgs := append(before, after...)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	alive := allAlive(ps)
	start := time.Now()
	names := []string{durable}
	layout := events.Layout{Partitions: 4}
	for k := range 4 {
		names = append(names, natsjs.PartitionDurable(durable, layout, k))
	}
	r.waitDrainedAll(t, names, 3*time.Minute, alive)
	t.Logf("drained %d messages in %v", len(msgs), time.Since(start).Round(time.Millisecond))

	// Stored subjects: the server's partition is the Go one.
	ctx := context.Background()
	s, err := r.js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []projectionMsg{{before[0].Seq, before[0].Subject}, {after[0].Seq, after[0].Subject}, {after[len(after)-1].Seq, after[len(after)-1].Subject}} {
		raw, err := s.GetMsg(ctx, m.seq)
		if err != nil {
			t.Fatal(err)
		}
		wantSubject := m.subject
		if m.seq > before[len(before)-1].Seq {
			project, _, err := events.ParseSubject(prefix, m.subject)
			if err != nil {
				t.Fatal(err)
			}
			wantSubject = fmt.Sprintf("p4.%d.%s", events.Partition(project, 4), m.subject)
		}
		if raw.Subject != wantSubject {
			t.Errorf("message %d stored as %q; want %q", m.seq, raw.Subject, wantSubject)
		}
	}

	var applied float64
	for i, p := range ps {
		x := scrape(t, p.addr)
		applied += metric(x, "buildstate_events_applied_total")
		assertNoRetries(t, x)
		t.Logf("projector %d: applied %v, acquired %v, fenced %v, owned %v", i+1, metric(x, "buildstate_events_applied_total"),
			metric(x, "buildstate_partition_acquired_total"), metric(x, "buildstate_fenced_total"), metric(x, "buildstate_partition_owned"))
		if err, took := p.stop(t); err != nil {
			t.Errorf("projector %d: Run after stop = %v (%v); want nil", i+1, err, took)
		}
	}
	if applied != float64(len(want)) {
		t.Errorf("the projectors applied %v events in all; want %d, each distinct id once", applied, len(want))
	}
	assertSameModel(t, r.dbURL, ref, want)
	if m := readModel(t, r.dbURL); m.deadLetters != 0 {
		t.Errorf("%d dead letters; want 0", m.deadLetters)
	}
	pool := openPool(t, r.dbURL)
	rows, got := partitionRows(t, pool)
	for _, row := range rows {
		if row.Epoch < 1 || row.AppliedSeq < 1 {
			t.Errorf("partition row %+v: want an epoch and a checkpoint", row)
		}
	}
	if strings.Join(got, " ") != "p1/0 p4/0 p4/1 p4/2 p4/3" {
		t.Errorf("projector_partitions rows %v; want p1/0 and p4/0..3", got)
	}

	// Replay reads both subject forms: verify finds the live rows equal to a
	// replay of the whole log, and a project's view at the end of the log
	// (status --at) is its row.
	lg := replay.Log{JS: r.js, Stream: stream, Prefix: prefix}
	if lg.Layout, lg.Former, err = natsjs.StreamLayout(ctx, r.js, stream, prefix); err != nil || lg.Layout.N() != 4 {
		t.Fatalf("StreamLayout = %v, %v; want p4", lg.Layout, err)
	}
	rep, err := replay.Verify(ctx, pool, lg, replay.VerifyOptions{Durable: durable, Store: projection.Options{Prefix: prefix}})
	if err != nil || !rep.OK() || rep.Through != msgs[len(msgs)-1].Seq {
		var b strings.Builder
		rep.Write(&b)
		t.Errorf("verify: %v, through %d of %d\n%s", err, rep.Through, msgs[len(msgs)-1].Seq, b.String())
	}
	project := evs[len(evs)-1].ProjectID
	view, err := replay.ProjectAt(ctx, lg, project, replay.At{})
	if err != nil {
		t.Fatal(err)
	}
	var live string
	if err := pool.QueryRow(ctx, `SELECT coalesce(current_build_id, '') FROM projects WHERE project_id = $1`, project).Scan(&live); err != nil {
		t.Fatal(err)
	}
	if view.View.Row == nil || view.Counts.Applied == 0 || str(view.View.Row.CurrentBuildID) != live {
		t.Errorf("status --at of %s: %+v; want its live current build %q", project, view, live)
	}

	// Another count on this stream is refused before anything runs.
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err = projector.Run(rctx, projector.Config{DatabaseURL: r.dbURL, NATS: natsjs.Client{URL: r.natsURL},
		Stream: stream, Prefix: prefix, Durable: durable, Partitions: 2})
	if !errors.Is(err, natsjs.ErrLayout) || !strings.Contains(err.Error(), "--partitions 4") {
		t.Errorf("projector with --partitions 2 on a p4 stream: %v; want ErrLayout naming --partitions 4", err)
	}
	for _, n := range []int{1, 0} {
		err = projector.Run(rctx, projector.Config{DatabaseURL: r.dbURL, NATS: natsjs.Client{URL: r.natsURL},
			Stream: stream, Prefix: prefix, Durable: durable, Partitions: n})
		if !errors.Is(err, natsjs.ErrLayout) {
			t.Errorf("projector with --partitions %d on a p4 stream: %v; want ErrLayout", n, err)
		}
	}
}

type projectionMsg struct {
	seq     uint64
	subject string
}

// waitDrainedAll waits until every named durable has nothing pending,
// awaiting an ack or redelivered.
func (r *rig) waitDrainedAll(t *testing.T, names []string, timeout time.Duration, alive func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var busy []string
		for _, name := range names {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			var info *jetstream.ConsumerInfo
			c, err := r.js.Consumer(ctx, stream, name)
			if err == nil {
				info, err = c.Info(ctx)
			}
			cancel()
			switch {
			case err != nil:
				busy = append(busy, fmt.Sprintf("%s: %v", name, err))
			case info.NumPending != 0 || info.NumAckPending != 0 || info.NumRedelivered != 0:
				busy = append(busy, fmt.Sprintf("%s: pending %d, ack pending %d, redelivered %d", name, info.NumPending, info.NumAckPending, info.NumRedelivered))
			}
		}
		if len(busy) == 0 {
			return
		}
		if alive != nil {
			if err := alive(); err != nil {
				t.Fatalf("projector stopped before the backlog drained: %v", err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("backlog not drained in %s: %s", timeout, strings.Join(busy, "; "))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestRepartition changes a partitioned stream's count (p4 → p2) with
// --repartition: a p4 projector applies a third of a backlog and stops, a
// third more is stored in p4's form and left unapplied; a p2 projector
// without --repartition is refused and names the flag; with it, the stream
// is switched, the drain applies what p4's partitions left (then it, p4's
// durables are deleted, p4's partition rows retired for good), p2's partitions apply the
// last third. Rows equal the reference, every distinct id applied once, and
// verify (reading the published form and both stored forms) finds the rows
// equal to a replay of the whole log.
func TestRepartition(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	_, names4 := r.partitioned(t, 4)
	evs := backlog(613, 1200)
	raw := rawEvents(t, evs)
	third := len(raw) / 3
	msgs := r.publishRaw(t, raw[:third])
	four := func(c *projector.Config) { c.Partitions = 4 }
	p := startInProcess(t, r, 100, four)
	r.waitDrainedAll(t, names4, 2*time.Minute, allAlive([]*inProcess{p}))
	applied := metric(scrape(t, p.addr), "buildstate_events_applied_total")
	if err, _ := p.stop(t); err != nil {
		t.Fatalf("p4 projector: %v", err)
	}
	msgs = append(msgs, r.publishRaw(t, raw[third:2*third])...) // stored as p4.<k>.…, not applied

	ctx := context.Background()
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err := projector.Run(rctx, projector.Config{DatabaseURL: r.dbURL, NATS: natsjs.Client{URL: r.natsURL},
		Stream: stream, Prefix: prefix, Durable: durable, Partitions: 2})
	if !errors.Is(err, natsjs.ErrLayout) || !strings.Contains(err.Error(), "--partitions 2 --repartition") {
		t.Fatalf("p2 projector without --repartition on a p4 stream: %v; want ErrLayout naming --repartition", err)
	}

	two := func(c *projector.Config) { c.Partitions, c.Repartition = 2, true }
	q := startInProcess(t, r, 100, two)
	last := r.publishRaw(t, raw[2*third:])
	msgs = append(msgs, last...)
	p2 := events.Layout{Partitions: 2}
	names2 := []string{durable}
	for k := range 2 {
		names2 = append(names2, natsjs.PartitionDurable(durable, p2, k))
	}
	alive := allAlive([]*inProcess{q})
	r.waitDrainedAll(t, names2, 2*time.Minute, alive)
	waitFor(t, time.Minute, "the drain and p4's durables deleted", func() bool {
		s, err := r.js.Stream(ctx, stream)
		if err != nil {
			return false
		}
		names := s.ConsumerNames(ctx)
		var left []string
		for n := range names.Name() {
			if !slices.Contains(names2, n) {
				left = append(left, n)
			}
		}
		return names.Err() == nil && len(left) == 0 || alive() != nil
	})
	if err := alive(); err != nil {
		t.Fatalf("p2 projector stopped: %v\n%s", err, q.logs.String())
	}
	x := scrape(t, q.addr)
	applied += metric(x, "buildstate_events_applied_total")
	t.Logf("p2 projector: applied %v, duplicates %v, acquired %v", metric(x, "buildstate_events_applied_total"),
		metric(x, "buildstate_events_duplicates_total"), metric(x, "buildstate_partition_acquired_total"))
	if err, _ := q.stop(t); err != nil {
		t.Errorf("p2 projector: Run after stop = %v", err)
	}
	want := distinctIDs(evs)
	if applied != float64(len(want)) {
		t.Errorf("the projectors applied %v events in all; want %d, each distinct id once", applied, len(want))
	}
	assertSameModel(t, r.dbURL, reference(t, msgs), want)

	// The last third is stored in p2's form.
	s, err := r.js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetMsg(ctx, last[0].Seq)
	if err != nil {
		t.Fatal(err)
	}
	if project, _, err := events.ParseSubject(prefix, last[0].Subject); err != nil || m.Subject != fmt.Sprintf("p2.%d.%s", events.Partition(project, 2), last[0].Subject) {
		t.Errorf("message %d stored as %q (%v); want p2's form", last[0].Seq, m.Subject, err)
	}
	pool := openPool(t, r.dbURL)
	rows, got := partitionRows(t, pool)
	for _, row := range rows {
		if retired := strings.HasPrefix(row.Owner, "retired: "); retired != (row.Layout == "p4") {
			t.Errorf("partition row %+v: want p4's retired, the others not", row)
		}
	}
	if strings.Join(got, " ") != "p1/0 p2/0 p2/1 p4/0 p4/1 p4/2 p4/3" {
		t.Errorf("projector_partitions rows %v; want p1/0, p2/0..1 and p4's four, retired", got)
	}
	// A projector still running p4 could not take a partition of it back.
	if _, err := projection.New(pool, projection.Options{Prefix: prefix}).Acquire(ctx, "p4", 0, "stale"); !errors.Is(err, projection.ErrRetired) {
		t.Errorf("Acquire of a retired p4 partition = %v; want ErrRetired", err)
	}
	lg := replay.Log{JS: r.js, Stream: stream, Prefix: prefix}
	if lg.Layout, lg.Former, err = natsjs.StreamLayout(ctx, r.js, stream, prefix); err != nil || lg.Layout != p2 || len(lg.Former) != 1 {
		t.Fatalf("StreamLayout = %v, former %v, %v; want p2, [p4]", lg.Layout, lg.Former, err)
	}
	rep, err := replay.Verify(ctx, pool, lg, replay.VerifyOptions{Durable: durable, Store: projection.Options{Prefix: prefix}})
	if err != nil || !rep.OK() || rep.Through != msgs[len(msgs)-1].Seq {
		var b strings.Builder
		rep.Write(&b)
		t.Errorf("verify: %v, through %d of %d\n%s", err, rep.Through, msgs[len(msgs)-1].Seq, b.String())
	}
}

// partitionRows reads projector_partitions: the rows, and each as layout/partition.
func partitionRows(t *testing.T, pool *pgxpool.Pool) ([]projection.PartitionRow, []string) {
	t.Helper()
	rows, err := projection.New(pool, projection.Options{Prefix: prefix}).Partitions(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, row := range rows {
		names = append(names, fmt.Sprintf("%s/%d", row.Layout, row.Partition))
	}
	return rows, names
}
