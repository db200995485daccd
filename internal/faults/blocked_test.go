package faults

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
)

// refuseSQL installs a row trigger that refuses, as a data exception
// (SQLSTATE 22023), any fact whose framework is refusedFramework: a rule of
// the database that no validation of the projector knows.
const refuseSQL = `
CREATE FUNCTION faults_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.framework = 'refused-by-trigger' THEN
    RAISE EXCEPTION 'framework % refused by the faults trigger', NEW.framework
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER faults_refuse BEFORE INSERT OR UPDATE ON projector_facts
  FOR EACH ROW EXECUTE FUNCTION faults_refuse();`

const refusedFramework = "refused-by-trigger"

// TestDatabaseRefusalIsIsolated mixes into valid traffic messages that the
// database refuses although they pass every rule of the contract (a trigger
// refuses them with SQLSTATE 22023), and one whose subject is not UTF-8 (NATS
// carries it; a text column cannot). Each is found inside its batch and kept
// as a dead letter, byte for byte; every valid message around them is
// applied (the rows equal a reference run of the valid messages alone); the
// projector stays ready.
func TestDatabaseRefusalIsIsolated(t *testing.T) {
	t.Parallel()
	bin := projectorBinary(t)
	r := newRig(t)
	migrate(t, r.dbURL)
	pool := openPool(t, r.dbURL)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, refuseSQL); err != nil {
		t.Fatal(err)
	}
	evs := backlog(909, 30)
	var raws []rawMsg
	seen := map[string]bool{}
	for _, ev := range evs {
		body, err := ev.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		m := rawMsg{subject: events.Subject(prefix, ev.ProjectID, ev.Kind()), data: body}
		if !seen[ev.ID] {
			seen[ev.ID] = true
			m.msgID = ev.ID
		}
		raws = append(raws, m)
	}
	type bad struct {
		msg    rawMsg
		reason events.Reason
		detail string // a part of the detail
	}
	now := time.Now().Add(-time.Minute)
	var bads []bad
	for i := range 3 {
		fw := refusedFramework
		ev := events.New(events.KindStarted, fmt.Sprintf("refused-%d", i), fmt.Sprintf("refused-%d-b1", i), now, events.Data{Framework: &fw})
		body, err := ev.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		bads = append(bads, bad{msg: rawMsg{subject: events.Subject(prefix, ev.ProjectID, ev.Kind()), data: body},
			reason: events.ReasonRejectedByDatabase, detail: "SQLSTATE 22023"})
	}
	notUTF8 := prefix + ".p-\xff\xfe.started"
	other, err := events.New(events.KindStarted, "p-x", "p-x-b1", now, events.Data{}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	bads = append(bads, bad{msg: rawMsg{subject: notUTF8, data: other}, reason: events.ReasonSubjectMismatch})
	// Each refused message at a random place of the log.
	rng := rand.New(rand.NewPCG(909, 2))
	isBad := make([]int, len(raws)) // index in bads + 1, 0 for valid messages
	for i, b := range bads {
		k := rng.IntN(len(raws) + 1)
		raws = slices.Insert(raws, k, b.msg)
		isBad = slices.Insert(isBad, k, i+1)
	}
	msgs := r.publishRaw(t, raws)
	var valid []projection.Message
	seqOf := map[int]uint64{}
	for i, m := range msgs {
		if isBad[i] > 0 {
			seqOf[isBad[i]-1] = m.Seq
		} else {
			valid = append(valid, m)
		}
	}
	ref := reference(t, valid)

	p := startInProcess(t, r, 100)
	r.waitDrained(t, 2*time.Minute, p.alive)

	store := projection.New(pool, projection.Options{Prefix: prefix})
	dls, err := store.DeadLetters(ctx, projection.DeadLetterFilter{})
	if err != nil {
		t.Fatal(err)
	}
	bySeq := map[uint64]projection.DeadLetter{}
	for _, d := range dls {
		bySeq[d.StreamSeq] = d
	}
	for i, b := range bads {
		d, ok := bySeq[seqOf[i]]
		switch {
		case !ok:
			t.Errorf("no dead letter at seq %d (%q); want reason %s", seqOf[i], b.msg.subject, b.reason)
		case d.Reason != string(b.reason) || !strings.Contains(d.Detail, b.detail):
			t.Errorf("dead letter %d = %s %q; want %s with %q", d.StreamSeq, d.Reason, d.Detail, b.reason, b.detail)
		case d.RawSubject() != b.msg.subject || !bytes.Equal(d.Payload, b.msg.data):
			t.Errorf("dead letter %d keeps subject %q and %d payload bytes; want %q and %d", d.StreamSeq, d.RawSubject(), len(d.Payload), b.msg.subject, len(b.msg.data))
		case !utf8.ValidString(d.Subject):
			t.Errorf("dead letter %d subject text %q is not UTF-8", d.StreamSeq, d.Subject)
		}
	}
	if len(dls) != len(bads) {
		t.Errorf("%d dead letters; want %d", len(dls), len(bads))
	}
	assertSameModel(t, r.dbURL, ref, distinctIDs(evs))

	// `projector dead-letters` prints the subject's exact bytes too.
	out := cliBinary(t, bin, r, "dead-letters", "--seq", fmt.Sprint(seqOf[len(bads)-1]))
	var line struct {
		Subject       string `json:"subject"`
		SubjectBase64 string `json:"subject_base64"`
		SubjectPrefix string `json:"subject_prefix"`
	}
	if err := json.Unmarshal([]byte(out), &line); err != nil {
		t.Fatalf("dead-letters printed %q: %v", out, err)
	}
	if raw, _ := base64.StdEncoding.DecodeString(line.SubjectBase64); string(raw) != notUTF8 || line.SubjectPrefix != prefix {
		t.Errorf("dead-letters printed subject %q, subject_base64 %q (%q), prefix %q; want the bytes %q under %q",
			line.Subject, line.SubjectBase64, raw, line.SubjectPrefix, notUTF8, prefix)
	}

	if err := p.alive(); err != nil {
		t.Fatalf("projector stopped: %v", err)
	}
	if code, body, err := httpGet("http://" + p.addr + "/readyz"); code != http.StatusOK {
		t.Errorf("GET /readyz = %d %q %v; want 200", code, body, err)
	}
	x := scrape(t, p.addr)
	if n := metric(x, "buildstate_events_dead_lettered_total"); n != float64(len(bads)) {
		t.Errorf("buildstate_events_dead_lettered_total = %v; want %d", n, len(bads))
	}
	assertNoRetries(t, x)
}

