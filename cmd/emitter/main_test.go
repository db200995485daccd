package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/internal/workload"
)

// startNATS starts an embedded NATS server with JetStream, a real one with
// its store in a temporary directory, and returns its URL and a JetStream
// client to look at it.
func startNATS(t *testing.T) (string, jetstream.JetStream) {
	t.Helper()
	return testenv.JetStream(t)
}

func env(vars ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(vars); i += 2 {
		m[vars[i]] = vars[i+1]
	}
	return func(k string) string { return m[k] }
}

func streamMsgs(t *testing.T, js jetstream.JetStream, name string) uint64 {
	t.Helper()
	s, err := js.Stream(context.Background(), name)
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

func runCmd(t *testing.T, getenv func(string) string, args ...string) (string, string, error) {
	t.Helper()
	var stdout, stderr testenv.SyncBuffer
	err := run(context.Background(), append([]string{"emitter"}, args...), getenv, &stdout, &stderr)
	return stdout.String(), stderr.String(), err
}

func TestPublish(t *testing.T) {
	url, js := startNATS(t)
	s, err := natsjs.EnsureStream(context.Background(), js, "BUILDS", "builds", 1)
	if err != nil {
		t.Fatal(err)
	}
	getenv := env("NATS_URL", url)
	at := time.Now().Add(-time.Minute).UTC().Truncate(time.Second)

	tests := []struct {
		args    []string
		seq     string
		subject string
		data    string // the stored event's data, canonical JSON
	}{
		{[]string{"--type", "queued", "--project", "p-1", "--build", "b-1", "--at", at.Format(time.RFC3339)}, "1", "builds.p-1.queued", `{}`},
		{[]string{"--type", "started", "--project", "p-1", "--build", "b-1", "--data", `{"framework":"nextjs"}`}, "2", "builds.p-1.started", `{"framework":"nextjs"}`},
		{[]string{"--type", "build.metrics_recorded", "--project", "p-1", "--build", "b-1",
			"--data", `{"framework":"nextjs","node_version":"22.11.0","package_manager":"pnpm","attempt":1}`},
			"3", "builds.p-1.metrics_recorded", `{"framework":"nextjs","node_version":"22.11.0","package_manager":"pnpm","attempt":1}`},
		{[]string{"--type", "completed", "--project", "p-1", "--build", "b-1", "--id", "e-done",
			"--data", `{"outcome":"succeeded","duration_ms":61000}`}, "4", "builds.p-1.completed", `{"outcome":"succeeded","duration_ms":61000}`},
		// The same id again, its integer written as Python would: JetStream
		// keeps the first copy, whose sequence is printed.
		{[]string{"--type", "completed", "--project", "p-1", "--build", "b-1", "--id", "e-done",
			"--data", `{"outcome":"succeeded","duration_ms":61000.0}`}, "4", "builds.p-1.completed", `{"outcome":"succeeded","duration_ms":61000}`},
	}
	for _, tt := range tests {
		name := strings.Join(tt.args, " ")
		t.Run(name, func(t *testing.T) {
			stdout, stderr, err := runCmd(t, getenv, append([]string{"publish"}, tt.args...)...)
			if err != nil || stdout != tt.seq+"\n" {
				t.Fatalf("publish %s = %q, %v (stderr %q); want %q", name, stdout, err, stderr, tt.seq+"\n")
			}
			seq, _ := strconv.ParseUint(tt.seq, 10, 64)
			m, err := s.GetMsg(context.Background(), seq)
			if err != nil {
				t.Fatal(err)
			}
			ev, err := events.Decode("builds", m.Subject, m.Data, m.Time)
			if err != nil {
				t.Fatalf("Decode(%q) = %v; want nil", m.Data, err)
			}
			var got struct{ Data json.RawMessage }
			json.Unmarshal(m.Data, &got)
			if m.Subject != tt.subject || string(got.Data) != tt.data || m.Header.Get(jetstream.MsgIDHeader) != ev.ID {
				t.Errorf("stored %q data %s Nats-Msg-Id %q; want %q data %s Nats-Msg-Id %q",
					m.Subject, got.Data, m.Header.Get(jetstream.MsgIDHeader), tt.subject, tt.data, ev.ID)
			}
		})
	}
	if n := streamMsgs(t, js, "BUILDS"); n != 4 {
		t.Errorf("stream has %d messages; want 4", n)
	}
}

func TestPublishRefusesInvalidInput(t *testing.T) {
	url, js := startNATS(t)
	if _, err := natsjs.EnsureStream(context.Background(), js, "BUILDS", "builds", 1); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--type", "started", "--build", "b-1"}, "--project required"},
		{[]string{}, "--type, --project, --build required"},
		{[]string{"--type", "deployed", "--project", "p-1", "--build", "b-1"}, `--type "deployed"`},
		{[]string{"--type", "build.", "--project", "p-1", "--build", "b-1"}, `--type "build."`},
		{[]string{"--type", "queued", "--project", "p.1", "--build", "b-1"}, "invalid event: invalid_project_id"},
		{[]string{"--type", "queued", "--project", "p-1", "--build", strings.Repeat("b", 200)}, "invalid event: invalid_build_id"},
		{[]string{"--type", "queued", "--project", "p-1", "--build", "b-1", "--at", "yesterday"}, `--at "yesterday" is not an RFC 3339 time`},
		{[]string{"--type", "queued", "--project", "p-1", "--build", "b-1", "--at", "2016-12-31T23:59:60Z"},
			`--at "2016-12-31T23:59:60Z" is not an RFC 3339 time`}, // a leap second, as occurred_at refuses it
		{[]string{"--type", "queued", "--project", "p-1", "--build", "b-1", "--at", time.Now().Add(2 * time.Hour).Format(time.RFC3339)},
			"invalid event: occurred_in_future"},
		{[]string{"--type", "completed", "--project", "p-1", "--build", "b-1"}, "invalid event: invalid_data: data.outcome"},
		{[]string{"--type", "completed", "--project", "p-1", "--build", "b-1", "--data", `{"outcome":"deployed"}`}, "invalid event: invalid_data"},
		{[]string{"--type", "completed", "--project", "p-1", "--build", "b-1", "--data", `{"outcome":1}`},
			"--data: invalid_data: data: field outcome: json: cannot unmarshal number"},
		{[]string{"--type", "completed", "--project", "p-1", "--build", "b-1", "--data", `{"outcome":"failed","duration_ms":-5}`},
			"invalid event: invalid_data: data.duration_ms is -5; it must not be negative"},
		{[]string{"--type", "completed", "--project", "p-1", "--build", "b-1", "--data", `{"outcome":"failed","duration_ms":1.5}`},
			"--data: invalid_data: data: field duration_ms: number 1.5 is not an integer"},
		{[]string{"--type", "started", "--project", "p-1", "--build", "b-1", "--data", `{"framework":"a\u0000"}`},
			"invalid event: invalid_data: data.framework contains U+0000"},
		{[]string{"--type", "started", "--project", "p-1", "--build", "b-1", "--data", `{"framwork":"vite"}`},
			`--data: "framwork" is not a field of build.started (it takes only framework)`},
		{[]string{"--type", "queued", "--project", "p-1", "--build", "b-1", "--data", `{"framework":"vite"}`},
			`--data: "framework" is not a field of build.queued (it takes no data)`},
		{[]string{"--type", "started", "--project", "p-1", "--build", "b-1", "--data", `nextjs`}, `--data "nextjs" is not a JSON object`},
		{[]string{"--type", "metrics_recorded", "--project", "p-1", "--build", "b-1", "--data", `{"attempt":0}`}, "invalid event: invalid_data: data.attempt"},
		{[]string{"--type", "queued", "--project", "p-1", "--build", "b-1", "stray"}, `unexpected arguments ["stray"]`},
		{[]string{"--type", "queued", "--project", "p-1", "--build", "b-1", "--nope"}, "flag provided but not defined: -nope"},
	}
	for _, tt := range tests {
		// Against a live server, and against none: input is checked before connecting.
		for _, u := range []string{url, "nats://127.0.0.1:1"} {
			name := strings.Join(tt.args, " ") + " at " + u
			t.Run(name, func(t *testing.T) {
				stdout, _, err := runCmd(t, env("NATS_URL", u), append([]string{"publish"}, tt.args...)...)
				if err == nil || !strings.Contains(err.Error(), tt.want) || stdout != "" {
					t.Errorf("publish %s = %q, %v; want an error containing %q and no output", name, stdout, err, tt.want)
				}
			})
		}
	}
	if n := streamMsgs(t, js, "BUILDS"); n != 0 {
		t.Errorf("stream has %d messages after only invalid input; want 0", n)
	}
}

