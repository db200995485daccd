package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

type env struct {
	dbURL, natsURL string
	js             jetstream.JetStream
}

func (e env) getenv(k string) string {
	return map[string]string{"DATABASE_URL": e.dbURL, "NATS_URL": e.natsURL, "PROJECTOR_HTTP_ADDR": "127.0.0.1:0"}[k]
}

func newEnv(t *testing.T) env {
	t.Helper()
	natsURL, js := testenv.JetStream(t)
	if _, err := natsjs.EnsureStream(context.Background(), js, "BUILDS", "builds", 1); err != nil {
		t.Fatal(err)
	}
	return env{dbURL: testenv.Database(t), natsURL: natsURL, js: js}
}

func publish(t *testing.T, js jetstream.JetStream, ev events.Event) {
	t.Helper()
	body, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(context.Background(), events.Subject("builds", ev.ProjectID, ev.Kind()), body, jetstream.WithMsgID(ev.ID)); err != nil {
		t.Fatal(err)
	}
}

// cli runs the command in-process and returns its stdout.
func cli(t *testing.T, e env, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	if err := run(context.Background(), append([]string{"projector"}, args...), e.getenv, &out, &errb); err != nil {
		t.Fatalf("projector %s: %v\n%s", strings.Join(args, " "), err, errb.String())
	}
	// A normal close logs no warning (the NATS client's own Close is not a disconnect).
	if strings.Contains(errb.String(), "nats disconnected") {
		t.Errorf("projector %s logged a disconnect on its normal close:\n%s", strings.Join(args, " "), errb.String())
	}
	return out.String()
}

