package projection_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
)

func acquire(t *testing.T, s *projection.Store, owner string) *projection.Fence {
	t.Helper()
	f, err := s.Acquire(context.Background(), projection.LayoutP1, 0, owner)
	if err != nil {
		t.Fatalf("Acquire(%s) = %v", owner, err)
	}
	return f
}

// hold is the p1 fence's hold on its one partition.
func hold(f *projection.Fence) projection.Hold {
	h, _ := f.Hold(0)
	return h
}

func appliedIDs(t *testing.T, s *projection.Store) int {
	t.Helper()
	var n int
	if err := s.Pool().QueryRow(context.Background(), `SELECT count(*) FROM projector_applied`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func partitionRow(t *testing.T, s *projection.Store) projection.PartitionRow {
	t.Helper()
	rows, err := s.Partitions(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].Layout != projection.LayoutP1 || rows[0].Partition != 0 {
		t.Fatalf("Partitions = %+v; want the one row p1/0", rows)
	}
	return rows[0]
}

// An owner whose partition was acquired by another instance commits nothing:
// its batch (rows, ids, a dead letter) fails with ErrFenced, and the new
// owner's batches go through and move the checkpoint.
func TestStaleOwnerCommitsNothing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t, projection.Options{Gate: true})
	if r := partitionRow(t, s); r.Epoch != 0 || r.AppliedSeq != 0 {
		t.Fatalf("fresh partition row = %+v; want epoch 0, applied_seq 0", r)
	}
	a := acquire(t, s, "a")
	if hold(a).Epoch != 1 || hold(a).AppliedSeq != 0 {
		t.Fatalf("first Acquire = %+v; want epoch 1, applied_seq 0", a)
	}
	first := msgs(t, 1, deployed("p-1", "b-1", shadowT0)...)
	if _, err := s.Apply(ctx, a, first); err != nil {
		t.Fatalf("Apply under a's fence = %v", err)
	}
	b := acquire(t, s, "b")
	if hold(b).Epoch != 2 || hold(b).AppliedSeq != 4 {
		t.Fatalf("second Acquire = %+v; want epoch 2, applied_seq 4 (a's checkpoint)", b)
	}

	stale := msgs(t, 5, deployed("p-2", "b-2", shadowT0)...)
	stale = append(stale, projection.Message{Seq: 9, Subject: "builds.p-2.queued", Data: []byte("not json")}) // a dead letter
	before := appliedIDs(t, s)
	res, err := s.Apply(ctx, a, stale)
	if !errors.Is(err, projection.ErrFenced) {
		t.Fatalf("Apply under a's stale fence = %+v, %v; want ErrFenced", res, err)
	}
	if n := appliedIDs(t, s); n != before {
		t.Errorf("%d ids applied after the fenced batch; want %d", n, before)
	}
	if got := projectIDs(t, s); fmt.Sprint(got) != "[p-1]" {
		t.Errorf("projects after the fenced batch = %v; want [p-1]", got)
	}
	if dl, err := s.DeadLetters(ctx, projection.DeadLetterFilter{}); err != nil || len(dl) != 0 {
		t.Errorf("dead letters after the fenced batch = %d, %v; want none", len(dl), err)
	}
	if r := partitionRow(t, s); r.Epoch != 2 || r.Owner != "b" || r.AppliedSeq != 4 {
		t.Errorf("partition row after the fenced batch = %+v; want epoch 2, owner b, applied_seq 4", r)
	}

	// The new owner applies the same messages; an older batch redelivered
	// later (seq below the checkpoint) still commits, as duplicates.
	res, err = s.Apply(ctx, b, stale)
	if err != nil || res.Applied != 4 || res.DeadLettered != 1 {
		t.Fatalf("Apply under b's fence = %+v, %v; want 4 applied, 1 dead letter", res, err)
	}
	res, err = s.Apply(ctx, b, first)
	if err != nil || res.Duplicates != 4 {
		t.Fatalf("redelivered older batch under b's fence = %+v, %v; want 4 duplicates", res, err)
	}
	if r := partitionRow(t, s); r.Epoch != 2 || r.AppliedSeq != 9 {
		t.Errorf("partition row = %+v; want epoch 2, applied_seq 9 (the checkpoint never goes back)", r)
	}
	if got := projectIDs(t, s); fmt.Sprint(got) != "[p-1 p-2]" {
		t.Errorf("projects = %v; want [p-1 p-2]", got)
	}
}