// TestLocksAreBoundedPerBatch applies one batch of 20,000 events of as many
// projects on a server with the default lock table (64 locks a transaction
// on average). A lock per project would exhaust it (53200, out of shared
// memory) on every attempt, for ever; the store takes at most one lock per
// bucket of projects.
func TestLocksAreBoundedPerBatch(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	pool := openPool(t, r.dbURL)
	var perTx string
	if err := pool.QueryRow(context.Background(), `SHOW max_locks_per_transaction`).Scan(&perTx); err != nil {
		t.Fatal(err)
	}
	t.Logf("max_locks_per_transaction = %s", perTx)
	const projects = 25_000
	at := time.Now().Add(-time.Hour).UTC()
	raws := make([]rawMsg, projects)
	ids := make([]string, projects)
	for i := range raws {
		ev := events.New(events.KindQueued, fmt.Sprintf("lock-%05d", i), fmt.Sprintf("lock-%05d-b1", i), at, events.Data{})
		body, err := ev.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		raws[i] = rawMsg{subject: events.Subject(prefix, ev.ProjectID, ev.Kind()), data: body, msgID: ev.ID}
		ids[i] = ev.ID
	}
	r.publishRaw(t, raws)
	p := startInProcess(t, r, 20_000)
	r.waitDrained(t, 3*time.Minute, p.alive)
	if n := countApplied(t, r.dbURL); n != projects {
		t.Errorf("%d events applied; want %d", n, projects)
	}
	if lines := logLines(p.logs.String(), "batch failed; retrying"); len(lines) > 0 {
		t.Errorf("%d batches failed, first: %v", len(lines), lines[0])
	}
}