func TestRunEndToEnd(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	t0 := time.Now().Add(-10 * time.Minute).UTC()
	fw := "astro"
	evs := []events.Event{
		events.New(events.KindCompleted, "p-1", "b-1", t0.Add(3*time.Second), events.Data{Outcome: events.OutcomeFailed}),
		events.New(events.KindMetricsRecorded, "p-1", "b-1", t0.Add(2*time.Second), events.Data{Framework: &fw}),
		events.New(events.KindStarted, "p-1", "b-1", t0.Add(time.Second), events.Data{}),
		events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{}),
	}
	for _, ev := range evs {
		publish(t, e.js, ev)
	}
	// One poison message in the middle: it must not block the one behind it.
	if _, err := e.js.Publish(context.Background(), "builds.p-2.queued", []byte(`{"spec_version":1,`)); err != nil {
		t.Fatal(err)
	}
	publish(t, e.js, events.New(events.KindQueued, "p-2", "b-2", t0, events.Data{}))

	ctx, cancel := context.WithCancel(context.Background())
	logs := &testenv.SyncBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"projector", "run"}, e.getenv, io.Discard, logs) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run = %v; want nil after stop\n%s", err, logs.String())
		}
	}()

	deadline := time.Now().Add(20 * time.Second)
	var status struct {
		Project struct {
			BuildStatus    string  `json:"build_status"`
			CurrentBuildID *string `json:"current_build_id"`
			Framework      *string `json:"framework"`
		} `json:"project"`
	}
	for {
		var out, errb bytes.Buffer
		err := run(context.Background(), []string{"projector", "status", "p-2", "--json"}, e.getenv, &out, &errb)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("p-2 never appeared: %v\nlogs:\n%s", err, logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := json.Unmarshal([]byte(cli(t, e, "status", "p-1", "--json")), &status); err != nil {
		t.Fatal(err)
	}
	if status.Project.BuildStatus != "failed" || status.Project.CurrentBuildID == nil || *status.Project.CurrentBuildID != "b-1" ||
		status.Project.Framework == nil || *status.Project.Framework != fw {
		t.Errorf("status p-1 = %+v; want failed, current b-1, framework %s", status.Project, fw)
	}
	human := cli(t, e, "status", "p-1")
	for _, want := range []string{"failed", "b-1", "astro"} {
		if !strings.Contains(human, want) {
			t.Errorf("status p-1 output lacks %q:\n%s", want, human)
		}
	}
	dl := cli(t, e, "dead-letters")
	var got []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(dl), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("dead-letters line %q: %v", line, err)
		}
		got = append(got, m)
	}
	if len(got) != 1 || got[0]["reason"] != string(events.ReasonMalformedJSON) || got[0]["subject"] != "builds.p-2.queued" || got[0]["stream_seq"] != float64(5) {
		t.Errorf("dead-letters = %v; want one malformed_json at seq 5", got)
	}
	if !strings.Contains(logs.String(), `"projector consuming"`) {
		t.Errorf("logs are not JSON with the start message:\n%s", logs.String())
	}
	addr := httpAddr(t, logs.String())
	for path, want := range map[string]string{
		"/healthz": "ok",
		"/readyz":  "ready",
		"/metrics": "buildstate_events_dead_lettered_total 1",
	} {
		body := get(t, "http://"+addr+path)
		if !strings.Contains(body, want) {
			t.Errorf("GET %s = %q; want it to contain %q", path, body, want)
		}
	}
	metrics := get(t, "http://"+addr+"/metrics")
	for _, want := range []string{
		"buildstate_events_applied_total 5",
		"buildstate_consumer_lag ",
		// Named in the README for alerts: present at zero before any retry.
		`buildstate_write_retries_total{constraint="projects_build_timing_logical",sqlstate="23514"} 0`,
		`buildstate_write_retries_total{constraint="projects_current_build_fk",sqlstate="23503"} 0`,
		`buildstate_write_retries_total{constraint="",sqlstate="40001"} 0`,
		`buildstate_write_retries_total{constraint="",sqlstate="40P01"} 0`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, metrics)
		}
	}
	if page := get(t, "http://"+addr+"/"); !strings.Contains(page, `data-project="p-1"`) || !strings.Contains(page, `data-project="p-2"`) {
		t.Errorf("GET / does not list p-1 and p-2:\n%s", page)
	}
	body := metrics
	// Present from the start, at zero: nothing here is old enough to be stuck.
	if body := get(t, "http://"+addr+"/metrics"); !strings.Contains(body, `buildstate_builds_stuck{state="queued"} 0`) ||
		!strings.Contains(body, `buildstate_builds_stuck{state="building"} 0`) {
		t.Errorf("/metrics lacks the stuck gauge at zero:\n%s", body)
	}
	for _, want := range []string{`buildstate_fields_dropped_total{field="attempt"} 0`, `buildstate_fields_dropped_total{field="duration_ms"} 0`} {
		if !strings.Contains(body, want) { // there from the start, at zero
			t.Errorf("/metrics lacks %s:\n%s", want, body)
		}
	}
}

