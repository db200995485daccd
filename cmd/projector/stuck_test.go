package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
)

// Issue 9 §3: builds whose worker vanished. Nothing here sleeps for hours:
// the events are published with occurred_at in the past (the contract
// bounds only the future), and one case gives the command a clock.

// stuckJSON is one line of `projector stuck --json`.
type stuckJSON struct {
	BuildID    string    `json:"build_id"`
	ProjectID  string    `json:"project_id"`
	State      string    `json:"state"`
	Since      time.Time `json:"since"`
	AgeSeconds float64   `json:"age_seconds"`
	EventID    string    `json:"time_out_event_id"`
	Seq        uint64    `json:"time_out_seq"`
}

func parseStuck(t *testing.T, out string) map[string]stuckJSON {
	t.Helper()
	got := map[string]stuckJSON{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		var s stuckJSON
		if err := json.Unmarshal([]byte(line), &s); err != nil {
			t.Fatalf("stuck --json line %q: %v", line, err)
		}
		got[s.BuildID] = s
	}
	return got
}

// stuckHistory publishes builds in every state, relative to now: p-q's is
// stuck queued, p-s's stuck building; the others are young or finished.
func stuckHistory(t *testing.T, e env, now time.Time) (queuedAt, startedAt time.Time) {
	t.Helper()
	queuedAt, startedAt = now.Add(-2*time.Hour).Truncate(time.Microsecond), now.Add(-4*time.Hour).Truncate(time.Microsecond)
	fw := "nextjs"
	for _, ev := range []events.Event{
		events.New(events.KindQueued, "p-q", "b-q", queuedAt, events.Data{}),
		events.New(events.KindQueued, "p-s", "b-s", startedAt.Add(-time.Minute), events.Data{}),
		events.New(events.KindStarted, "p-s", "b-s", startedAt, events.Data{Framework: &fw}),
		events.New(events.KindMetricsRecorded, "p-s", "b-s", startedAt.Add(time.Minute), events.Data{Framework: &fw}),
		events.New(events.KindQueued, "p-young", "b-young-q", now.Add(-10*time.Minute), events.Data{}),
		events.New(events.KindStarted, "p-young", "b-young-s", now.Add(-time.Hour), events.Data{}),
		events.New(events.KindStarted, "p-done", "b-done", now.Add(-5*time.Hour), events.Data{}),
		events.New(events.KindCompleted, "p-done", "b-done", now.Add(-4*time.Hour), events.Data{Outcome: events.OutcomeSucceeded}),
		events.New(events.KindQueued, "p-canceled", "b-canceled", now.Add(-5*time.Hour), events.Data{}),
		events.New(events.KindCompleted, "p-canceled", "b-canceled", now.Add(-4*time.Hour), events.Data{Outcome: events.OutcomeCanceled}),
	} {
		publish(t, e.js, ev)
	}
	return queuedAt, startedAt
}

// completedMsgs counts the stream's messages on <prefix>.<project>.completed.
func completedMsgs(t *testing.T, js jetstream.JetStream, project string) uint64 {
	t.Helper()
	ctx := context.Background()
	s, err := js.Stream(ctx, "BUILDS")
	if err != nil {
		t.Fatal(err)
	}
	subject := events.Subject("builds", project, events.KindCompleted)
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subject))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[subject]
}

// factRows renders projector_facts (time-out marks included) and
// projector_open_builds.
func factRows(t *testing.T, e env) []string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT 'fact ' || (build_id, kind, project_id, event_id, occurred_at, stream_seq, outcome,
		error, timed_out)::text FROM projector_facts
		UNION ALL SELECT 'open ' || (build_id, project_id, state, since)::text FROM projector_open_builds ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return lines
}

