package faults

import (
	"context"
	"fmt"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
)

// partitioned makes the rig's stream of layout pN before anything is
// published, and returns the names of the durables a projector group uses.
func (r *rig) partitioned(t *testing.T, n int) (events.Layout, []string) {
	t.Helper()
	layout := events.Layout{Partitions: n}
	if _, _, err := natsjs.EnsureLayout(context.Background(), r.js, stream, prefix, 1, layout, false, nil); err != nil {
		t.Fatal(err)
	}
	names := []string{durable}
	for k := range n {
		names = append(names, natsjs.PartitionDurable(durable, layout, k))
	}
	return layout, names
}

// owners reads who owns each partition of layout in projector_partitions.
func owners(t *testing.T, pool *pgxpool.Pool, layout events.Layout) map[int]string {
	t.Helper()
	rows, err := projection.New(pool, projection.Options{Prefix: prefix}).Partitions(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]string{}
	for _, row := range rows {
		if row.Layout == layout.Name() {
			out[row.Partition] = row.Owner
		}
	}
	return out
}

// twoOnFour is a backlog on a stream of four partitions and two projector
// processes sharing it (--batch 20: slow enough to act in the middle).
type twoOnFour struct {
	r      *rig
	layout events.Layout
	names  []string
	want   []string
	ref    string
	pool   *pgxpool.Pool
	ps     []*proc
	ids    []string
}

func newTwoOnFour(t *testing.T, seed int64) twoOnFour {
	t.Helper()
	bin := projectorBinary(t)
	g := twoOnFour{r: newRig(t)}
	g.layout, g.names = g.r.partitioned(t, 4)
	evs := backlog(seed, 1400)
	msgs := g.r.publishEvents(t, evs)
	g.want, g.ref = distinctIDs(evs), reference(t, msgs)
	g.pool = openPool(t, g.r.dbURL)
	for range 2 {
		p := startBinary(t, bin, g.r, "--batch", "20", "--partitions", "4")
		g.ps, g.ids = append(g.ps, p), append(g.ids, p.instance(t))
	}
	return g
}

// ownsAll says whether owner holds every partition of layout.
func ownsAll(t *testing.T, pool *pgxpool.Pool, layout events.Layout, owner string) bool {
	o := owners(t, pool, layout)
	for k := range layout.N() {
		if o[k] != owner {
			return false
		}
	}
	return true
}

// TestGroupOfThreeSharesThePartitions runs three projectors on a stream of
// eight partitions holding a backlog: each applies a share (none is a
// standby), every distinct id is applied once in all, the partitions'
// owners are the three, and the rows equal the reference.
func TestGroupOfThreeSharesThePartitions(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	layout, names := r.partitioned(t, 8)
	evs := backlog(901, 1400)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)
	pool := openPool(t, r.dbURL)

	eight := func(c *projector.Config) { c.Partitions = 8 }
	var ps []*inProcess
	for range 3 {
		ps = append(ps, startInProcess(t, r, 100, eight))
	}
	r.waitDrainedAll(t, names, 3*time.Minute, allAlive(ps))
	var applied float64
	for i, p := range ps {
		x := scrape(t, p.addr)
		a := metric(x, "buildstate_events_applied_total")
		applied += a
		assertNoRetries(t, x)
		t.Logf("projector %d: applied %v, owns %v fences, acquired %v, fenced %v", i+1, a,
			metric(x, "buildstate_partition_owned"), metric(x, "buildstate_partition_acquired_total"), metric(x, "buildstate_fenced_total"))
		if a == 0 {
			t.Errorf("projector %d applied nothing: the group did not share the partitions", i+1)
		}
	}
	if applied != float64(len(want)) {
		t.Errorf("the projectors applied %v events in all; want %d, each distinct id once", applied, len(want))
	}
	who := owners(t, pool, layout)
	distinct := map[string]bool{}
	for _, o := range who {
		distinct[o] = true
	}
	if len(who) != 8 || len(distinct) != 3 {
		t.Errorf("partition owners %v; want 8 partitions owned by the 3 projectors", who)
	}
	for _, p := range ps {
		p.stop(t)
	}
	assertSameModel(t, r.dbURL, ref, want)
}