func TestPublishWithoutStream(t *testing.T) {
	url, _ := startNATS(t)
	_, _, err := runCmd(t, env("NATS_URL", url, "BUILDS_SUBJECT_PREFIX", "ci"), "publish", "--type", "queued", "--project", "p-1", "--build", "b-1")
	want := "no JetStream stream takes the subject ci.p-1.queued: start the projector (it creates the stream)"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("publish with no stream = %v; want an error containing %q", err, want)
	}
}

func TestPublishWithoutServer(t *testing.T) {
	_, _, err := runCmd(t, env("NATS_URL", "nats://127.0.0.1:1"), "publish", "--type", "queued", "--project", "p-1", "--build", "b-1")
	if err == nil || !strings.Contains(err.Error(), "nats: connect nats://127.0.0.1:1") {
		t.Errorf("publish with no server = %v; want a connect error naming the URL", err)
	}
}

// Help is asked for, so it is the command's output: stdout, exit 0.
func TestHelp(t *testing.T) {
	tests := []struct {
		args []string
		want []string
	}{
		{[]string{"--help"}, []string{"publish ", "serve ", "load ", "help "}},
		{[]string{"-h"}, []string{"publish ", "serve ", "load "}},
		{[]string{"help"}, []string{"publish ", "serve ", "load "}},
		{[]string{"help", "publish"}, []string{"-type", "-project", "-data"}},
		{[]string{"publish", "--help"}, []string{"-type", "-build"}},
		{[]string{"serve", "--help"}, []string{"-http-addr"}},
		{[]string{"load", "-h"}, []string{"-seed"}},
	}
	for _, tt := range tests {
		out, errOut, err := runCmd(t, env("NATS_URL", "nats://127.0.0.1:1"), tt.args...)
		if err != nil || errOut != "" {
			t.Errorf("emitter %v = %v, stderr %q; want nil and the help on stdout", tt.args, err, errOut)
		}
		for _, w := range tt.want {
			if !strings.Contains(out, w) {
				t.Errorf("emitter %v output lacks %q:\n%s", tt.args, w, out)
			}
		}
	}
	if _, _, err := runCmd(t, env(), "help", "bogus"); err == nil || !strings.Contains(err.Error(), `unknown command "bogus"`) {
		t.Errorf("emitter help bogus = %v; want unknown command", err)
	}
}