// waitFor polls cond until it holds or 20 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestStuckAndTimeOut(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	now := time.Now().UTC()
	queuedAt, startedAt := stuckHistory(t, e, now)
	logs, stop := projectorRun(t, e, "--stuck-every", "100ms")
	waitCaughtUp(t, e)
	metricsURL := "http://" + httpAddr(t, logs.String()) + "/metrics"
	waitFor(t, "the gauge to count one stuck build of each state", func() bool {
		body := get(t, metricsURL)
		return strings.Contains(body, `buildstate_builds_stuck{state="queued"} 1`) &&
			strings.Contains(body, `buildstate_builds_stuck{state="building"} 1`)
	})

	// The listing, human and JSON.
	human := cli(t, e, "stuck")
	lines := strings.Split(strings.TrimSpace(human), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "BUILD") ||
		!strings.Contains(lines[1], "b-s") || !strings.Contains(lines[1], "building") || !strings.Contains(lines[1], "p-s") ||
		!strings.Contains(lines[2], "b-q") || !strings.Contains(lines[2], "queued") {
		t.Errorf("stuck printed:\n%s\nwant a header, b-s building (the older), then b-q queued", human)
	}
	got := parseStuck(t, cli(t, e, "stuck", "--json"))
	if len(got) != 2 || got["b-q"].State != "queued" || got["b-q"].ProjectID != "p-q" || !got["b-q"].Since.Equal(queuedAt) ||
		got["b-s"].State != "building" || got["b-s"].ProjectID != "p-s" || !got["b-s"].Since.Equal(startedAt) ||
		got["b-s"].AgeSeconds < 4*3600 || got["b-s"].EventID != "" {
		t.Errorf("stuck --json = %+v; want b-q queued since %v and b-s building since %v, nothing timed out", got, queuedAt, startedAt)
	}
	// The limits are flags; ages are taken from the command's clock.
	if got := parseStuck(t, cli(t, e, "stuck", "--json", "--queued-for", "3h", "--building-for", "5h")); len(got) != 0 {
		t.Errorf("stuck --queued-for 3h --building-for 5h = %+v; want none", got)
	}
	var out, errb bytes.Buffer
	earlier := func() time.Time { return now.Add(-90 * time.Minute) } // b-q queued 30m before, b-s started 2h30m before
	if err := runStuck(context.Background(), []string{"--json"}, e.getenv, &out, &errb, earlier); err != nil {
		t.Fatalf("stuck at an earlier clock: %v\n%s", err, errb.String())
	}
	if got := parseStuck(t, out.String()); len(got) != 0 {
		t.Errorf("stuck 90 minutes ago = %+v; want none", got)
	}

	// --time-out ends both through the log.
	got = parseStuck(t, cli(t, e, "stuck", "--json", "--time-out"))
	if len(got) != 2 || !strings.HasPrefix(got["b-q"].EventID, events.TimeOutIDPrefix) || got["b-s"].Seq == 0 {
		t.Fatalf("stuck --time-out = %+v; want both with a time-out event id and sequence", got)
	}
	waitCaughtUp(t, e)
	q, s := status(t, e, "p-q"), status(t, e, "p-s")
	if q.Project.BuildStatus != "canceled" || s.Project.BuildStatus != "failed" {
		t.Errorf("after time-outs p-q is %s, p-s %s; want canceled, failed", q.Project.BuildStatus, s.Project.BuildStatus)
	}
	if len(s.Builds) != 1 || s.Builds[0].Status != "failed" || s.Builds[0].Error == nil ||
		*s.Builds[0].Error != "timed out: no completion 3h after start" ||
		s.Builds[0].CompletedAt == nil || !s.Builds[0].CompletedAt.Equal(startedAt.Add(3*time.Hour)) {
		t.Errorf("p-s builds after its time-out = %+v; want failed at start+3h with the reason", s.Builds)
	}
	if out := cli(t, e, "stuck"); strings.TrimSpace(out) != "no stuck builds" {
		t.Errorf("stuck after the time-outs printed %q; want none", out)
	}
	waitFor(t, "the gauge to fall to zero", func() bool {
		body := get(t, metricsURL)
		return strings.Contains(body, `buildstate_builds_stuck{state="queued"} 0`) &&
			strings.Contains(body, `buildstate_builds_stuck{state="building"} 0`)
	})

	// The same time-out again past JetStream's duplicate window (no
	// Nats-Msg-Id: stored again) is a duplicate to the projector.
	timeOut := events.TimeOut{ProjectID: "p-s", BuildID: "b-s", Started: true, Since: startedAt, After: 3 * time.Hour}.Event()
	if timeOut.ID != got["b-s"].EventID {
		t.Fatalf("time-out id %s; the command published %s", timeOut.ID, got["b-s"].EventID)
	}
	if _, err := e.js.Publish(context.Background(), "builds.p-s.completed", marshal(t, timeOut)); err != nil {
		t.Fatal(err)
	}
	waitCaughtUp(t, e)
	if body := get(t, metricsURL); !strings.Contains(body, "buildstate_events_duplicates_total 1") {
		t.Errorf("the re-sent time-out was not counted a duplicate:\n%s", body)
	}

	// A late real completion wins over the time-out, though it is older.
	dur := int64(1200000)
	publish(t, e.js, events.New(events.KindCompleted, "p-s", "b-s", startedAt.Add(20*time.Minute),
		events.Data{Outcome: events.OutcomeSucceeded, DurationMS: &dur}))
	waitCaughtUp(t, e)
	s = status(t, e, "p-s")
	if s.Project.BuildStatus != "deployed" || len(s.Builds) != 1 || s.Builds[0].Status != "succeeded" || s.Builds[0].Error != nil ||
		!s.Builds[0].CompletedAt.Equal(startedAt.Add(20*time.Minute)) {
		t.Errorf("p-s after a late real completion = %+v, builds %+v; want deployed, succeeded at start+20m, no error", s.Project, s.Builds)
	}
	// A time-out published again now changes nothing: the real one wins.
	publish(t, e.js, events.TimeOut{ProjectID: "p-s", BuildID: "b-s", Started: true, Since: startedAt, After: time.Hour}.Event())
	waitCaughtUp(t, e)
	if s := status(t, e, "p-s"); s.Project.BuildStatus != "deployed" {
		t.Errorf("p-s after another time-out = %s; want deployed", s.Project.BuildStatus)
	}
	stop()

	// A rebuild from the log gives the same rows, facts and marks included.
	live, facts := liveRows(t, e), factRows(t, e)
	if !strings.Contains(strings.Join(facts, "\n"), ",t)") {
		t.Fatalf("no time-out among the facts:\n%s", strings.Join(facts, "\n"))
	}
	if out := cli(t, e, "rebuild"); !strings.Contains(out, "swapped buildstate_shadow in") {
		t.Errorf("rebuild printed %q; want the swap", out)
	}
	sameRows(t, "live after rebuild", liveRows(t, e), live)
	sameRows(t, "facts after rebuild", factRows(t, e), facts)
	if out := cli(t, e, "verify"); !strings.Contains(out, "0 faults") || !strings.Contains(out, "0 projects rows and 0 metrics rows differ") {
		t.Errorf("verify printed %q; want no faults, no differences", out)
	}
}

