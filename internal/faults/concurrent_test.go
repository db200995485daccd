package faults

import (
	"testing"
	"time"
)

// TestThreeProjectors runs three projectors on the same durable consumer and
// the same database over one backlog of about 30,000 shuffled, duplicated
// events. Batches of one project may be in flight in two projectors at once;
// the per-project advisory locks (taken in key order) and the
// order-independent rules must give the reference rows, with no 23514 or
// 23503 and every event applied by exactly one of them.
func TestThreeProjectors(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	evs := backlog(606, 1400)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	var ps []*inProcess
	for range 3 {
		ps = append(ps, startInProcess(t, r, 250))
	}
	alive := func() error {
		for _, p := range ps {
			if err := p.alive(); err != nil {
				return err
			}
		}
		return nil
	}
	start := time.Now()
	r.waitDrained(t, 3*time.Minute, alive)
	t.Logf("three projectors drained %d messages in %v", len(msgs), time.Since(start).Round(time.Millisecond))

	var applied, dups float64
	for i, p := range ps {
		x := scrape(t, p.addr)
		a, d := metric(x, "buildstate_events_applied_total"), metric(x, "buildstate_events_duplicates_total")
		applied += a
		dups += d
		for _, code := range []string{"23514", "23503"} {
			if n := metric(x, "buildstate_write_retries_total", `sqlstate="`+code+`"`); n != 0 {
				t.Errorf("projector %d: %v write retries with SQLSTATE %s; want 0: %q", i+1, n, code, retrySeries(x))
			}
		}
		t.Logf("projector %d: applied %v, duplicates %v, dead-lettered %v, retries %q", i+1, a, d,
			metric(x, "buildstate_events_dead_lettered_total"), retrySeries(x))
		if err, took := p.stop(t); err != nil {
			t.Errorf("projector %d: Run after stop = %v (%v); want nil", i+1, err, took)
		}
	}
	if applied != float64(len(want)) {
		t.Errorf("the three applied %v events in all; want %d, each distinct id once", applied, len(want))
	}
	if applied+dups != float64(len(msgs)) {
		t.Logf("applied + duplicates = %v for %d messages (redeliveries)", applied+dups, len(msgs))
	}
	assertSameModel(t, r.dbURL, ref, want)
	if m := readModel(t, r.dbURL); m.deadLetters != 0 {
		t.Errorf("%d dead letters; want 0", m.deadLetters)
	}
}
