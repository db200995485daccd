package faults

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
)

// partitionRow reads the epoch and owner of partition p1/0.
func partitionRow(t *testing.T, url string) (epoch int64, owner string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, `SELECT epoch, owner FROM projector_partitions WHERE layout = 'p1' AND partition = 0`).Scan(&epoch, &owner); err != nil {
		t.Fatalf("read partition p1/0: %v", err)
	}
	return epoch, owner
}

func partitionEpoch(t *testing.T, url string) int64 {
	t.Helper()
	e, _ := partitionRow(t, url)
	return e
}

// instance is the instance id a projector process logged at start.
func (p *proc) instance(t *testing.T) string {
	t.Helper()
	p.httpAddr(t)
	lines := logLines(p.stderr.String(), "projector consuming")
	if len(lines) == 0 || lines[0]["instance"] == nil {
		t.Fatalf("no instance in the start line\n%s", p.stderr.String())
	}
	return fmt.Sprint(lines[0]["instance"])
}

// waitFor polls cond every 50 ms until it holds, and fails after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// twoProcesses starts two projector binaries on one backlog, waits until one
// of them acquired the partition and applied part of the backlog, and returns
// (owner, standby) with their HTTP addresses.
func twoProcesses(t *testing.T, bin string, r *rig, total int) (owner, standby *proc, ownerAddr, standbyAddr string) {
	t.Helper()
	ps := []*proc{startBinary(t, bin, r, "--batch", "20"), startBinary(t, bin, r, "--batch", "20")}
	ids := []string{ps[0].instance(t), ps[1].instance(t)}
	addrs := []string{ps[0].httpAddr(t), ps[1].httpAddr(t)}
	waitFor(t, 2*time.Minute, "part of the backlog applied", func() bool { return countApplied(t, r.dbURL) > 0 })
	_, who := partitionRow(t, r.dbURL)
	if n := countApplied(t, r.dbURL); n >= total {
		t.Fatalf("the whole backlog (%d ids) was applied before the owner could be stopped; the test proves nothing", n)
	}
	switch who {
	case ids[0]:
		return ps[0], ps[1], addrs[0], addrs[1]
	case ids[1]:
		return ps[1], ps[0], addrs[1], addrs[0]
	}
	t.Fatalf("partition owner %q is neither projector (%q, %q)", who, ids[0], ids[1])
	return nil, nil, "", ""
}

// TestPausedOwnerCommitsNothing stops the partition's writer (SIGSTOP) in the
// middle of a backlog while a standby runs; the server pins the standby once
// the writer has not pulled for PinnedTTL, and the standby acquires the
// partition. The writer, resumed with the batch it had in hand, learns it
// lost the partition at commit: its batch is fenced (its
// buildstate_fenced_total rises), nothing of it is written, and the rows
// equal the reference.
func TestPausedOwnerCommitsNothing(t *testing.T) {
	t.Parallel()
	bin := projectorBinary(t)
	r := newRig(t)
	evs := backlog(707, 1400)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	owner, standby, ownerAddr, standbyAddr := twoProcesses(t, bin, r, len(want))
	epoch := partitionEpoch(t, r.dbURL)
	if err := owner.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	paused := time.Now()
	waitFor(t, 2*time.Minute, "the standby acquires the partition", func() bool {
		e, who := partitionRow(t, r.dbURL)
		return e > epoch && who == standby.instance(t)
	})
	took := time.Since(paused)
	n := countApplied(t, r.dbURL)
	waitFor(t, 2*time.Minute, "the standby applies", func() bool { return countApplied(t, r.dbURL) > n || n == len(want) })
	t.Logf("writer stopped with %d of %d ids applied; the standby acquired the partition %v later", n, len(want), took.Round(10*time.Millisecond))
	if err := owner.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	alive := func() error {
		for _, p := range []*proc{owner, standby} {
			if p.exited() {
				return fmt.Errorf("projector exited: %v\n%s", p.err, p.stderr.String())
			}
		}
		return nil
	}
	waitFor(t, 2*time.Minute, "the resumed writer's stale batch is fenced", func() bool {
		return metric(scrape(t, ownerAddr), "buildstate_fenced_total") >= 1 || alive() != nil
	})
	r.waitDrained(t, 3*time.Minute, alive)
	xo, xs := scrape(t, ownerAddr), scrape(t, standbyAddr)
	t.Logf("resumed writer: fenced %v, acquired %v, applied %v; standby: fenced %v, acquired %v, applied %v",
		metric(xo, "buildstate_fenced_total"), metric(xo, "buildstate_partition_acquired_total"), metric(xo, "buildstate_events_applied_total"),
		metric(xs, "buildstate_fenced_total"), metric(xs, "buildstate_partition_acquired_total"), metric(xs, "buildstate_events_applied_total"))
	if len(logLines(owner.stderr.String(), "partitions fenced: another instance acquired them; their messages given back unacked")) == 0 {
		t.Errorf("the resumed writer logged no fenced batch\n%s", owner.stderr.String())
	}
	assertNoRetries(t, xo)
	assertNoRetries(t, xs)
	for _, p := range []*proc{owner, standby} {
		if took := p.signal(t, syscall.SIGTERM, 30*time.Second); p.err != nil {
			t.Errorf("projector exited with %v after SIGTERM (%v); want status 0\n%s", p.err, took, p.stderr.String())
		}
	}
	assertSameModel(t, r.dbURL, ref, want)
}