// TestTimeOutTwiceAtOnce: two `projector stuck --time-out` at the same time
// (two operators, two cron hosts) publish one event per build.
func TestTimeOutTwiceAtOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	stuckHistory(t, e, time.Now().UTC())
	_, stop := projectorRun(t, e)
	waitCaughtUp(t, e)
	// Stopped, so that neither run can see the other's time-out applied
	// before it lists: both publish.
	stop()

	var wg sync.WaitGroup
	outs, errs := make([]string, 2), make([]error, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], errs[i] = cliErr(e, "stuck", "--time-out", "--json")
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("run %d: %v", i, err)
		}
	}
	a, b := parseStuck(t, outs[0]), parseStuck(t, outs[1])
	for _, build := range []string{"b-q", "b-s"} {
		if a[build].EventID == "" || a[build].EventID != b[build].EventID || a[build].Seq != b[build].Seq {
			t.Errorf("%s: runs published %s (seq %d) and %s (seq %d); want one event", build,
				a[build].EventID, a[build].Seq, b[build].EventID, b[build].Seq)
		}
	}
	if n := completedMsgs(t, e.js, "p-q"); n != 1 {
		t.Errorf("the stream holds %d completions of p-q; want 1", n)
	}
	if n := completedMsgs(t, e.js, "p-s"); n != 1 {
		t.Errorf("the stream holds %d completions of p-s; want 1", n)
	}
	_, stop = projectorRun(t, e)
	waitCaughtUp(t, e)
	stop()
	if q, s := status(t, e, "p-q"), status(t, e, "p-s"); q.Project.BuildStatus != "canceled" || s.Project.BuildStatus != "failed" {
		t.Errorf("after the time-outs p-q is %s, p-s %s; want canceled, failed", q.Project.BuildStatus, s.Project.BuildStatus)
	}
	if dl := cli(t, e, "dead-letters"); dl != "" {
		t.Errorf("dead letters after two time-out runs:\n%s", dl)
	}
}

// TestRunTimesOutStuck: `projector run --time-out-stuck` ends the stuck
// builds by itself, and only those.
func TestRunTimesOutStuck(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	stuckHistory(t, e, time.Now().UTC())
	logs, stop := projectorRun(t, e, "--time-out-stuck", "--stuck-every", "100ms")
	waitFor(t, "both time-outs to be applied", func() bool {
		q, errQ := cliErr(e, "status", "p-q", "--json")
		s, errS := cliErr(e, "status", "p-s", "--json")
		return errQ == nil && errS == nil && strings.Contains(q, `"build_status":"canceled"`) && strings.Contains(s, `"build_status":"failed"`)
	})
	waitCaughtUp(t, e)
	stop()
	if n := completedMsgs(t, e.js, "p-s"); n != 1 {
		t.Errorf("the stream holds %d completions of p-s; want 1 (the loop ran many times)", n)
	}
	for _, p := range []string{"p-young", "p-done", "p-canceled"} {
		want := map[string]uint64{"p-young": 0, "p-done": 1, "p-canceled": 1}[p]
		if n := completedMsgs(t, e.js, p); n != want {
			t.Errorf("the stream holds %d completions of %s; want %d", n, p, want)
		}
	}
	if !strings.Contains(logs.String(), `"timed out a stuck build"`) {
		t.Errorf("no log line for the time-outs:\n%s", logs.String())
	}
}