// A skewed completion with a negative duration_ms, and a metrics event with
// attempt 0, spelled as Python writes numbers: both steps apply, the
// measurements are NULL, counted and logged once each; a repeat of the
// completion is a duplicate and counted again by nothing.
func TestRunDropsOutOfRangeMeasurements(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	t0 := time.Now().Add(-10 * time.Minute).UTC()
	at := func(d time.Duration) string { return t0.Add(d).Format(time.RFC3339Nano) }
	raw := func(subject, body string) {
		t.Helper()
		if _, err := e.js.Publish(context.Background(), subject, []byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	head := `{"spec_version": 1.0, "project_id": "p-3", "build_id": "b-3", `
	raw("builds.p-3.queued", head+`"id": "q-3", "type": "build.queued", "occurred_at": "`+at(0)+`"}`)
	raw("builds.p-3.started", head+`"id": "s-3", "type": "build.started", "occurred_at": "`+at(2*time.Second)+`"}`)
	raw("builds.p-3.metrics_recorded", head+`"id": "m-3", "type": "build.metrics_recorded", "occurred_at": "`+at(3*time.Second)+
		`", "data": {"attempt": 0.0, "node_version": "22.11.0"}}`)
	completed := head + `"id": "c-3", "type": "build.completed", "occurred_at": "` + at(time.Second) +
		`", "data": {"outcome": "failed", "duration_ms": -1000.0, "error": "exit 1"}}`
	raw("builds.p-3.completed", completed)
	raw("builds.p-3.completed", completed)

	ctx, cancel := context.WithCancel(context.Background())
	logs := &testenv.SyncBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"projector", "run"}, e.getenv, io.Discard, logs) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run = %v; want nil after stop\n%s", err, logs.String())
		}
	}()
	var status struct {
		Project struct {
			BuildStatus string `json:"build_status"`
		} `json:"project"`
		Builds []struct {
			BuildID     string  `json:"build_id"`
			Status      string  `json:"status"`
			DurationMS  *int64  `json:"duration_ms"`
			Attempt     *int64  `json:"attempt"`
			NodeVersion *string `json:"node_version"`
			Error       *string `json:"error"`
		} `json:"recent_builds"`
	}
	addr := ""
	for deadline := time.Now().Add(20 * time.Second); ; {
		if addr == "" && strings.Contains(logs.String(), `"projector consuming"`) {
			addr = httpAddr(t, logs.String())
		}
		if addr != "" && strings.Contains(get(t, "http://"+addr+"/metrics"), "buildstate_events_duplicates_total 1") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the five messages were not all handled\nlogs:\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := json.Unmarshal([]byte(cli(t, e, "status", "p-3", "--json")), &status); err != nil {
		t.Fatal(err)
	}
	if status.Project.BuildStatus != "failed" || len(status.Builds) != 1 {
		t.Fatalf("status p-3 = %+v; want failed with one build", status)
	}
	b := status.Builds[0]
	if b.Status != "failed" || b.DurationMS != nil || b.Attempt != nil || b.NodeVersion == nil || *b.NodeVersion != "22.11.0" ||
		b.Error == nil || *b.Error != "exit 1" {
		t.Errorf("build b-3 = %+v; want failed, duration_ms and attempt NULL, node 22.11.0, error exit 1", b)
	}
	body := get(t, "http://"+addr+"/metrics")
	for _, want := range []string{`buildstate_fields_dropped_total{field="attempt"} 1`, `buildstate_fields_dropped_total{field="duration_ms"} 1`,
		"buildstate_events_applied_total 4", "buildstate_events_dead_lettered_total 0"} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s:\n%s", want, body)
		}
	}
	warned := map[string]string{}
	for _, line := range strings.Split(logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["level"] == "warn" && m["field"] != nil {
			warned[fmt.Sprint(m["id"])] += fmt.Sprintf("%v=%v;", m["field"], m["value"])
		}
	}
	if want := map[string]string{"m-3": "data.attempt=0;", "c-3": "data.duration_ms=-1000;"}; fmt.Sprint(warned) != fmt.Sprint(want) {
		t.Errorf("warnings with a field = %v; want %v (once per event)\nlogs:\n%s", warned, want, logs.String())
	}
}

// httpAddr finds the listener address in the JSON start log line.
func httpAddr(t *testing.T, logs string) string {
	t.Helper()
	for _, line := range strings.Split(logs, "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "projector consuming" {
			return fmt.Sprint(m["http"])
		}
	}
	t.Fatalf("no start line in logs:\n%s", logs)
	return ""
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestDeadLettersFlags: the selectors are exclusive and sequences start at
// 1; both are refused before anything is read or re-driven.
func TestDeadLettersFlags(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"dead-letters", "--seq", "0"},
		{"dead-letters", "retry", "--seq", "0"},
		{"dead-letters", "retry", "--reason", "malformed_json", "--seq", "3"},
		{"dead-letters", "--reason", "malformed_json", "--seq", "3"},
	} {
		var out, errb bytes.Buffer
		// An unreachable database: a command that got as far as reading would fail differently.
		getenv := func(k string) string {
			if k == "DATABASE_URL" {
				return "postgres://nobody@127.0.0.1:1/none?connect_timeout=1"
			}
			return ""
		}
		err := run(context.Background(), append([]string{"projector"}, args...), getenv, &out, &errb)
		if err == nil || strings.Contains(err.Error(), "127.0.0.1") || (!strings.Contains(err.Error(), "exclusive") && !strings.Contains(errb.String()+err.Error(), "start at 1")) {
			t.Errorf("projector %s = %v (stderr %q); want a flag error", strings.Join(args, " "), err, errb.String())
		}
	}
}