// TestKilledOwnerStandbyFinishes kills the partition's writer (SIGKILL) in the
// middle of a backlog: the standby is pinned after PinnedTTL, acquires the
// partition and applies the rest; the rows equal the reference. The takeover
// time is logged, not asserted.
func TestKilledOwnerStandbyFinishes(t *testing.T) {
	t.Parallel()
	bin := projectorBinary(t)
	r := newRig(t)
	evs := backlog(808, 1400)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	owner, standby, _, standbyAddr := twoProcesses(t, bin, r, len(want))
	epoch := partitionEpoch(t, r.dbURL)
	owner.signal(t, syscall.SIGKILL, 10*time.Second)
	killed := time.Now()
	n := countApplied(t, r.dbURL)
	waitFor(t, 2*time.Minute, "the standby applies", func() bool { return countApplied(t, r.dbURL) > n })
	t.Logf("writer killed with %d of %d ids applied; the standby applied its first batch %v later", n, len(want),
		time.Since(killed).Round(10*time.Millisecond))
	r.waitDrained(t, 3*time.Minute, func() error {
		if standby.exited() {
			return standby.err
		}
		return nil
	})
	x := scrape(t, standbyAddr)
	if e, who := partitionRow(t, r.dbURL); e <= epoch || who != standby.instance(t) {
		t.Errorf("partition at epoch %d owned by %q; want above %d, by the standby %q", e, who, epoch, standby.instance(t))
	}
	if a := metric(x, "buildstate_partition_acquired_total"); a < 1 {
		t.Errorf("standby acquired the partition %v times; want at least once", a)
	}
	assertNoRetries(t, x)
	if took := standby.signal(t, syscall.SIGTERM, 30*time.Second); standby.err != nil {
		t.Errorf("standby exited with %v after SIGTERM (%v); want status 0", standby.err, took)
	}
	assertSameModel(t, r.dbURL, ref, want)
}

