package faults

import (
	"fmt"
	"testing"
	"time"
)

// TestThreeProjectors runs two, then three, projectors on the same durable
// consumer and the same database over one backlog of about 30,000 shuffled,
// duplicated events. The consumer's pinned priority group delivers to one of
// them at a time and that one acquires the partition (the others are hot
// standbys; should two ever write, the fence refuses the stale one's
// commit): they must give the reference rows, with no 23514 or 23503, every
// event applied by exactly one of them, and the partition's epoch raised once
// for each acquire they counted.
func TestThreeProjectors(t *testing.T) {
	t.Parallel()
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprintf("%d projectors", n), func(t *testing.T) {
			t.Parallel()
			severalProjectors(t, n, int64(600+n))
		})
	}
}

func severalProjectors(t *testing.T, n int, seed int64) {
	r := newRig(t)
	evs := backlog(seed, 1400)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	var ps []*inProcess
	for range n {
		ps = append(ps, startInProcess(t, r, 250))
	}
	alive := allAlive(ps)
	start := time.Now()
	r.waitDrained(t, 3*time.Minute, alive)
	t.Logf("%d projectors drained %d messages in %v", n, len(msgs), time.Since(start).Round(time.Millisecond))

	var applied, dups, acquired float64
	for i, p := range ps {
		x := scrape(t, p.addr)
		a, d := metric(x, "buildstate_events_applied_total"), metric(x, "buildstate_events_duplicates_total")
		applied += a
		dups += d
		acquired += metric(x, "buildstate_partition_acquired_total")
		for _, code := range []string{"23514", "23503"} {
			if n := metric(x, "buildstate_write_retries_total", `sqlstate="`+code+`"`); n != 0 {
				t.Errorf("projector %d: %v write retries with SQLSTATE %s; want 0: %q", i+1, n, code, retrySeries(x))
			}
		}
		t.Logf("projector %d: applied %v, duplicates %v, dead-lettered %v, acquired %v, fenced %v, owned %v", i+1, a, d,
			metric(x, "buildstate_events_dead_lettered_total"), metric(x, "buildstate_partition_acquired_total"),
			metric(x, "buildstate_fenced_total"), metric(x, "buildstate_partition_owned"))
		if err, took := p.stop(t); err != nil {
			t.Errorf("projector %d: Run after stop = %v (%v); want nil", i+1, err, took)
		}
	}
	if epoch := partitionEpoch(t, r.dbURL); acquired < 1 || float64(epoch) != acquired {
		t.Errorf("partition epoch %d after %v acquires counted; want one epoch per acquire, at least one", epoch, acquired)
	}
	if applied != float64(len(want)) {
		t.Errorf("the projectors applied %v events in all; want %d, each distinct id once", applied, len(want))
	}
	if applied+dups != float64(len(msgs)) {
		t.Logf("applied + duplicates = %v for %d messages (redeliveries)", applied+dups, len(msgs))
	}
	assertSameModel(t, r.dbURL, ref, want)
	if m := readModel(t, r.dbURL); m.deadLetters != 0 {
		t.Errorf("%d dead letters; want 0", m.deadLetters)
	}
}