// TestGroupJoinAndLeaveDuringBacklog starts one projector on a backlog of
// eight partitions, then a second, stops the first (SIGTERM's path: its
// batches finish, it leaves the group), starts a third: the rows equal the
// reference, every distinct id is applied once in all, and the ones that
// joined applied a share.
func TestGroupJoinAndLeaveDuringBacklog(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	_, names := r.partitioned(t, 8)
	evs := backlog(902, 2000)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	eight := func(c *projector.Config) { c.Partitions = 8 }
	const batch = 20 // slow enough that each step happens with a backlog left
	a := startInProcess(t, r, batch, eight)
	step := func(what string, frac float64) {
		t.Helper()
		waitFor(t, 2*time.Minute, what, func() bool { return float64(countApplied(t, r.dbURL)) >= frac*float64(len(want)) })
		if n := countApplied(t, r.dbURL); n >= len(want) {
			t.Fatalf("the whole backlog was applied before %s; the test proves nothing", what)
		}
	}
	step("a tenth applied by the first", 0.1)
	b := startInProcess(t, r, batch, eight)
	step("a third applied", 0.33)
	xa := scrape(t, a.addr)
	if err, took := a.stop(t); err != nil {
		t.Fatalf("first projector: Run after stop = %v (%v)", err, took)
	}
	step("half applied", 0.5)
	c := startInProcess(t, r, batch, eight)
	r.waitDrainedAll(t, names, 4*time.Minute, func() error {
		for _, p := range []*inProcess{b, c} {
			if err := p.alive(); err != nil {
				return err
			}
		}
		return nil
	})
	applied := metric(xa, "buildstate_events_applied_total")
	for i, p := range []*inProcess{b, c} {
		x := scrape(t, p.addr)
		n := metric(x, "buildstate_events_applied_total")
		applied += n
		assertNoRetries(t, x)
		t.Logf("projector %d: applied %v, acquired %v, fenced %v", i+2, n, metric(x, "buildstate_partition_acquired_total"), metric(x, "buildstate_fenced_total"))
		if n == 0 {
			t.Errorf("projector %d joined and applied nothing", i+2)
		}
		p.stop(t)
	}
	// The first one's count was read before its stop finished its last
	// batches: the sum may fall short by those, never exceed.
	t.Logf("projector 1: applied %v before its stop; %v in all, %d distinct ids", metric(xa, "buildstate_events_applied_total"), applied, len(want))
	if applied > float64(len(want)) {
		t.Errorf("the projectors applied %v events in all; want at most %d, each distinct id once", applied, len(want))
	}
	assertSameModel(t, r.dbURL, ref, want)
}

