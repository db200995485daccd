package faults

import (
	"context"
	"fmt"
	"regexp"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/workload"
)

// injectSQL installs a statement trigger on projects that fails a write with
// SQLSTATE 23514 and constraint name faults_injected_check: the first two
// times it fires (a sequence counts, and survives the rollback), and every
// time while faults_switch.always is true. The message names the
// transaction, so a retry in the same transaction would show.
const injectSQL = `
CREATE SEQUENCE faults_fired;
CREATE TABLE faults_switch (always boolean NOT NULL);
INSERT INTO faults_switch VALUES (false);
CREATE FUNCTION faults_inject() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT always FROM faults_switch) OR nextval('faults_fired') <= 2 THEN
    RAISE EXCEPTION 'injected by the faults test in transaction %', txid_current()
      USING ERRCODE = 'check_violation', CONSTRAINT = 'faults_injected_check', TABLE = 'projects';
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER faults_inject BEFORE INSERT OR UPDATE ON projects
  FOR EACH STATEMENT EXECUTE FUNCTION faults_inject();`

// TestConstraintSafetyNet forces writes to hit 23514. Twice: the batch is
// retried in a fresh transaction, each retry is logged with the constraint
// name and counted in /metrics, and the rows end right. Always: after the
// bound of attempts the batch is not dropped but redelivered later, again and
// again; once the cause is removed, it applies and the rows equal the
// reference.
func TestConstraintSafetyNet(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	migrate(t, r.dbURL)
	pool := openPool(t, r.dbURL)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, injectSQL); err != nil {
		t.Fatal(err)
	}
	evs1 := backlog(707, 20)
	first := r.publishEvents(t, evs1)

	p := startInProcess(t, r, 100)
	r.waitDrained(t, time.Minute, p.alive)
	x := scrape(t, p.addr)
	series := `buildstate_write_retries_total{constraint="faults_injected_check",sqlstate="23514"}`
	if n := metric(x, "buildstate_write_retries_total", `constraint="faults_injected_check"`, `sqlstate="23514"`); n != 2 {
		t.Errorf("%s = %v; want 2: %q", series, n, retrySeries(x))
	}
	retried := logLines(p.logs.String(), "write retried")
	txOf := regexp.MustCompile(`in transaction (\d+)`)
	txs := map[string]bool{}
	for _, l := range retried {
		if l["constraint"] != "faults_injected_check" || l["sqlstate"] != "23514" {
			t.Errorf("write retried logged %v; want constraint faults_injected_check, sqlstate 23514", l)
		}
		if m := txOf.FindStringSubmatch(fmt.Sprint(l["error"])); m != nil {
			txs[m[1]] = true
		}
	}
	if len(retried) != 2 || len(txs) != 2 {
		t.Errorf("%d write retried lines in %d transactions; want 2 in 2 (a fresh transaction each)", len(retried), len(txs))
	}
	t.Logf("phase 1: %d retries logged, transactions %v", len(retried), txs)
	want := distinctIDs(evs1)
	assertSameModel(t, r.dbURL, reference(t, first), want)

	// Phase 2: every write fails until the trigger goes.
	if _, err := pool.Exec(ctx, `UPDATE faults_switch SET always = true`); err != nil {
		t.Fatal(err)
	}
	before := countApplied(t, r.dbURL)
	retriesBefore := metric(x, "buildstate_write_retries_total")
	logsBefore := len(logLines(p.logs.String(), "batch redelivered later"))
	evs2 := workload.Generate(708, workload.Config{Projects: 10, DupRate: 0.2, Shuffle: true, ProjectPrefix: "q-"})
	second := r.publishEvents(t, evs2)
	probe := probeReady(p.addr, 200*time.Millisecond)
	// Wait for a give-back at least one NakDelay (5s) after the first: the
	// same messages came back, failed the bound again, and were given back.
	deadline := time.Now().Add(time.Minute)
	for {
		lines := logLines(p.logs.String(), "batch redelivered later")[logsBefore:]
		if len(lines) > 0 && lines[len(lines)-1]["ts"].(float64)-lines[0]["ts"].(float64) >= 4.5 {
			t.Logf("phase 2: %d batches given back over %.1fs", len(lines), lines[len(lines)-1]["ts"].(float64)-lines[0]["ts"].(float64))
			break
		}
		if err := p.alive(); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no batch given back twice within a minute\n%s", p.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	probe.close()
	x = scrape(t, p.addr)
	info := r.consumerInfo(t)
	exhausted := metric(x, "buildstate_write_retries_total") - retriesBefore
	t.Logf("phase 2: %v retries counted, %d ack pending, %d redelivered, /readyz %v",
		exhausted, info.NumAckPending, info.NumRedelivered, codes(probe.between(time.Time{}, time.Now())))
	// The trigger is on projects: a batch whose new events change no
	// projects row (an older build's step, a metrics event of a build with
	// no row yet) writes nothing there and commits. Seen: one id, in one run
	// of many. Almost all of the second backlog must be held back.
	if n, held := countApplied(t, r.dbURL)-before, len(distinctIDs(evs2)); n > held/10 {
		t.Errorf("%d of %d ids applied while every write to projects failed; want almost none (only batches that write no projects row)", n, held)
	}
	if m := readModel(t, r.dbURL); m.deadLetters != 0 {
		t.Errorf("%d dead letters while writes failed; want 0 (redeliver, never drop)", m.deadLetters)
	}
	if exhausted < 10 {
		t.Errorf("%v retries counted in phase 2; want at least two exhausted batches of 5", exhausted)
	}
	if info.NumAckPending == 0 || info.NumRedelivered == 0 {
		t.Errorf("consumer: %d ack pending, %d redelivered while every write fails; want the batch held and redelivered",
			info.NumAckPending, info.NumRedelivered)
	}

	if _, err := pool.Exec(ctx, `DROP TRIGGER faults_inject ON projects`); err != nil {
		t.Fatal(err)
	}
	fixed := time.Now()
	r.waitDrained(t, time.Minute, p.alive)
	t.Logf("applied %v after the trigger was dropped", time.Since(fixed).Round(time.Millisecond))
	all := append(first, second...)
	assertSameModel(t, r.dbURL, reference(t, all), distinctIDs(append(evs1, evs2...)))
	if m := readModel(t, r.dbURL); m.deadLetters != 0 {
		t.Errorf("%d dead letters; want 0", m.deadLetters)
	}
}
