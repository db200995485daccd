package emitter

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
)

// testSecret is the HMAC secret of the tests' ingest handlers.
const testSecret = "test-secret-0123456789abcdef"

// newIngest serves NewHandler(pub) verifying testSecret.
func newIngest(t *testing.T, pub *Publisher) *httptest.Server {
	t.Helper()
	v, err := NewVerifier([]string{testSecret})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(NewHandler(pub, HandlerOptions{Verifier: v}))
	t.Cleanup(srv.Close)
	return srv
}

// post POSTs body to /v1/events signed with testSecret.
func post(t *testing.T, url, body string) (int, map[string]any) {
	t.Helper()
	return postWith(t, url+"/v1/events", "application/json", Sign([]byte(testSecret), time.Now(), []byte(body)), body)
}

// postWith POSTs body as it is told and decodes the JSON answer.
func postWith(t *testing.T, url, contentType, signature, body string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if signature != "" {
		req.Header.Set(SignatureHeader, signature)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST /v1/events: %v", err)
	}
	defer resp.Body.Close()
	var got map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatalf("POST /v1/events: %d with a body that is not JSON: %v", resp.StatusCode, err)
	}
	return resp.StatusCode, got
}

func TestIngest(t *testing.T) {
	js := startJetStream(t)
	s := ensureStream(t, js)
	srv := newIngest(t, New(js, Options{}))

	at := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano)
	event := func(fields string) string {
		return `{"spec_version":1,"type":"build.started","project_id":"p-42","build_id":"b-9001","occurred_at":"` + at + `"` + fields + `}`
	}

	completed := func(data string) string {
		return strings.Replace(event(`,"id":"x","data":{`+data+`}`), "build.started", "build.completed", 1)
	}
	metrics := func(data string) string {
		return strings.Replace(event(`,"id":"x","data":{`+data+`}`), "build.started", "build.metrics_recorded", 1)
	}

	t.Run("integral floats are integers", func(t *testing.T) {
		body := strings.Replace(completed(`"outcome":"failed","duration_ms":61000.0`), `"id":"x"`, `"id":"e-float"`, 1)
		code, got := post(t, srv.URL, body)
		if code != http.StatusAccepted {
			t.Fatalf("POST %s = %d %v; want 202", body, code, got)
		}
		m, ev := stored(t, s, uint64(got["seq"].(float64)))
		if ev.Data.DurationMS == nil || *ev.Data.DurationMS != 61000 || !strings.Contains(string(m.Data), `"duration_ms":61000}`) {
			t.Errorf("stored %s; want duration_ms 61000, written as an integer", m.Data)
		}
	})

	t.Run("accepted", func(t *testing.T) {
		code, got := post(t, srv.URL, event(`,"id":"e-1","data":{"framework":"nextjs"},"unknown":true`))
		if code != http.StatusAccepted || got["id"] != "e-1" {
			t.Fatalf("POST = %d %v; want 202 with id e-1", code, got)
		}
		m, ev := stored(t, s, uint64(got["seq"].(float64)))
		if m.Subject != "builds.p-42.started" || m.Header.Get(jetstream.MsgIDHeader) != "e-1" || ev.ID != "e-1" {
			t.Errorf("stored %s on %q with Nats-Msg-Id %q; want e-1 on builds.p-42.started", ev.ID, m.Subject, m.Header.Get(jetstream.MsgIDHeader))
		}
		if ev.Data.Framework == nil || *ev.Data.Framework != "nextjs" {
			t.Errorf("stored data = %+v; want framework nextjs", ev.Data)
		}
	})

	t.Run("the same event again", func(t *testing.T) {
		before := msgCount(t, s)
		code, got := post(t, srv.URL, event(`,"id":"e-1","data":{"framework":"nextjs"}`))
		if code != http.StatusAccepted || got["duplicate"] != true {
			t.Fatalf("POST again = %d %v; want 202 marked duplicate", code, got)
		}
		if after := msgCount(t, s); after != before {
			t.Errorf("stream grew from %d to %d messages; want no new message", before, after)
		}
	})

	for _, body := range []string{event(``), event(`,"id":null`)} {
		t.Run("id generated for "+body[len(body)-12:], func(t *testing.T) {
			code, got := post(t, srv.URL, body)
			id, _ := got["id"].(string)
			if code != http.StatusAccepted || id == "" {
				t.Fatalf("POST without id = %d %v; want 202 with a generated id", code, got)
			}
			if m, _ := stored(t, s, uint64(got["seq"].(float64))); m.Header.Get(jetstream.MsgIDHeader) != id {
				t.Errorf("Nats-Msg-Id = %q; want the generated id %q", m.Header.Get(jetstream.MsgIDHeader), id)
			}
		})
	}

	invalid := []struct {
		name string
		body string
		want events.Reason
	}{
		{"truncated JSON", `{"spec_version":1,"type":`, events.ReasonMalformedJSON},
		{"not an object", `[1,2]`, events.ReasonMalformedJSON},
		{"spec version 2", strings.Replace(event(`,"id":"x"`), `"spec_version":1`, `"spec_version":2`, 1), events.ReasonSpecVersion},
		{"unknown type", strings.Replace(event(`,"id":"x"`), "build.started", "build.deployed", 1), events.ReasonUnknownType},
		{"empty id", event(`,"id":""`), events.ReasonInvalidID},
		{"bad project id", strings.Replace(event(`,"id":"x"`), "p-42", "p.42", 1), events.ReasonInvalidProjectID},
		{"bad timestamp", strings.Replace(event(`,"id":"x"`), at, "yesterday", 1), events.ReasonInvalidOccurredAt},
		{"in the future", strings.Replace(event(`,"id":"x"`), at, time.Now().Add(3*time.Hour).UTC().Format(time.RFC3339), 1), events.ReasonOccurredInFuture},
		{"no outcome", strings.Replace(event(`,"id":"x"`), "build.started", "build.completed", 1), events.ReasonInvalidData},
		{"wrong data type", event(`,"id":"x","data":{"framework":7}`), events.ReasonInvalidData},
		{"not UTF-8", event(`,"id":"x","data":{"framework":"` + "\xff" + `"}`), events.ReasonNotUTF8},
		{"NUL in framework", event(`,"id":"x","data":{"framework":"next\u0000js"}`), events.ReasonInvalidData},
		// What the projector would drop, a publisher may not send.
		{"negative duration", completed(`"outcome":"failed","duration_ms":-1500`), events.ReasonInvalidData},
		{"negative integral-float duration", completed(`"outcome":"failed","duration_ms":-1500.0`), events.ReasonInvalidData},
		{"attempt 0", metrics(`"attempt":0`), events.ReasonInvalidData},
		{"attempt 1.5", metrics(`"attempt":1.5`), events.ReasonInvalidData},
		{"attempt 1e400", metrics(`"attempt":1e400`), events.ReasonInvalidData},
	}
	for _, tt := range invalid {
		t.Run(tt.name, func(t *testing.T) {
			before := msgCount(t, s)
			code, got := post(t, srv.URL, tt.body)
			if code != http.StatusBadRequest || got["reason"] != string(tt.want) || got["error"] == "" {
				t.Errorf("POST %q = %d %v; want 400 with reason %s", tt.body, code, got, tt.want)
			}
			if msg, _ := got["error"].(string); strings.Contains(msg, "Go value") || strings.Contains(msg, "json.RawMessage") {
				t.Errorf("POST %q: error %q names a Go type", tt.body, msg)
			}
			if after := msgCount(t, s); after != before {
				t.Errorf("stream grew from %d to %d messages; want nothing sent", before, after)
			}
		})
	}

	t.Run("too large", func(t *testing.T) {
		body := event(`,"id":"x","data":{"framework":"` + strings.Repeat("x", events.MaxBodySize) + `"}`)
		code, got := post(t, srv.URL, body)
		if code != http.StatusRequestEntityTooLarge || got["reason"] != string(events.ReasonBodyTooLarge) {
			t.Errorf("POST of %d bytes = %d %v; want 413 body_too_large", len(body), code, got)
		}
	})

	for _, tt := range []struct {
		method, path string
		want         int
	}{
		{"GET", "/healthz", http.StatusOK},
		{"GET", "/readyz", http.StatusOK},
		{"GET", "/v1/events", http.StatusMethodNotAllowed},
		{"GET", "/nope", http.StatusNotFound},
	} {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, srv.URL+tt.path, nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("%s %s = %d; want %d", tt.method, tt.path, resp.StatusCode, tt.want)
			}
		})
	}
}

func TestIngestWithoutStream(t *testing.T) {
	js := startJetStream(t)
	srv := newIngest(t, New(js, Options{Retries: -1}))
	body := fmt.Sprintf(`{"spec_version":1,"id":"e-1","type":"build.queued","project_id":"p-1","build_id":"b-1","occurred_at":%q}`,
		time.Now().UTC().Format(time.RFC3339Nano))
	code, got := post(t, srv.URL, body)
	if code != http.StatusServiceUnavailable || got["reason"] != string(ReasonUnavailable) || !strings.Contains(fmt.Sprint(got["error"]), "no JetStream stream") {
		t.Errorf("POST with no stream = %d %v; want 503 naming the missing stream", code, got)
	}
}

func jsonDecode(resp *http.Response, v any) error {
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(v)
}