// TestGroupKilledOwner kills (SIGKILL) one of two projector processes
// sharing four partitions in the middle of a backlog: its key expires, the
// survivor is given its partitions, acquires them, unpins their durables and
// applies the rest; the rows equal the reference. The time from the kill
// until the survivor owns every partition is logged, not asserted (the
// issue's target is 10 s).
func TestGroupKilledOwner(t *testing.T) {
	t.Parallel()
	g := newTwoOnFour(t, 903)
	r, layout, names, want, ref, pool, ps, ids := g.r, g.layout, g.names, g.want, g.ref, g.pool, g.ps, g.ids
	waitFor(t, 2*time.Minute, "both own partitions", func() bool {
		o := owners(t, pool, layout)
		vals := slices.Collect(func(yield func(string) bool) {
			for _, v := range o {
				if !yield(v) {
					return
				}
			}
		})
		return len(o) == 4 && slices.Contains(vals, ids[0]) && slices.Contains(vals, ids[1])
	})
	if n := countApplied(t, r.dbURL); n >= len(want) {
		t.Fatalf("the whole backlog was applied before the kill; the test proves nothing")
	}
	ps[0].signal(t, syscall.SIGKILL, 10*time.Second)
	killed := time.Now()
	waitFor(t, time.Minute, "the survivor owns every partition", func() bool { return ownsAll(t, pool, layout, ids[1]) })
	took := time.Since(killed)
	n := countApplied(t, r.dbURL)
	waitFor(t, time.Minute, "the survivor applies", func() bool { return countApplied(t, r.dbURL) > n || n == len(want) })
	t.Logf("owner killed; the survivor owned all 4 partitions %v later and applied %v after the kill", took.Round(10*time.Millisecond),
		time.Since(killed).Round(10*time.Millisecond))
	r.waitDrainedAll(t, names, 3*time.Minute, func() error {
		if ps[1].exited() {
			return fmt.Errorf("survivor exited: %v", ps[1].err)
		}
		return nil
	})
	assertNoRetries(t, scrape(t, ps[1].httpAddr(t)))
	if took := ps[1].signal(t, syscall.SIGTERM, 30*time.Second); ps[1].err != nil {
		t.Errorf("survivor exited with %v after SIGTERM (%v)", ps[1].err, took)
	}
	assertSameModel(t, r.dbURL, ref, want)
}

// TestGroupPausedOwnerCommitsNothing stops (SIGSTOP) one of two projector
// processes sharing four partitions, past its key's TTL and the pins'
// PinnedTTL: the other is given its partitions and acquires them. Resumed,
// the paused one's batches in hand are fenced at commit (nothing of them is
// written), it rejoins the group and takes its share back; the rows equal
// the reference.
func TestGroupPausedOwnerCommitsNothing(t *testing.T) {
	t.Parallel()
	g := newTwoOnFour(t, 904)
	r, layout, names, want, ref, pool, ps, ids := g.r, g.layout, g.names, g.want, g.ref, g.pool, g.ps, g.ids
	addrs := []string{ps[0].httpAddr(t), ps[1].httpAddr(t)}
	waitFor(t, 2*time.Minute, "the first owns a partition", func() bool {
		for _, o := range owners(t, pool, layout) {
			if o == ids[0] {
				return true
			}
		}
		return false
	})
	if err := ps[0].cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	paused := time.Now()
	waitFor(t, time.Minute, "the other owns every partition", func() bool { return ownsAll(t, pool, layout, ids[1]) })
	t.Logf("paused; the other owned all 4 partitions %v later", time.Since(paused).Round(10*time.Millisecond))
	if n := countApplied(t, r.dbURL); n >= len(want) {
		t.Fatalf("the whole backlog was applied while paused; the test proves nothing")
	}
	if err := ps[0].cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	alive := func() error {
		for _, p := range ps {
			if p.exited() {
				return fmt.Errorf("projector exited: %v\n%s", p.err, p.stderr.String())
			}
		}
		return nil
	}
	waitFor(t, time.Minute, "the resumed one's stale batches are fenced", func() bool {
		return metric(scrape(t, addrs[0]), "buildstate_fenced_total") >= 1 || alive() != nil
	})
	r.waitDrainedAll(t, names, 3*time.Minute, alive)
	for i, p := range ps {
		x := scrape(t, addrs[i])
		assertNoRetries(t, x)
		t.Logf("projector %d: fenced %v, acquired %v, applied %v", i+1, metric(x, "buildstate_fenced_total"),
			metric(x, "buildstate_partition_acquired_total"), metric(x, "buildstate_events_applied_total"))
		if took := p.signal(t, syscall.SIGTERM, 30*time.Second); p.err != nil {
			t.Errorf("projector %d exited with %v after SIGTERM (%v)", i+1, p.err, took)
		}
	}
	assertSameModel(t, r.dbURL, ref, want)
}