func TestCommands(t *testing.T) {
	tests := []struct {
		args    []string
		wantErr string
	}{
		{nil, "no command given"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"help"}, ""},
		{[]string{"publish", "-h"}, ""},
		{[]string{"load", "--mode", "burst"}, `--mode "burst"`},
		{[]string{"serve", "--log-format", "xml"}, `--log-format "xml"`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, _, err := runCmd(t, env("NATS_URL", "nats://127.0.0.1:1"), tt.args...)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("emitter %v = %v; want error %q", tt.args, err, tt.wantErr)
			}
		})
	}
}

// serveSecret is the HMAC secret the tests give emitter serve.
const serveSecret = "serve-secret-0123456789abcdef"

func TestServe(t *testing.T) {
	url, js := startNATS(t)
	s, err := natsjs.EnsureStream(context.Background(), js, "BUILDS", "builds", 1)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr testenv.SyncBuffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"emitter", "serve", "--http-addr", "127.0.0.1:0"},
			env("NATS_URL", url, "EMITTER_HMAC_SECRETS", serveSecret), &stdout, &stderr)
	}()

	addr := waitForListening(t, &stderr, done)
	base := "http://" + addr
	body := fmt.Sprintf(`{"spec_version":1,"id":"e-1","type":"build.queued","project_id":"p-1","build_id":"b-1","occurred_at":%q}`,
		time.Now().UTC().Format(time.RFC3339Nano))
	req, _ := http.NewRequest("POST", base+"/v1/events", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(emitter.SignatureHeader, emitter.Sign([]byte(serveSecret), time.Now(), []byte(body)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Seq uint64
		ID  string
	}
	json.NewDecoder(resp.Body).Decode(&got)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted || got.Seq != 1 || got.ID != "e-1" {
		t.Errorf("POST /v1/events = %d %+v; want 202 {seq 1, id e-1}", resp.StatusCode, got)
	}
	if m, err := s.GetMsg(context.Background(), 1); err != nil || m.Header.Get(jetstream.MsgIDHeader) != "e-1" {
		t.Errorf("GetMsg(1) = %v, %v; want the event e-1", m, err)
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s = %d; want 200", path, resp.StatusCode)
		}
	}

	cancel() // as SIGTERM does
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("serve after shutdown = %v; want nil", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not stop after its context ended")
	}
	if !strings.Contains(stderr.String(), "shutting down") {
		t.Errorf("serve logs %q; want a shutting down line", stderr.String())
	}
}