// TestConsumerDeletedStopsTheProjector deletes the durable consumer under a
// running projector: it must not go on as if stopped normally (exit 0,
// nothing consumed ever again) but return an error, so that its supervisor
// restarts it and the start creates the consumer again.
func TestConsumerDeletedStopsTheProjector(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	msgs := r.publishEvents(t, backlog(111, 5))
	p := startInProcess(t, r, 100)
	r.waitDrained(t, time.Minute, p.alive)
	if err := r.js.DeleteConsumer(context.Background(), stream, durable); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		p.exited, p.err = true, err
		if err == nil || !strings.Contains(err.Error(), "consumer") {
			t.Errorf("projector.Run = %v after its consumer was deleted; want an error naming the consumer", err)
		}
		t.Logf("projector.Run = %v", err)
	case <-time.After(30 * time.Second):
		t.Fatalf("projector still running 30s after its consumer was deleted\n%s", p.logs.String())
	}
	// A restart recreates the consumer and finds everything applied.
	p2 := startInProcess(t, r, 100)
	r.waitDrained(t, time.Minute, p2.alive)
	if n, want := countApplied(t, r.dbURL), len(distinctIDs(backlog(111, 5))); n != want || len(msgs) == 0 {
		t.Errorf("%d ids applied after the restart; want %d", n, want)
	}
}

// TestStreamDeniesPurgeAndDelete: the log stays whole.
func TestStreamDeniesPurgeAndDelete(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	msgs := r.publishEvents(t, backlog(112, 2))
	ctx := context.Background()
	s, err := r.js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Purge(ctx); err == nil {
		t.Error("purge of the stream succeeded; want it denied")
	}
	if err := s.DeleteMsg(ctx, msgs[0].Seq); err == nil {
		t.Error("delete of a message succeeded; want it denied")
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != uint64(len(msgs)) || info.State.FirstSeq != 1 {
		t.Errorf("stream holds %d messages from %d; want %d from 1", info.State.Msgs, info.State.FirstSeq, len(msgs))
	}
	if !info.Config.DenyPurge || !info.Config.DenyDelete {
		t.Errorf("stream config deny_purge %v, deny_delete %v; want both", info.Config.DenyPurge, info.Config.DenyDelete)
	}
}

// TestRetryReadsUnderTheKeptPrefix re-drives more dead letters than one
// chunk with a store configured for another subject prefix: each letter is
// decoded under the prefix it was kept under, so a still-malformed one keeps
// its reason (not bad_subject) and a fixed one applies to its project.
func TestRetryReadsUnderTheKeptPrefix(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	migrate(t, r.dbURL)
	pool := openPool(t, r.dbURL)
	ctx := context.Background()
	const build, owner = "kept-b1", "kept"
	if _, err := pool.Exec(ctx, `INSERT INTO projector_builds (build_id, project_id) VALUES ($1, 'someone-else')`, build); err != nil {
		t.Fatal(err)
	}
	ev := events.New(events.KindQueued, owner, build, time.Now().Add(-time.Minute), events.Data{})
	body, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	raws := []rawMsg{{subject: events.Subject(prefix, owner, ev.Kind()), data: body}}
	const malformed = 1200 // more than two chunks
	for i := range malformed {
		raws = append(raws, rawMsg{subject: events.Subject(prefix, fmt.Sprintf("m-%d", i), events.KindStarted), data: []byte(`{"spec_version":1,`)})
	}
	r.publishRaw(t, raws)
	p := startInProcess(t, r, 500)
	r.waitDrained(t, time.Minute, p.alive)
	p.stop(t)
	if _, err := pool.Exec(ctx, `UPDATE projector_builds SET project_id = $2 WHERE build_id = $1`, build, owner); err != nil {
		t.Fatal(err)
	}

	wrong := projection.New(pool, projection.Options{Prefix: "elsewhere"})
	res, err := wrong.Retry(ctx, projection.DeadLetterFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Applied != 1 || res.DeadLettered != malformed {
		t.Errorf("Retry = %+v; want 1 applied and %d still dead", res, malformed)
	}
	dls, err := wrong.DeadLetters(ctx, projection.DeadLetterFilter{})
	if err != nil {
		t.Fatal(err)
	}
	reasons := map[string]int{}
	for _, d := range dls {
		reasons[fmt.Sprintf("%s retries=%d prefix=%s", d.Reason, d.Retries, d.Prefix)]++
	}
	if want := fmt.Sprintf("%s retries=1 prefix=%s", events.ReasonMalformedJSON, prefix); len(reasons) != 1 || reasons[want] != malformed {
		t.Errorf("dead letters after the retry: %v; want %d × %q", reasons, malformed, want)
	}
	var status string
	if err := pool.QueryRow(ctx, `SELECT build_status FROM projects WHERE project_id = $1`, owner).Scan(&status); err != nil || status != "queued" {
		t.Errorf("project %s after the retry: %q, %v; want queued", owner, status, err)
	}
}
