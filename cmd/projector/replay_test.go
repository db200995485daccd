package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/internal/workload"
)

// projectorRun runs `projector run` in-process until the test stops it.
func projectorRun(t *testing.T, e env, args ...string) (logs *testenv.SyncBuffer, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	logs = &testenv.SyncBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, append([]string{"projector", "run"}, args...), e.getenv, io.Discard, logs) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("projector run = %v\n%s", err, logs.String())
			}
		})
	}
	t.Cleanup(stop)
	return logs, stop
}

// waitCaughtUp waits until the durable consumer has applied the whole stream.
func waitCaughtUp(t *testing.T, e env) uint64 {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(90 * time.Second)
	for {
		s, err := e.js.Stream(ctx, "BUILDS")
		if err != nil {
			t.Fatal(err)
		}
		si, err := s.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if c, err := e.js.Consumer(ctx, "BUILDS", "projector"); err == nil {
			ci, err := c.Info(ctx)
			if err == nil && ci.NumPending == 0 && ci.NumAckPending == 0 && ci.AckFloor.Stream == si.State.LastSeq {
				return si.State.LastSeq
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the projector did not catch up with seq %d", si.State.LastSeq)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// liveRows renders the live read model (every column but updated_at) and
// the dead letters' sequences, one line per row, in a stable order.
func liveRows(t *testing.T, e env) []string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var out []string
	for _, q := range []string{
		`SELECT 'project ' || (project_id, build_status, current_build_id, last_build_started, last_build_completed, framework)::text
		 FROM projects ORDER BY project_id`,
		`SELECT 'metrics ' || (build_id, project_id, status, queued_at, started_at, completed_at, duration_ms, framework,
		        node_version, package_manager, attempt, error)::text FROM project_build_metrics ORDER BY build_id`,
		`SELECT 'dead ' || stream_seq || ' ' || reason FROM projector_dead_letters ORDER BY stream_seq`,
	} {
		rows, err := conn.Query(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, lines...)
	}
	return out
}

func exec(t *testing.T, e env, sql string) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func sameRows(t *testing.T, what string, got, want []string) {
	t.Helper()
	if strings.Join(got, "\n") == strings.Join(want, "\n") {
		return
	}
	w := map[string]bool{}
	for _, l := range want {
		w[l] = true
	}
	g := map[string]bool{}
	for _, l := range got {
		g[l] = true
	}
	var diff []string
	for _, l := range want {
		if !g[l] {
			diff = append(diff, "- "+l)
		}
	}
	for _, l := range got {
		if !w[l] {
			diff = append(diff, "+ "+l)
		}
	}
	if len(diff) > 20 {
		diff = diff[:20]
	}
	t.Errorf("%s: %d rows, want %d:\n%s", what, len(got), len(want), strings.Join(diff, "\n"))
}

// cliErr runs the command in-process and returns stdout and its error.
func cliErr(e env, args ...string) (string, error) {
	var out, errb bytes.Buffer
	err := run(context.Background(), append([]string{"projector"}, args...), e.getenv, &out, &errb)
	return out.String(), err
}

type rawMsg struct {
	subject string
	data    []byte
}

// messy is a shuffled history with exact duplicates and messages the
// projector refuses (malformed, id conflicts, build clashes, subject
// mismatch), spread through it.
func messy(t *testing.T, seed int64, projects int) []rawMsg {
	t.Helper()
	evs := workload.Generate(seed, workload.Config{Projects: projects, BuildsPerProject: 2, MaxBuildsPerProject: 4, DupRate: 0.1, Shuffle: true})
	var out []rawMsg
	for _, ev := range evs {
		out = append(out, rawMsg{events.Subject("builds", ev.ProjectID, ev.Kind()), marshal(t, ev)})
	}
	rng := rand.New(rand.NewPCG(uint64(seed), 7))
	insert := func(m rawMsg) {
		i := rng.IntN(len(out) + 1)
		out = append(out[:i], append([]rawMsg{m}, out[i:]...)...)
	}
	insert(rawMsg{"builds.p-0.queued", []byte(`{"spec_version":1,`)})
	mismatch := events.New(events.KindStarted, "p-2", "p-2-b7", time.Now().Add(-time.Hour), events.Data{})
	insert(rawMsg{"builds.p-3.started", marshal(t, mismatch)})
	for i := range 4 {
		ev := evs[rng.IntN(len(evs))]
		ev.OccurredAt = ev.OccurredAt.Add(time.Duration(i+1) * time.Second)
		insert(rawMsg{events.Subject("builds", ev.ProjectID, ev.Kind()), marshal(t, ev)})
		ev = evs[rng.IntN(len(evs))]
		other := fmt.Sprintf("p-%d", rng.IntN(projects))
		clash := events.New(ev.Kind(), other, ev.BuildID, ev.OccurredAt, ev.Data)
		insert(rawMsg{events.Subject("builds", other, ev.Kind()), marshal(t, clash)})
	}
	return out
}

func marshal(t *testing.T, ev events.Event) []byte {
	t.Helper()
	b, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func publishRaw(t *testing.T, js jetstream.JetStream, msgs []rawMsg) {
	t.Helper()
	for _, m := range msgs {
		if _, err := js.PublishAsync(m.subject, m.data); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(time.Minute):
		t.Fatal("publish acks did not arrive")
	}
}

func TestRebuildEqualsLive(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	publishRaw(t, e.js, messy(t, 11, 80))
	_, stop := projectorRun(t, e, "--batch", "7")
	waitCaughtUp(t, e)
	stop()
	live := liveRows(t, e)
	if !strings.Contains(strings.Join(live, "\n"), "dead ") {
		t.Fatalf("the history left no dead letters; the test needs some")
	}

	out := cli(t, e, "rebuild", "--dry-run", "--batch", "100")
	if !strings.Contains(out, "buildstate_shadow left for inspection") {
		t.Errorf("rebuild --dry-run printed %q; want the shadow's name", out)
	}
	sameRows(t, "live after a dry run", liveRows(t, e), live)

	out = cli(t, e, "rebuild", "--batch", "100")
	if !strings.Contains(out, "swapped buildstate_shadow in") {
		t.Errorf("rebuild printed %q; want the swap", out)
	}
	sameRows(t, "live after rebuild", liveRows(t, e), live)
	if out := cli(t, e, "verify"); !strings.Contains(out, "0 faults") || !strings.Contains(out, "0 projects rows and 0 metrics rows differ") {
		t.Errorf("verify printed %q; want no faults, no differences", out)
	}
}

func TestRebuildWhileProjectorRuns(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	fixed := events.New(events.KindStarted, "p-fixed", "b-fixed", time.Now().Add(-time.Hour), events.Data{})
	publish(t, e.js, fixed)
	logs, stop := projectorRun(t, e, "--batch", "50")
	waitCaughtUp(t, e)
	// Damage a row that no later event touches: only the rebuild repairs it.
	exec(t, e, `UPDATE projects SET framework = 'damaged' WHERE project_id = 'p-fixed'`)

	history := messy(t, 12, 150)
	third := len(history) / 3
	publishRaw(t, e.js, history[:third])
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // keeps publishing through the rebuild
		defer wg.Done()
		rest := history[third:]
		for i := 0; i < len(rest); i += 40 {
			publishRaw(t, e.js, rest[i:min(i+40, len(rest))])
			time.Sleep(15 * time.Millisecond)
		}
	}()
	out := cli(t, e, "rebuild", "--batch", "300")
	t.Logf("rebuild under load: %s", out)
	wg.Wait()
	if !strings.Contains(out, "swapped") {
		t.Errorf("rebuild printed %q; want the swap", out)
	}
	waitCaughtUp(t, e)
	vout, err := cliErr(e, "verify", "--wait", "60s")
	if err != nil {
		t.Fatalf("verify after a rebuild under load = %v\n%s\nprojector logs:\n%s", err, vout, logs.String())
	}
	// The swap fenced the live writer (every epoch raised, the owner kept):
	// it took its partition back and applied the fenced batch again, in
	// order, rather than giving it back behind what it had pulled since
	// (which reordered a build-id clash once: live and replay then differed).
	if l := logs.String(); strings.Contains(l, `"partitions fenced`) && !strings.Contains(l, "partition taken back after a fence") ||
		strings.Contains(l, "given back unacked") {
		t.Errorf("the fenced live writer gave its batch back instead of taking its partition back:\n%s", l)
	}
	var fw *string
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, `SELECT framework FROM projects WHERE project_id = 'p-fixed'`).Scan(&fw); err != nil {
		t.Fatal(err)
	}
	if fw != nil {
		t.Errorf("p-fixed framework = %q after rebuild; want NULL (the damage replaced by the log's model)", *fw)
	}
	stop()
	if strings.Contains(logs.String(), `"level":"error"`) {
		t.Errorf("the projector logged errors during the rebuild:\n%s", logs.String())
	}
}

func TestVerifyCatchesABrokenRow(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	t0 := time.Now().Add(-time.Hour).UTC()
	fw := "astro"
	for _, ev := range []events.Event{
		events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{}),
		events.New(events.KindStarted, "p-1", "b-1", t0.Add(time.Second), events.Data{Framework: &fw}),
		events.New(events.KindMetricsRecorded, "p-1", "b-1", t0.Add(2*time.Second), events.Data{}),
		events.New(events.KindCompleted, "p-1", "b-1", t0.Add(3*time.Second), events.Data{Outcome: events.OutcomeSucceeded}),
		events.New(events.KindQueued, "p-2", "b-2", t0, events.Data{}),
	} {
		publish(t, e.js, ev)
	}
	_, stop := projectorRun(t, e)
	waitCaughtUp(t, e)
	if out, err := cliErr(e, "verify"); err != nil {
		t.Fatalf("verify on a sound model = %v\n%s", err, out)
	}

	exec(t, e, `UPDATE projects SET build_status = 'building' WHERE project_id = 'p-1'`)
	out, err := cliErr(e, "verify")
	if err == nil {
		t.Fatalf("verify after breaking p-1 = nil; want an error\n%s", out)
	}
	if !strings.Contains(err.Error(), "differs from a replay") {
		t.Errorf("verify error = %v; want it to say the live model differs from a replay", err)
	}
	var minus, plus bool
	for _, line := range strings.Split(out, "\n") {
		minus = minus || (strings.HasPrefix(line, "- live") && strings.Contains(line, "p-1 building"))
		plus = plus || (strings.HasPrefix(line, "+ replay") && strings.Contains(line, "p-1 deployed"))
	}
	if !minus || !plus {
		t.Errorf("verify diff lacks \"- live ... p-1 building\" and \"+ replay ... p-1 deployed\":\n%s", out)
	}
	if out, err := cliErr(e, "verify", "--no-rebuild"); err != nil {
		t.Errorf("verify --no-rebuild = %v; the broken row keeps every rule\n%s", err, out)
	}

	// A row that breaks a rule, written while the constraint was off.
	exec(t, e, `ALTER TABLE projects DROP CONSTRAINT projects_build_timing_logical`)
	exec(t, e, `UPDATE projects SET last_build_completed = last_build_started - interval '1 hour' WHERE project_id = 'p-1'`)
	out, err = cliErr(e, "verify", "--no-rebuild")
	if err == nil || !strings.Contains(out, "projects_build_timing_logical") || !strings.Contains(out, "p-1") {
		t.Errorf("verify --no-rebuild = %v\n%s\nwant the timing fault of p-1", err, out)
	}
	stop()
	// With the projector stopped and more events waiting, verify cannot compare.
	publish(t, e.js, events.New(events.KindQueued, "p-3", "b-3", t0, events.Data{}))
	if _, err := cliErr(e, "verify", "--wait", "300ms"); err == nil || !strings.Contains(err.Error(), "not caught up") {
		t.Errorf("verify with the projector behind = %v; want not caught up", err)
	}
}

// statusJSON is the part of `status --json` the time-travel test compares.
type statusJSON struct {
	Project struct {
		ProjectID          string     `json:"project_id"`
		BuildStatus        string     `json:"build_status"`
		CurrentBuildID     *string    `json:"current_build_id"`
		LastBuildStarted   *time.Time `json:"last_build_started"`
		LastBuildCompleted *time.Time `json:"last_build_completed"`
		Framework          *string    `json:"framework"`
	} `json:"project"`
	Builds []projection.MetricsRow `json:"recent_builds"`
}

// utc puts every time in UTC, so that equal instants marshal alike.
func (s *statusJSON) utc() {
	u := func(t *time.Time) {
		if t != nil {
			*t = t.UTC()
		}
	}
	u(s.Project.LastBuildStarted)
	u(s.Project.LastBuildCompleted)
	for i := range s.Builds {
		b := &s.Builds[i]
		b.StartedAt = b.StartedAt.UTC()
		u(b.CompletedAt)
		u(b.QueuedAt)
	}
}

func status(t *testing.T, e env, args ...string) statusJSON {
	t.Helper()
	var s statusJSON
	out := cli(t, e, append([]string{"status"}, append(args, "--json")...)...)
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("status %v: %v\n%s", args, err, out)
	}
	s.utc()
	return s
}