// waitForListening reads the serve log for the address it listens on.
func waitForListening(t *testing.T, log *testenv.SyncBuffer, done <-chan error) string {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		sc := bufio.NewScanner(strings.NewReader(log.String()))
		for sc.Scan() {
			var line struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "listening" {
				return line.Addr
			}
		}
		select {
		case err := <-done:
			t.Fatalf("serve returned %v before listening; log %q", err, log.String())
		case <-deadline:
			t.Fatalf("serve did not log its address; log %q", log.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func TestLoad(t *testing.T) {
	start := time.Now().Add(-48 * time.Hour).UTC().Truncate(time.Second)
	cfg := workload.Config{Projects: 30, BuildsPerProject: 2, MaxBuildsPerProject: 4, DupRate: 0.2, Shuffle: true, Start: start}
	want := workload.Generate(7, cfg)
	distinct := len(workload.Natural(want))
	dups := len(want) - distinct
	args := []string{"load", "--seed", "7", "--projects", "30", "--builds-per-project", "2", "--max-builds-per-project", "4",
		"--dup-rate", "0.2", "--start", start.Format(time.RFC3339), "--json"}

	tests := []struct {
		name         string
		extra        []string
		stored       int
		deduplicated int64
	}{
		{"duplicates reach the stream", nil, len(want), 0},
		{"duplicates carry Nats-Msg-Id", []string{"--dedupe-header"}, distinct, int64(dups)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			url, js := startNATS(t)
			stdout, stderr, err := runCmd(t, env("NATS_URL", url, "BUILDS_STREAM", "LOADTEST"), append(args, tt.extra...)...)
			if err != nil {
				t.Fatalf("load = %v; stderr %q", err, stderr)
			}
			var res loadResult
			if err := json.Unmarshal([]byte(stdout), &res); err != nil {
				t.Fatalf("load printed %q: %v", stdout, err)
			}
			if res.Events != len(want) || res.Duplicates != dups || res.Deduplicated != tt.deduplicated || res.EventsPerSec <= 0 {
				t.Errorf("load = %+v; want %d events, %d duplicates, %d deduplicated", res, len(want), dups, tt.deduplicated)
			}
			if n := streamMsgs(t, js, "LOADTEST"); n != uint64(tt.stored) {
				t.Errorf("stream LOADTEST has %d messages; want %d", n, tt.stored)
			}
			// The stream holds the seeded workload: every distinct event, valid.
			s, _ := js.Stream(context.Background(), "LOADTEST")
			ids := map[string][32]byte{}
			for seq := uint64(1); seq <= uint64(tt.stored); seq++ {
				m, err := s.GetMsg(context.Background(), seq)
				if err != nil {
					t.Fatal(err)
				}
				ev, err := events.Decode("builds", m.Subject, m.Data, m.Time)
				if err != nil {
					t.Fatalf("Decode(%q) = %v; want nil", m.Data, err)
				}
				ids[ev.ID] = ev.Digest()
			}
			for _, ev := range want {
				if d, ok := ids[ev.ID]; !ok || d != ev.Digest() {
					t.Fatalf("event %+v of Generate(7, cfg) is not in the stream as generated", ev)
				}
			}
			if len(ids) != distinct {
				t.Fatalf("stream has %d distinct ids; want the workload's %d", len(ids), distinct)
			}
		})
	}
}

func TestLoadAtARate(t *testing.T) {
	url, js := startNATS(t)
	stdout, stderr, err := runCmd(t, env("NATS_URL", url), "load", "--projects", "100", "--mode", "rate", "--rate", "200",
		"--duration", "500ms", "--json")
	if err != nil {
		t.Fatalf("load = %v; stderr %q", err, stderr)
	}
	var res loadResult
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		t.Fatalf("load printed %q: %v", stdout, err)
	}
	// The pacing never runs ahead: at most rate x duration (+1) are sent.
	if res.Events < 1 || res.Events > 101 {
		t.Errorf("load at 200/s for 500ms published %d events; want 1 to 101", res.Events)
	}
	if n := streamMsgs(t, js, "BUILDS"); n != uint64(res.Events) {
		t.Errorf("stream has %d messages; load reported %d", n, res.Events)
	}
	if !strings.Contains(stderr, "stopped after 500ms") {
		t.Errorf("load stderr %q; want a note that it stopped early", stderr)
	}
}