// Under a fence the store still isolates a message the database refuses
// (here a trigger, SQLSTATE 22023): each half and the refused message's own
// transaction pass the compare-and-set, the rest applies, the checkpoint is
// the batch's highest sequence.
func TestFencedBatchIsolatesARefusedMessage(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t, projection.Options{Gate: true})
	if _, err := s.Pool().Exec(ctx, `
CREATE FUNCTION fence_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.framework = 'refused' THEN RAISE EXCEPTION 'refused' USING ERRCODE = 'invalid_parameter_value'; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER fence_refuse BEFORE INSERT OR UPDATE ON projector_facts FOR EACH ROW EXECUTE FUNCTION fence_refuse();`); err != nil {
		t.Fatal(err)
	}
	a := acquire(t, s, "a")
	fw := "refused"
	evs := append(deployed("p-1", "b-1", shadowT0), events.New(events.KindStarted, "p-2", "b-2", shadowT0, events.Data{Framework: &fw}))
	evs = append(evs, deployed("p-3", "b-3", shadowT0)...)
	res, err := s.Apply(ctx, a, msgs(t, 1, evs...))
	if err != nil || res.Applied != 8 || res.DeadLettered != 1 {
		t.Fatalf("Apply = %+v, %v; want 8 applied, 1 dead letter", res, err)
	}
	if r := partitionRow(t, s); r.Epoch != 1 || r.AppliedSeq != 9 {
		t.Errorf("partition row = %+v; want epoch 1, applied_seq 9", r)
	}
}