// TestUpgradeFromDurableWithoutGroup starts from what the previous release
// left: a durable without a priority group that applied part of the backlog
// and acked it out of order (one message in the middle unacked). The new
// projector replaces the durable by one with the pinned group, from the old
// ack floor + 1, and applies the rest: the rows equal the reference and every
// id is applied once (the messages acked above the floor come again as
// duplicates).
func TestUpgradeFromDurableWithoutGroup(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := newRig(t)
	evs := backlog(909, 1400)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	old := natsjs.ConsumerConfig(durable, prefix)
	old.PriorityPolicy, old.PriorityGroups, old.PinnedTTL = jetstream.PriorityPolicyNone, nil, 0
	cons, err := r.js.CreateConsumer(ctx, stream, old)
	if err != nil {
		t.Fatal(err)
	}
	migrate(t, r.dbURL)
	store := projection.New(openPool(t, r.dbURL), projection.Options{Prefix: prefix, Gate: true})
	const part, hole = 5000, 2000 // applied by the old durable; the one left unacked
	var got []jetstream.Msg
	for len(got) < part {
		b, err := cons.Fetch(part-len(got), jetstream.FetchMaxWait(10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for m := range b.Messages() {
			got = append(got, m)
		}
		if b.Error() != nil {
			t.Fatal(b.Error())
		}
	}
	pms := make([]projection.Message, len(got))
	for i, m := range got {
		md, err := m.Metadata()
		if err != nil {
			t.Fatal(err)
		}
		pms[i] = projection.Message{Seq: md.Sequence.Stream, Subject: m.Subject(), Data: m.Data(), StoredAt: md.Timestamp}
	}
	if _, err := store.Apply(ctx, nil, pms); err != nil {
		t.Fatal(err)
	}
	for i, m := range got {
		if i != hole {
			if err := m.DoubleAck(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	floor := pms[hole].Seq - 1
	if info := r.consumerInfo(t); info.AckFloor.Stream != floor {
		t.Fatalf("old durable's ack floor = %d; want %d", info.AckFloor.Stream, floor)
	}

	before := countApplied(t, r.dbURL)
	p := startInProcess(t, r, 250)
	r.waitDrained(t, 3*time.Minute, p.alive)
	info := r.consumerInfo(t)
	if info.Config.PriorityPolicy != jetstream.PriorityPolicyPinned || fmt.Sprint(info.Config.PriorityGroups) != "["+natsjs.PriorityGroup+"]" ||
		info.Config.DeliverPolicy != jetstream.DeliverByStartSequencePolicy || info.Config.OptStartSeq != floor+1 {
		t.Errorf("consumer after the upgrade: policy %v, groups %v, deliver %v from %d; want pinned, [%s], by start sequence from %d",
			info.Config.PriorityPolicy, info.Config.PriorityGroups, info.Config.DeliverPolicy, info.Config.OptStartSeq, natsjs.PriorityGroup, floor+1)
	}
	replaced := logLines(p.logs.String(), "durable consumer replaced by one with the pinned priority group")
	if len(replaced) != 1 || fmt.Sprint(replaced[0]["old_ack_floor"]) != fmt.Sprint(floor) {
		t.Errorf("replacement logged %v; want once, with old_ack_floor %d", replaced, floor)
	}
	x := scrape(t, p.addr)
	a, d := metric(x, "buildstate_events_applied_total"), metric(x, "buildstate_events_duplicates_total")
	t.Logf("old durable applied %d ids, floor %d; new projector applied %v, duplicates %v (%d messages after the floor)",
		before, floor, a, d, len(msgs)-int(floor))
	if a != float64(len(want)-before) || a+d < float64(len(msgs))-float64(floor) {
		t.Errorf("new projector applied %v and found %v duplicates; want %d applied (the ids the old one had not) of at least %d messages",
			a, d, len(want)-before, len(msgs)-int(floor))
	}
	if err, took := p.stop(t); err != nil {
		t.Errorf("Run after stop = %v (%v); want nil", err, took)
	}
	// A restart keeps the replaced consumer as it is.
	p = startInProcess(t, r, 250)
	if err, _ := p.stop(t); err != nil {
		t.Errorf("second Run = %v; want nil", err)
	}
	if again := r.consumerInfo(t); again.Config.OptStartSeq != floor+1 || again.Created != info.Created {
		t.Errorf("consumer after a restart: from %d, created %v; want the same consumer (from %d, created %v)",
			again.Config.OptStartSeq, again.Created, floor+1, info.Created)
	}
	assertSameModel(t, r.dbURL, ref, want)
}
