package faults

import (
	"encoding/json"
	"slices"
	"syscall"
	"testing"
	"time"
)

// TestGracefulStop sends SIGTERM to the projector binary in the middle of a
// backlog. It must exit with status 0 within a few seconds, having applied
// and acked exactly what it handled: after the stop, the applied ids are
// exactly the ids of the messages up to the consumer's ack floor (nothing
// acked unapplied, nothing applied unacked). A restart then handles exactly
// the messages after the ack floor, once each, and the rows equal the
// reference run's.
func TestGracefulStop(t *testing.T) {
	t.Parallel()
	bin := projectorBinary(t)
	r := newRig(t)
	evs := backlog(808, 1000)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	first := startBinary(t, bin, r, "--batch", "500")
	first.httpAddr(t)
	alive := func() error {
		if first.exited() {
			return first.err
		}
		return nil
	}
	waitApplied(t, r.dbURL, len(want)/4, alive)
	took := first.signal(t, syscall.SIGTERM, 30*time.Second)
	t.Logf("exited %v after SIGTERM: %v", took.Round(time.Millisecond), first.err)
	if first.err != nil {
		t.Errorf("projector exited with %v after SIGTERM; want status 0\n%s", first.err, first.stderr.String())
	}
	if took > 10*time.Second {
		t.Errorf("projector took %v to stop; want a few seconds", took)
	}
	if len(logLines(first.stderr.String(), "projector stopped")) != 1 {
		t.Errorf("no \"projector stopped\" log line:\n%s", first.stderr.String())
	}

	// The consumer's state once the last acks are in.
	var floor uint64
	var ackPending int
	for prev := uint64(0); ; prev = floor {
		time.Sleep(200 * time.Millisecond)
		info := r.consumerInfo(t)
		floor, ackPending = info.AckFloor.Stream, info.NumAckPending
		if floor == prev {
			break
		}
	}
	if floor == 0 || floor >= uint64(len(msgs)) {
		t.Fatalf("ack floor %d of %d messages; want the stop in the middle of the backlog", floor, len(msgs))
	}
	for i, m := range msgs {
		if m.Seq != uint64(i+1) {
			t.Fatalf("message %d has sequence %d; want the stream to start at 1 in publish order", i, m.Seq)
		}
	}
	handled := map[string]bool{}
	for _, m := range msgs[:floor] {
		handled[idOf(t, m.Data)] = true
	}
	wantApplied := make([]string, 0, len(handled))
	for id := range handled {
		wantApplied = append(wantApplied, id)
	}
	slices.Sort(wantApplied)
	got := readModel(t, r.dbURL).applied
	t.Logf("stopped at ack floor %d of %d messages (%d given back unhandled); %d of %d ids applied",
		floor, len(msgs), ackPending, len(got), len(want))
	diffRows(t, "projector_applied after the stop", got, wantApplied)

	second := startBinary(t, bin, r, "--batch", "500")
	addr := second.httpAddr(t)
	r.waitDrained(t, 2*time.Minute, func() error {
		if second.exited() {
			return second.err
		}
		return nil
	})
	x := scrape(t, addr)
	applied, dups := metric(x, "buildstate_events_applied_total"), metric(x, "buildstate_events_duplicates_total")
	t.Logf("restart: applied %v, duplicates %v, of the %d messages after the ack floor", applied, dups, uint64(len(msgs))-floor)
	if applied+dups != float64(uint64(len(msgs))-floor) {
		t.Errorf("restart handled %v messages; want the %d after the ack floor, each once", applied+dups, uint64(len(msgs))-floor)
	}
	if applied != float64(len(want)-len(got)) {
		t.Errorf("restart applied %v events; want the %d not applied before", applied, len(want)-len(got))
	}
	assertNoRetries(t, x)
	if second.signal(t, syscall.SIGTERM, 30*time.Second); second.err != nil {
		t.Errorf("restart exited with %v; want status 0", second.err)
	}
	assertSameModel(t, r.dbURL, ref, want)
}

// idOf reads the id of a valid event body.
func idOf(t *testing.T, body []byte) string {
	t.Helper()
	var v struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatal(err)
	}
	return v.ID
}