func sameStatus(a, b statusJSON) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

func TestStatusAtMatchesTheModelThen(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	_, _ = projectorRun(t, e)
	t0 := time.Now().Add(-time.Hour).UTC().Truncate(time.Millisecond)
	fw, node := "remix", "22.11.0"
	ms := int64(9000)
	noise := func(i int) { // other projects' events between the points
		publish(t, e.js, events.New(events.KindQueued, fmt.Sprintf("p-other-%d", i), fmt.Sprintf("b-other-%d", i), t0, events.Data{}))
	}
	steps := [][]events.Event{
		{
			events.New(events.KindQueued, "p-t", "b-1", t0, events.Data{}),
			events.New(events.KindStarted, "p-t", "b-1", t0.Add(time.Second), events.Data{Framework: &fw}),
		},
		{
			events.New(events.KindMetricsRecorded, "p-t", "b-1", t0.Add(2*time.Second), events.Data{NodeVersion: &node}),
			events.New(events.KindCompleted, "p-t", "b-1", t0.Add(9*time.Second), events.Data{Outcome: events.OutcomeFailed, DurationMS: &ms}),
		},
		{
			events.New(events.KindQueued, "p-t", "b-2", t0.Add(time.Minute), events.Data{}),
			events.New(events.KindStarted, "p-t", "b-2", t0.Add(time.Minute+time.Second), events.Data{}),
			events.New(events.KindMetricsRecorded, "p-t", "b-2", t0.Add(time.Minute+2*time.Second), events.Data{}),
		},
	}
	var seqs []uint64
	var times []time.Time
	var then []statusJSON
	for i, step := range steps {
		for _, ev := range step {
			publish(t, e.js, ev)
			noise(i)
		}
		seqs = append(seqs, waitCaughtUp(t, e))
		then = append(then, status(t, e, "p-t"))
		time.Sleep(20 * time.Millisecond)
		times = append(times, time.Now().UTC())
		time.Sleep(20 * time.Millisecond)
	}
	if then[0].Project.BuildStatus != "building" || then[1].Project.BuildStatus != "failed" || then[2].Project.BuildStatus != "building" {
		t.Fatalf("live statuses at the three points = %s, %s, %s; want building, failed, building",
			then[0].Project.BuildStatus, then[1].Project.BuildStatus, then[2].Project.BuildStatus)
	}
	for i := range steps {
		if got := status(t, e, "p-t", "--seq", fmt.Sprint(seqs[i])); !sameStatus(got, then[i]) {
			t.Errorf("status --seq %d = %+v; want the live model then, %+v", seqs[i], got, then[i])
		}
		if got := status(t, e, "p-t", "--at", times[i].Format(time.RFC3339Nano)); !sameStatus(got, then[i]) {
			t.Errorf("status --at %s = %+v; want the live model then, %+v", times[i].Format(time.RFC3339Nano), got, then[i])
		}
	}
	human := cli(t, e, "status", "p-t", "--seq", fmt.Sprint(seqs[1]))
	for _, want := range []string{"as of seq", "failed", "b-1", "remix", "22.11.0"} {
		if !strings.Contains(human, want) {
			t.Errorf("status --seq output lacks %q:\n%s", want, human)
		}
	}
	if _, err := cliErr(e, "status", "p-t", "--seq", "1", "--at", times[0].Format(time.RFC3339)); err == nil {
		t.Errorf("status with --seq and --at = nil error; want refusal")
	}
	if _, err := cliErr(e, "status", "p-t", "--at", t0.Add(-2*time.Hour).Format(time.RFC3339)); err == nil ||
		!strings.Contains(err.Error(), "no visible build") {
		t.Errorf("status before the first event = %v; want no visible build", err)
	}
}