// A rebuild's swap moves the shadow's projector_partitions in with every
// epoch raised: the live owner's fence fails at its next commit, and its
// acquire after that gets a later epoch than any taken before the swap.
func TestSwapFencesTheLiveOwner(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	live := newStore(t, projection.Options{Gate: true})
	a := acquire(t, live, "a")
	if _, err := live.Apply(ctx, a, msgs(t, 1, deployed("p-1", "b-1", shadowT0)...)); err != nil {
		t.Fatal(err)
	}
	sh, err := projection.OpenShadow(ctx, live.Pool(), "bs_shadow_fence", projection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	apply(t, sh.Store(), msgs(t, 1, deployed("p-1", "b-1", shadowT0)...))
	if err := sh.Swap(ctx, nil); err != nil {
		t.Fatalf("Swap = %v", err)
	}
	if _, err := live.Apply(ctx, a, msgs(t, 5, deployed("p-2", "b-2", shadowT0)...)); !errors.Is(err, projection.ErrFenced) {
		t.Fatalf("Apply under the fence taken before the swap = %v; want ErrFenced", err)
	}
	if r := partitionRow(t, live); r.Epoch != 2 || r.AppliedSeq != 4 {
		t.Errorf("partition row after the swap = %+v; want epoch 2 (raised), applied_seq 4", r)
	}
	again := acquire(t, live, "a")
	if hold(again).Epoch != 3 {
		t.Errorf("Acquire after the swap = %+v; want epoch 3", again)
	}
	if res, err := live.Apply(ctx, again, msgs(t, 5, deployed("p-2", "b-2", shadowT0)...)); err != nil || res.Applied != 4 {
		t.Errorf("Apply after acquiring again = %+v, %v; want 4 applied", res, err)
	}
}

// An acquire while the previous owner's batch holds the partition's row
// waits (lock_timeout, then again, logged) and, once that batch commits,
// returns the checkpoint it wrote: the acquire and the batch cannot both win.
func TestAcquireWaitsForTheOwnersBatch(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	core, logs := observer.New(zap.WarnLevel)
	s := newStore(t, projection.Options{Gate: true, Logger: zap.New(core)})
	a := acquire(t, s, "a")
	// The owner's batch in flight: its compare-and-set ran, its commit has not.
	tx, err := s.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit this is a no-op
	if _, err := tx.Exec(ctx, `UPDATE projector_partitions SET applied_seq = 42 WHERE layout = $1 AND partition = 0 AND epoch = $2`,
		projection.LayoutP1, hold(a).Epoch); err != nil {
		t.Fatal(err)
	}
	type acquired struct {
		f   *projection.Fence
		err error
	}
	done := make(chan acquired, 1)
	go func() {
		f, err := s.Acquire(ctx, projection.LayoutP1, 0, "b")
		done <- acquired{f, err}
	}()
	deadline := time.Now().Add(time.Minute)
	for logs.FilterMessage("acquire waits for the partitions' rows").Len() == 0 {
		select {
		case got := <-done:
			t.Fatalf("Acquire = %+v, %v while the row was locked; want it to wait", got.f, got.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no acquire retry logged within a minute")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	got := <-done
	if got.err != nil || hold(got.f).Epoch != hold(a).Epoch+1 || hold(got.f).AppliedSeq != 42 {
		t.Errorf("Acquire after the batch committed = %+v, %v; want epoch %d, applied_seq 42", got.f, got.err, hold(a).Epoch+1)
	}
}

// A new owner's memory reads a project when a batch names it: its role
// holders, the builds named, and the names of every build it claimed. A
// later batch naming one of those builds reads its facts; it is neither
// taken for a new build (which the claim's insert would refuse, folding the
// batch again) nor folded without its facts.
func TestMemoryReadsAColdBuild(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t, projection.Options{Gate: true})
	var evs []events.Event
	for i, b := range []string{"b-1", "b-2", "b-3"} {
		evs = append(evs, deployed("p-1", b, shadowT0.Add(time.Duration(i)*time.Minute))...)
	}
	apply(t, s, msgs(t, 1, evs...))
	f := acquire(t, s, "new owner")
	// b-3 holds every role; b-2 is named: b-1 stays a name.
	late := events.New(events.KindMetricsRecorded, "p-1", "b-2", shadowT0.Add(time.Hour), events.Data{})
	if res, err := s.Apply(ctx, f, msgs(t, 20, late)); err != nil || res.Applied != 1 || res.Redone != 0 {
		t.Fatalf("first batch = %+v, %v; want 1 applied, none folded again", res, err)
	}
	again := events.New(events.KindCompleted, "p-1", "b-1", shadowT0.Add(time.Hour), events.Data{Outcome: events.OutcomeFailed})
	res, err := s.Apply(ctx, f, msgs(t, 21, again))
	if err != nil || res.Applied != 1 || res.Redone != 0 {
		t.Fatalf("batch naming b-1 = %+v, %v; want 1 applied, none folded again", res, err)
	}
	// b-1's metrics row keeps its start and metrics: it was folded on its facts.
	var status string
	var started *time.Time
	if err := s.Pool().QueryRow(ctx, `SELECT status, started_at FROM project_build_metrics WHERE build_id = 'b-1'`).Scan(&status, &started); err != nil {
		t.Fatal(err)
	}
	if status != "failed" || started == nil || !started.Equal(shadowT0.Add(time.Second)) {
		t.Errorf("b-1 metrics row: status %q, started_at %v; want failed, %v", status, started, shadowT0.Add(time.Second))
	}
	// A project whose only claimed build holds no role (a completion came
	// first) has no facts the read loads for another build's event, but
	// its claim is known all the same.
	apply(t, s, msgs(t, 30, events.New(events.KindCompleted, "p-2", "b-x", shadowT0, events.Data{Outcome: events.OutcomeSucceeded})))
	f = acquire(t, s, "next owner")
	for i, ev := range []events.Event{
		events.New(events.KindQueued, "p-2", "b-y", shadowT0.Add(time.Minute), events.Data{}),
		events.New(events.KindQueued, "p-2", "b-x", shadowT0.Add(-time.Minute), events.Data{}),
	} {
		if res, err := s.Apply(ctx, f, msgs(t, uint64(31+i), ev)); err != nil || res.Applied != 1 || res.Redone != 0 {
			t.Errorf("p-2 batch %d = %+v, %v; want 1 applied, none folded again", i, res, err)
		}
	}
}

// One fence holds several partitions of a layout (the engine's: one
// transaction a batch for all of an instance's partitions). A batch writing
// to two of them, one of which another instance acquired since, commits
// nothing and names that partition (FencedError); the fence drops it, and
// the batch's messages of the other partition then commit under the fence,
// moving only that partition's checkpoint.
func TestFenceOfSeveralPartitions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t, projection.Options{Gate: true})
	layout, _ := events.LayoutOf(4)
	// Two projects of different partitions.
	var px, py string
	for i := 0; py == ""; i++ {
		p := fmt.Sprintf("p-%d", i)
		switch {
		case px == "":
			px = p
		case events.Partition(p, 4) != events.Partition(px, 4):
			py = p
		}
	}
	kx, ky := events.Partition(px, 4), events.Partition(py, 4)
	f, err := s.NewFence(layout.Name())
	if err != nil {
		t.Fatal(err)
	}
	a, err := s.AcquireHolds(ctx, layout.Name(), "a", kx, ky)
	if err != nil {
		t.Fatal(err)
	}
	f.Add(a)
	if got := f.Held(); fmt.Sprint(got) != fmt.Sprint(slices.Sorted(slices.Values([]int{kx, ky}))) {
		t.Fatalf("Held = %v; want [%d %d]", got, kx, ky)
	}
	x, y := msgs(t, 1, deployed(px, "b-x", shadowT0)...), msgs(t, 5, deployed(py, "b-y", shadowT0)...)
	if res, err := s.Apply(ctx, f, slices.Concat(x[:2], y[:2])); err != nil || res.Applied != 4 {
		t.Fatalf("Apply of both partitions = %+v, %v; want 4 applied", res, err)
	}
	if _, err := s.Acquire(ctx, layout.Name(), ky, "b"); err != nil {
		t.Fatal(err)
	}
	_, err = s.Apply(ctx, f, slices.Concat(x[2:], y[2:]))
	var fe *projection.FencedError
	if !errors.As(err, &fe) || !errors.Is(err, projection.ErrFenced) || fmt.Sprint(fe.Partitions) != fmt.Sprint([]int{ky}) {
		t.Fatalf("Apply after %d was acquired by b = %v; want a FencedError naming [%d]", ky, err, ky)
	}
	if f.Holds(ky) || !f.Holds(kx) {
		t.Fatalf("Held = %v; want only %d", f.Held(), kx)
	}
	if n := appliedIDs(t, s); n != 4 {
		t.Fatalf("%d ids applied after the fenced batch; want 4 (nothing of it)", n)
	}
	if res, err := s.Apply(ctx, f, x[2:]); err != nil || res.Applied != 2 {
		t.Fatalf("Apply of %d's rest = %+v, %v; want 2 applied", kx, res, err)
	}
	rows, err := s.Partitions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := map[int]projection.PartitionRow{}
	for _, r := range rows {
		got[r.Partition] = r
	}
	if r := got[kx]; r.Epoch != 1 || r.AppliedSeq != 4 || r.Owner != "a" {
		t.Errorf("partition %d = %+v; want epoch 1, applied_seq 4, owner a", kx, r)
	}
	if r := got[ky]; r.Epoch != 2 || r.AppliedSeq != 6 || r.Owner != "b" {
		t.Errorf("partition %d = %+v; want epoch 2, applied_seq 6 (a's first batch), owner b", ky, r)
	}
	// A batch naming a partition the fence does not hold (released or lost
	// since the caller split it) is refused whole, as fenced on it.
	if _, err := s.Apply(ctx, f, slices.Concat(x[:1], y[2:])); !errors.As(err, &fe) || fmt.Sprint(fe.Partitions) != fmt.Sprint([]int{ky}) {
		t.Errorf("Apply with a partition not held = %v; want a FencedError naming [%d]", err, ky)
	}
}
