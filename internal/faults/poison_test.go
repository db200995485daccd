package faults

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
)

// poison is one malformed message and the reason it must be kept with.
type poison struct {
	name    string
	subject string
	body    []byte
	reason  events.Reason
	after   string // for conflicts: an event id it must come after in the log
}

// edit returns ev's JSON with fields set (nil deletes the field).
func edit(t *testing.T, ev events.Event, set map[string]any) []byte {
	t.Helper()
	b, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for k, v := range set {
		if v == nil {
			delete(m, k)
		} else {
			m[k] = v
		}
	}
	out, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// poisons returns the malformed messages mixed into the valid traffic evs.
func poisons(t *testing.T, evs []events.Event) []poison {
	t.Helper()
	now := time.Now().Add(-time.Minute).UTC()
	fresh := func(k events.Kind) events.Event {
		return events.New(k, "poison", "poison-b1", now, events.Data{})
	}
	subj := func(k events.Kind) string { return events.Subject(prefix, "poison", k) }
	started := fresh(events.KindStarted)
	valid, err := started.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	huge := append([]byte(`{"spec_version":1,"pad":"`), bytes.Repeat([]byte("x"), 1_000_000-27)...)
	huge = append(huge, `"}`...)

	// A valid event of the first half of the log, to conflict with.
	orig := evs[len(evs)/4]
	twin := orig
	twin.OccurredAt = orig.OccurredAt.Add(time.Second) // same id, other content
	twinBody, err := twin.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	// A build of another project, named under project "poison".
	var other events.Event
	for _, ev := range evs[len(evs)/4:] {
		if ev.ProjectID != "poison" {
			other = ev
			break
		}
	}
	thief := events.New(events.KindQueued, "poison", other.BuildID, now, events.Data{})
	thiefBody, err := thief.Marshal()
	if err != nil {
		t.Fatal(err)
	}

	return []poison{
		{name: "truncated JSON", subject: subj(events.KindStarted), body: valid[:len(valid)/2], reason: events.ReasonMalformedJSON},
		{name: "empty body", subject: subj(events.KindStarted), body: []byte{}, reason: events.ReasonMalformedJSON},
		{name: "spec_version as string", subject: subj(events.KindStarted),
			body: edit(t, started, map[string]any{"spec_version": "1"}), reason: events.ReasonMalformedJSON},
		{name: "duration_ms as string", subject: subj(events.KindCompleted),
			body:   edit(t, fresh(events.KindCompleted), map[string]any{"data": map[string]any{"outcome": "succeeded", "duration_ms": "fast"}}),
			reason: events.ReasonInvalidData},
		{name: "unknown type", subject: subj(events.KindQueued),
			body: edit(t, fresh(events.KindQueued), map[string]any{"type": "build.deleted"}), reason: events.ReasonUnknownType},
		{name: "spec_version 2", subject: subj(events.KindStarted),
			body: edit(t, started, map[string]any{"spec_version": 2}), reason: events.ReasonSpecVersion},
		{name: "subject kind mismatch", subject: subj(events.KindQueued), body: valid, reason: events.ReasonSubjectMismatch},
		{name: "subject project mismatch", subject: events.Subject(prefix, "someone-else", events.KindStarted), body: valid,
			reason: events.ReasonSubjectMismatch},
		{name: "subject without kind", subject: prefix + ".poison", body: valid, reason: events.ReasonBadSubject},
		{name: "missing id", subject: subj(events.KindStarted), body: edit(t, started, map[string]any{"id": nil}),
			reason: events.ReasonInvalidID},
		{name: "missing build_id", subject: subj(events.KindStarted), body: edit(t, started, map[string]any{"build_id": nil}),
			reason: events.ReasonInvalidBuildID},
		{name: "missing occurred_at", subject: subj(events.KindStarted), body: edit(t, started, map[string]any{"occurred_at": nil}),
			reason: events.ReasonInvalidOccurredAt},
		{name: "missing outcome", subject: subj(events.KindCompleted), body: edit(t, fresh(events.KindCompleted), nil),
			reason: events.ReasonInvalidData},
		{name: "oversized id", subject: subj(events.KindStarted),
			body: edit(t, started, map[string]any{"id": strings.Repeat("i", 129)}), reason: events.ReasonInvalidID},
		{name: "oversized build_id", subject: subj(events.KindStarted),
			body: edit(t, started, map[string]any{"build_id": strings.Repeat("b", 300)}), reason: events.ReasonInvalidBuildID},
		{name: "invalid project_id", subject: events.Subject(prefix, "p@1", events.KindStarted),
			body: edit(t, started, map[string]any{"project_id": "p@1"}), reason: events.ReasonInvalidProjectID},
		{name: "timestamp not RFC 3339", subject: subj(events.KindStarted),
			body: edit(t, started, map[string]any{"occurred_at": "26/11/2026 20:00"}), reason: events.ReasonInvalidOccurredAt},
		{name: "timestamp without zone", subject: subj(events.KindStarted),
			body: edit(t, started, map[string]any{"occurred_at": "2026-11-26T20:00:00"}), reason: events.ReasonInvalidOccurredAt},
		{name: "occurred_at 2h in the future", subject: subj(events.KindStarted),
			body:   edit(t, started, map[string]any{"occurred_at": time.Now().Add(2 * time.Hour).UTC().Format(time.RFC3339Nano)}),
			reason: events.ReasonOccurredInFuture},
		// (attempt 0 is no poison: the projector drops the field and applies the event.)
		{name: "attempt 1.5", subject: subj(events.KindMetricsRecorded),
			body:   edit(t, fresh(events.KindMetricsRecorded), map[string]any{"data": map[string]any{"attempt": 1.5}}),
			reason: events.ReasonInvalidData},
		// NUL in each string field: a text column cannot hold it (22021), so
		// the contract refuses it before the database is asked.
		{name: "NUL in framework", subject: subj(events.KindStarted),
			body: edit(t, started, map[string]any{"data": map[string]any{"framework": "next\x00js"}}), reason: events.ReasonInvalidData},
		{name: "NUL in node_version", subject: subj(events.KindMetricsRecorded),
			body:   edit(t, fresh(events.KindMetricsRecorded), map[string]any{"data": map[string]any{"node_version": "22\x00"}}),
			reason: events.ReasonInvalidData},
		{name: "NUL in package_manager", subject: subj(events.KindMetricsRecorded),
			body:   edit(t, fresh(events.KindMetricsRecorded), map[string]any{"data": map[string]any{"package_manager": "\x00pnpm"}}),
			reason: events.ReasonInvalidData},
		{name: "NUL in error", subject: subj(events.KindCompleted),
			body:   edit(t, fresh(events.KindCompleted), map[string]any{"data": map[string]any{"outcome": "failed", "error": "boom\x00"}}),
			reason: events.ReasonInvalidData},
		{name: "NUL in id", subject: subj(events.KindStarted),
			body: edit(t, started, map[string]any{"id": "id\x00"}), reason: events.ReasonInvalidID},
		{name: "NUL in build_id", subject: subj(events.KindStarted),
			body: edit(t, started, map[string]any{"build_id": "b\x001"}), reason: events.ReasonInvalidBuildID},
		{name: "not UTF-8", subject: subj(events.KindStarted),
			body: bytes.Replace(valid, []byte(`"poison-b1"`), []byte("\"poison-\xff\xfe\""), 1), reason: events.ReasonNotUTF8},
		{name: "1 MB body", subject: subj(events.KindStarted), body: huge, reason: events.ReasonBodyTooLarge},
		{name: "conflicting duplicate id", subject: events.Subject(prefix, twin.ProjectID, twin.Kind()), body: twinBody,
			reason: events.ReasonIDConflict, after: orig.ID},
		{name: "build_id under another project", subject: subj(events.KindQueued), body: thiefBody,
			reason: events.ReasonBuildProjectClash, after: other.ID},
	}
}

// TestPoisonIsDeadLettered mixes 30 malformed messages into valid
// traffic: each must be kept as a dead letter with its reason and its exact
// payload, every valid event must be applied (the rows equal a reference run
// of the valid messages alone), and the projector must keep running.
func TestPoisonIsDeadLettered(t *testing.T) {
	t.Parallel()
	bin := projectorBinary(t)
	r := newRig(t)
	evs := backlog(404, 40)
	ps := poisons(t, evs)

	// The valid traffic, first copies with Nats-Msg-Id, then each poison at
	// a random place (a conflict only after the event it conflicts with).
	rng := rand.New(rand.NewPCG(404, 1))
	type entry struct {
		raw    rawMsg
		poison int // index in ps, or -1
	}
	var log []entry
	seen := map[string]bool{}
	for _, ev := range evs {
		body, err := ev.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		e := entry{raw: rawMsg{subject: events.Subject(prefix, ev.ProjectID, ev.Kind()), data: body}, poison: -1}
		if !seen[ev.ID] {
			seen[ev.ID] = true
			e.raw.msgID = ev.ID
		}
		log = append(log, e)
	}
	for i, p := range ps {
		lo := 0
		if p.after != "" {
			for j, e := range log {
				if e.poison < 0 && strings.Contains(string(e.raw.data), p.after) {
					lo = j + 1
					break
				}
			}
		}
		at := lo + rng.IntN(len(log)-lo+1)
		log = append(log[:at], append([]entry{{raw: rawMsg{subject: p.subject, data: p.body}, poison: i}}, log[at:]...)...)
	}
	raws := make([]rawMsg, len(log))
	for i, e := range log {
		raws[i] = e.raw
	}
	msgs := r.publishRaw(t, raws)
	var validMsgs []projection.Message
	seqOf := map[int]uint64{}
	for i, e := range log {
		if e.poison >= 0 {
			seqOf[e.poison] = msgs[i].Seq
		} else {
			validMsgs = append(validMsgs, msgs[i])
		}
	}
	want := distinctIDs(evs)
	ref := reference(t, validMsgs)
	t.Logf("%d messages: %d valid (%d distinct ids), %d poison", len(msgs), len(validMsgs), len(want), len(ps))

	p := startInProcess(t, r, 100)
	r.waitDrained(t, 2*time.Minute, p.alive)

	store := projection.New(openPool(t, r.dbURL), projection.Options{Prefix: prefix})
	dls, err := store.DeadLetters(context.Background(), projection.DeadLetterFilter{})
	if err != nil {
		t.Fatal(err)
	}
	bySeq := map[uint64]projection.DeadLetter{}
	for _, d := range dls {
		bySeq[d.StreamSeq] = d
	}
	for i, ps := range ps {
		t.Run(ps.name, func(t *testing.T) {
			seq := seqOf[i]
			d, ok := bySeq[seq]
			if !ok {
				t.Fatalf("no dead letter at seq %d; want reason %s", seq, ps.reason)
			}
			if d.Reason != string(ps.reason) {
				t.Errorf("dead letter %d reason = %s (%s); want %s", seq, d.Reason, d.Detail, ps.reason)
			}
			if d.Subject != ps.subject {
				t.Errorf("dead letter %d subject = %q; want %q", seq, d.Subject, ps.subject)
			}
			if !bytes.Equal(d.Payload, ps.body) {
				t.Errorf("dead letter %d payload is %d bytes, not the %d published", seq, len(d.Payload), len(ps.body))
			}
		})
	}
	if len(dls) != len(ps) {
		t.Errorf("%d dead letters; want %d, one per poison message", len(dls), len(ps))
	}

	// The operator's view: `projector dead-letters` prints the same, one
	// JSON object per line, the payload as text or base64.
	out := cliBinary(t, bin, r, "dead-letters")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(ps) {
		t.Errorf("projector dead-letters printed %d lines; want %d", len(lines), len(ps))
	}
	for _, line := range lines {
		var dl struct {
			Seq           uint64 `json:"stream_seq"`
			Subject       string `json:"subject"`
			Reason        string `json:"reason"`
			Payload       string `json:"payload"`
			PayloadBase64 string `json:"payload_base64"`
			PayloadBytes  int    `json:"payload_bytes"`
		}
		if err := json.Unmarshal([]byte(line), &dl); err != nil {
			t.Fatalf("dead-letters line %.200q: %v", line, err)
		}
		d := bySeq[dl.Seq]
		payload := []byte(dl.Payload)
		if dl.PayloadBase64 != "" {
			if payload, err = base64.StdEncoding.DecodeString(dl.PayloadBase64); err != nil {
				t.Fatal(err)
			}
		}
		if dl.Reason != d.Reason || dl.Subject != d.Subject || !bytes.Equal(payload, d.Payload) || dl.PayloadBytes != len(d.Payload) {
			t.Errorf("dead-letters line for seq %d = %s %s (%d bytes); want %s %s (%d bytes)",
				dl.Seq, dl.Reason, dl.Subject, len(payload), d.Reason, d.Subject, len(d.Payload))
		}
	}

	if err := p.alive(); err != nil {
		t.Fatalf("projector stopped: %v", err)
	}
	for path, code := range map[string]int{"/healthz": http.StatusOK, "/readyz": http.StatusOK} {
		if got, body, err := httpGet("http://" + p.addr + path); got != code {
			t.Errorf("GET %s = %d %q %v; want %d", path, got, body, err, code)
		}
	}
	exposition := scrape(t, p.addr)
	if n := metric(exposition, "buildstate_events_dead_lettered_total"); n != float64(len(ps)) {
		t.Errorf("buildstate_events_dead_lettered_total = %v; want %d", n, len(ps))
	}
	if n := metric(exposition, "buildstate_events_applied_total"); n != float64(len(want)) {
		t.Errorf("buildstate_events_applied_total = %v; want %d", n, len(want))
	}
	assertNoRetries(t, exposition)
	assertSameModel(t, r.dbURL, ref, want)
}

// cliBinary runs the projector binary with args against r and returns its
// stdout.
func cliBinary(t *testing.T, bin string, r *rig, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "DATABASE_URL="+r.dbURL, "NATS_URL="+r.natsURL)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("projector %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// TestDeadLetterRetry re-drives dead letters with `projector dead-letters
// retry` while the projector runs. A build whose events were refused because
// projector_builds named the wrong owner (a bad manual edit or restore) is
// fixed by the operator and re-driven by reason: its events apply and the
// rows then equal the reference; a second retry changes nothing. A message
// that is still invalid stays, with its retry count raised, however often it
// is retried.
func TestDeadLetterRetry(t *testing.T) {
	t.Parallel()
	bin := projectorBinary(t)
	r := newRig(t)
	migrate(t, r.dbURL)
	pool := openPool(t, r.dbURL)
	ctx := context.Background()
	evs := backlog(505, 20)
	const build, owner, wrongOwner = "p-3-b2", "p-3", "p-7"
	if _, err := pool.Exec(ctx, `INSERT INTO projector_builds (build_id, project_id) VALUES ($1, $2)`, build, wrongOwner); err != nil {
		t.Fatal(err)
	}
	msgs := r.publishEvents(t, evs)
	bad := r.publishRaw(t, []rawMsg{{subject: events.Subject(prefix, "p-1", events.KindStarted), data: []byte(`{"spec_version":1,"id":`)}})[0]
	ref := reference(t, msgs)
	want := distinctIDs(evs)
	var ofBuild []events.Event
	for _, ev := range evs {
		if ev.BuildID == build {
			ofBuild = append(ofBuild, ev)
		}
	}
	if len(ofBuild) == 0 || ofBuild[0].ProjectID != owner {
		t.Fatalf("workload has no build %s of %s", build, owner)
	}

	p := startInProcess(t, r, 100)
	r.waitDrained(t, time.Minute, p.alive)
	store := projection.New(pool, projection.Options{Prefix: prefix})
	dls, err := store.DeadLetters(ctx, projection.DeadLetterFilter{Reason: string(events.ReasonBuildProjectClash)})
	if err != nil {
		t.Fatal(err)
	}
	if len(dls) != len(ofBuild) {
		t.Fatalf("%d build_project_conflict dead letters; want %d, every message of build %s", len(dls), len(ofBuild), build)
	}

	// The fix: the build's true owner.
	if _, err := pool.Exec(ctx, `UPDATE projector_builds SET project_id = $2 WHERE build_id = $1`, build, owner); err != nil {
		t.Fatal(err)
	}
	distinct := len(distinctIDs(ofBuild))
	got := cliBinary(t, bin, r, "dead-letters", "retry", "--reason", string(events.ReasonBuildProjectClash))
	t.Logf("after the fix, retry --reason build_project_conflict: %s", strings.TrimSpace(got))
	if w := "applied " + strconv.Itoa(distinct) + ", duplicates " + strconv.Itoa(len(ofBuild)-distinct) + ", still dead 0\n"; got != w {
		t.Errorf("retry --reason build_project_conflict printed %q; want %q", got, w)
	}
	assertSameModel(t, r.dbURL, ref, want)
	got = cliBinary(t, bin, r, "dead-letters", "retry", "--reason", string(events.ReasonBuildProjectClash))
	if w := "applied 0, duplicates 0, still dead 0\n"; got != w {
		t.Errorf("second retry printed %q; want %q", got, w)
	}

	// Still invalid: stays, counted, payload kept; the model does not move.
	seq := strconv.Itoa(int(bad.Seq))
	for n := 1; n <= 2; n++ {
		got := cliBinary(t, bin, r, "dead-letters", "retry", "--seq", seq)
		if w := "applied 0, duplicates 0, still dead 1\n"; got != w {
			t.Errorf("retry %d of seq %s printed %q; want %q", n, seq, got, w)
		}
		d, err := store.DeadLetters(ctx, projection.DeadLetterFilter{Seq: bad.Seq})
		if err != nil {
			t.Fatal(err)
		}
		if len(d) != 1 || d[0].Retries != n || d[0].Reason != string(events.ReasonMalformedJSON) || !bytes.Equal(d[0].Payload, bad.Data) {
			t.Errorf("after retry %d, dead letter %s = %+v; want one malformed_json with retries %d and its payload", n, seq, d, n)
		}
	}
	assertSameModel(t, r.dbURL, ref, want)
	if m := readModel(t, r.dbURL); m.deadLetters != 1 {
		t.Errorf("%d dead letters at the end; want 1 (the malformed one)", m.deadLetters)
	}
	if err := p.alive(); err != nil {
		t.Errorf("projector stopped: %v", err)
	}
	assertNoRetries(t, scrape(t, p.addr))
}
