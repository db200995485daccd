package faults

import (
	"context"
	"math/rand/v2"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/natsjs"
)

// TestCrashAtAnyInstant kills the projector binary with SIGKILL at random
// moments (50-800 ms after it starts consuming; the first time, after the
// process starts) while it works through a backlog of about 30,000 shuffled,
// duplicated events, restarts it each time, then lets a last run finish.
// After each kill the test unpins the durable (the server would keep the dead
// client pinned for PinnedTTL). Whatever the kills interrupted (start-up,
// migrations, a batch in flight, a commit, the acks after it), the rows equal the reference run's, every valid
// event id is marked applied exactly once, and no write was ever retried.
func TestCrashAtAnyInstant(t *testing.T) {
	t.Parallel()
	bin := projectorBinary(t)
	r := newRig(t)
	evs := backlog(101, 1400)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)
	t.Logf("backlog: %d messages, %d distinct ids", len(msgs), len(want))

	seed := time.Now().UnixNano()
	rng := rand.New(rand.NewPCG(uint64(seed), 7))
	t.Logf("kill delays seeded with %d", seed)
	const kills = 8
	var runs []*proc
	midWork := 0
	for i := range kills {
		p := startBinary(t, bin, r, "--batch", "500")
		runs = append(runs, p)
		// The first kill may hit start-up (migrations, stream and consumer
		// set-up); the others count from the moment the run consumes.
		from := "start"
		if i > 0 {
			p.httpAddr(t)
			from = "consuming"
		}
		delay := 50*time.Millisecond + time.Duration(rng.Int64N(int64(750*time.Millisecond)))
		time.Sleep(delay)
		if p.exited() {
			t.Fatalf("run %d exited on its own: %v\n%s", i+1, p.err, p.stderr.String())
		}
		p.signal(t, syscall.SIGKILL, 10*time.Second)
		// The server keeps a dead client pinned for PinnedTTL (5 s), which
		// most of these runs would spend waiting: unpin it, as a supervisor
		// that saw the process die could.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := natsjs.Unpin(ctx, r.js, stream, durable); err != nil {
			t.Logf("unpin after kill %d: %v", i+1, err) // nothing pinned yet
		}
		cancel()
		n := countApplied(t, r.dbURL)
		if n > 0 && n < len(want) {
			midWork++
		}
		t.Logf("kill %d %v after %s: %d of %d ids applied", i+1, delay.Round(time.Millisecond), from, n, len(want))
	}
	if midWork == 0 {
		t.Errorf("no kill landed while the backlog was partly applied; the test proved nothing")
	}

	last := startBinary(t, bin, r, "--batch", "500")
	runs = append(runs, last)
	addr := last.httpAddr(t)
	start := time.Now()
	r.waitDrained(t, 3*time.Minute, func() error {
		if last.exited() {
			return last.err
		}
		return nil
	})
	t.Logf("last run drained the rest in %v", time.Since(start).Round(time.Millisecond))
	exposition := scrape(t, addr)
	assertNoRetries(t, exposition)
	if took := last.signal(t, syscall.SIGTERM, 15*time.Second); last.err != nil {
		t.Errorf("last run exited with %v after SIGTERM (%v); want status 0", last.err, took)
	}
	for i, p := range runs {
		logs := p.stderr.String()
		for _, bad := range []string{`"write retried"`, `"dead-lettered messages"`, `"level":"error"`} {
			if strings.Contains(logs, bad) {
				t.Errorf("run %d logged %s:\n%s", i+1, bad, logs)
			}
		}
	}
	assertSameModel(t, r.dbURL, ref, want)
	if m := readModel(t, r.dbURL); m.deadLetters != 0 {
		t.Errorf("%d dead letters; want 0", m.deadLetters)
	}
}