func TestReplayRefusesTruncatedStream(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	cli(t, e, "migrate") // rebuild and verify need the schema; they do not create it
	if _, err := e.js.CreateStream(ctx, jetstream.StreamConfig{Name: "TRUNC", Subjects: []string{"trunc.>"}, MaxMsgs: 5}); err != nil {
		t.Fatal(err)
	}
	for i := range 9 {
		ev := events.New(events.KindQueued, "p-1", fmt.Sprintf("b-%d", i), time.Now().Add(-time.Minute), events.Data{})
		if _, err := e.js.Publish(ctx, events.Subject("trunc", "p-1", ev.Kind()), marshal(t, ev)); err != nil {
			t.Fatal(err)
		}
	}
	flags := []string{"--stream", "TRUNC", "--subject-prefix", "trunc"}
	for _, cmd := range []string{"rebuild", "verify"} {
		_, err := cliErr(e, append([]string{cmd}, flags...)...)
		if err == nil || !strings.Contains(err.Error(), "truncated") || !strings.Contains(err.Error(), "README") ||
			!strings.Contains(err.Error(), "--allow-truncated") {
			t.Errorf("%s of a truncated stream = %v; want a refusal naming the README and --allow-truncated", cmd, err)
		}
	}
	out := cli(t, e, append([]string{"rebuild", "--allow-truncated", "--dry-run"}, flags...)...)
	if !strings.Contains(out, "replayed 5 messages") || !strings.Contains(out, "truncated") {
		t.Errorf("rebuild --allow-truncated printed %q; want 5 messages replayed and a warning", out)
	}
}

// A migration that adds a column (002: project_build_metrics.queued_at)
// leaves it NULL on the rows projected before; a rebuild fills it.
func TestRebuildFillsANewColumn(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	evs := workload.Generate(21, workload.Config{Projects: 30, BuildsPerProject: 2, Clean: true, Shuffle: true})
	queued := map[string]time.Time{}
	for _, ev := range evs {
		publish(t, e.js, ev)
		if ev.Kind() == events.KindQueued {
			queued[ev.BuildID] = ev.OccurredAt
		}
	}
	_, stop := projectorRun(t, e)
	waitCaughtUp(t, e)
	stop()
	// The database as it is right after the migration on an old install.
	exec(t, e, `UPDATE project_build_metrics SET queued_at = NULL`)

	cli(t, e, "rebuild")
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT build_id, queued_at FROM project_build_metrics`)
	if err != nil {
		t.Fatal(err)
	}
	var id string
	var at *time.Time
	n := 0
	if _, err := pgx.ForEachRow(rows, []any{&id, &at}, func() error {
		n++
		if want, ok := queued[id]; !ok || at == nil || !at.Equal(want) {
			t.Errorf("build %s queued_at = %v; want %v", id, at, want)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Fatal("no metrics rows")
	}
}
