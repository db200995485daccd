package emitter

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// validEvent is a valid event body with id id.
func validEvent(id string) string {
	return fmt.Sprintf(`{"spec_version":1,"id":%q,"type":"build.queued","project_id":"p-1","build_id":"b-1","occurred_at":%q}`,
		id, time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano))
}

func TestSignedRequestsOnly(t *testing.T) {
	js := startJetStream(t)
	s := ensureStream(t, js)
	srv := newIngest(t, New(js, Options{}))
	noSecret := httptest.NewServer(NewHandler(New(js, Options{}), HandlerOptions{}))
	defer noSecret.Close()

	body := validEvent("e-auth")
	now := time.Now()
	good := Sign([]byte(testSecret), now, []byte(body))
	ts := strconv.FormatInt(now.Unix(), 10)
	tests := []struct {
		name, url, contentType, signature, body string
		code                                    int
		reason                                  string
	}{
		{"no signature", srv.URL, "application/json", "", body, 401, "unauthenticated"},
		{"no v1", srv.URL, "application/json", "t=" + ts, body, 401, "unauthenticated"},
		{"no t", srv.URL, "application/json", good[strings.Index(good, "v1="):], body, 401, "unauthenticated"},
		{"not key=value", srv.URL, "application/json", "garbage", body, 401, "unauthenticated"},
		{"v1 not hex", srv.URL, "application/json", "t=" + ts + ",v1=zz", body, 401, "unauthenticated"},
		{"t not a number", srv.URL, "application/json", strings.Replace(good, "t="+ts, "t=soon", 1), body, 401, "unauthenticated"},
		{"wrong secret", srv.URL, "application/json", Sign([]byte("another-secret-0123456789"), now, []byte(body)), body, 401, "unauthenticated"},
		{"body changed after signing", srv.URL, "application/json", good, strings.Replace(body, "p-1", "p-2", 1), 401, "unauthenticated"},
		{"t changed after signing", srv.URL, "application/json", strings.Replace(good, "t="+ts, "t="+strconv.FormatInt(now.Unix()-1, 10), 1), body, 401, "unauthenticated"},
		{"replayed after 6 minutes", srv.URL, "application/json", Sign([]byte(testSecret), now.Add(-6*time.Minute), []byte(body)), body, 401, "unauthenticated"},
		{"dated 6 minutes ahead", srv.URL, "application/json", Sign([]byte(testSecret), now.Add(6*time.Minute), []byte(body)), body, 401, "unauthenticated"},
		{"server without a secret", noSecret.URL, "application/json", good, body, 401, "unauthenticated"},
		{"text/plain", srv.URL, "text/plain", good, body, 415, "unsupported_media_type"},
		{"form", srv.URL, "application/x-www-form-urlencoded", good, body, 415, "unsupported_media_type"},
		{"no content type", srv.URL, "", good, body, 415, "unsupported_media_type"},
		{"another charset", srv.URL, "application/json; charset=latin1", good, body, 415, "unsupported_media_type"},
		{"NDJSON to /v1/events", srv.URL, "application/x-ndjson", good, body, 415, "unsupported_media_type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := msgCount(t, s)
			code, got := postWith(t, tt.url+"/v1/events", tt.contentType, tt.signature, tt.body)
			if code != tt.code || got["reason"] != tt.reason || got["error"] == "" {
				t.Errorf("POST %s = %d %v; want %d reason %s", tt.name, code, got, tt.code, tt.reason)
			}
			if after := msgCount(t, s); after != before {
				t.Errorf("stream grew from %d to %d; want nothing published", before, after)
			}
		})
	}
	// The batch endpoint refuses the same way.
	for _, tt := range []struct {
		name, contentType, signature string
		code                         int
	}{
		{"batch without signature", "application/x-ndjson", "", 401},
		{"batch with a wrong signature", "application/x-ndjson", Sign([]byte("another-secret-0123456789"), now, []byte(body)), 401},
		{"batch as JSON", "application/json", good, 415},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, got := postWith(t, srv.URL+"/v1/events/batch", tt.contentType, tt.signature, body)
			if code != tt.code {
				t.Errorf("POST %s = %d %v; want %d", tt.name, code, got, tt.code)
			}
		})
	}
	// And accepts a good signature, with a charset or not, or several v1.
	for i, tt := range []struct{ contentType, signature string }{
		{"application/json", good},
		{"application/json; charset=utf-8", good},
		{"Application/JSON;charset=UTF-8", good},
		{"application/json", good + ",v1=" + strings.Repeat("0", 64)},
		{"application/json", "t=" + ts + ",v1=" + strings.Repeat("0", 64) + "," + good[strings.Index(good, "v1="):]},
		{"application/json", Sign([]byte(testSecret), now.Add(-4*time.Minute), []byte(body))},
	} {
		t.Run(fmt.Sprintf("accepted %d %s", i, tt.contentType), func(t *testing.T) {
			code, got := postWith(t, srv.URL+"/v1/events", tt.contentType, tt.signature, body)
			if code != http.StatusAccepted || got["id"] != "e-auth" {
				t.Errorf("POST signed %q as %q = %d %v; want 202", tt.signature, tt.contentType, code, got)
			}
		})
	}
}

func TestSecretRotation(t *testing.T) {
	js := startJetStream(t)
	ensureStream(t, js)
	const oldSecret, newSecret = "old-secret-0123456789abcdef", "new-secret-0123456789abcdef"
	serve := func(secrets ...string) *httptest.Server {
		v, err := NewVerifier(secrets)
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(NewHandler(New(js, Options{}), HandlerOptions{Verifier: v}))
		t.Cleanup(srv.Close)
		return srv
	}
	send := func(srv *httptest.Server, secret, id string) int {
		body := validEvent(id)
		code, _ := postWith(t, srv.URL+"/v1/events", "application/json", Sign([]byte(secret), time.Now(), []byte(body)), body)
		return code
	}
	steps := []struct {
		name    string
		secrets []string
		want    map[string]int
	}{
		{"before: the old secret only", []string{oldSecret}, map[string]int{oldSecret: 202, newSecret: 401}},
		{"during: both", []string{oldSecret, newSecret}, map[string]int{oldSecret: 202, newSecret: 202}},
		{"after: the old one removed", []string{newSecret}, map[string]int{oldSecret: 401, newSecret: 202}},
	}
	for i, st := range steps {
		srv := serve(st.secrets...)
		for secret, want := range st.want {
			if got := send(srv, secret, fmt.Sprintf("e-rot-%d-%s", i, secret[:3])); got != want {
				t.Errorf("%s: POST signed with the %s secret = %d; want %d", st.name, secret[:3], got, want)
			}
		}
	}
}

func TestNewVerifier(t *testing.T) {
	for _, tt := range []struct {
		secrets []string
		want    string
	}{
		{nil, "no HMAC secret"},
		{[]string{"short"}, "at least 16"},
		{[]string{"long-enough-0123456789", "short"}, "secret 2 of 2 is 5 bytes"},
	} {
		if _, err := NewVerifier(tt.secrets); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("NewVerifier(%q) = %v; want an error containing %q", tt.secrets, err, tt.want)
		}
	}
	if got := ParseSecrets(" a , ,b,", ","); len(got) != 2 || got[0] != "a" || got[1] != "b" {
		t.Errorf(`ParseSecrets(" a , ,b,", ",") = %q; want [a b]`, got)
	}
	if got := ParseSecrets("# rotated 2026-11\nold\n\n new \n", "\n"); len(got) != 2 || got[0] != "old" || got[1] != "new" {
		t.Errorf("ParseSecrets(file) = %q; want [old new]", got)
	}
}

func TestBatch(t *testing.T) {
	js := startJetStream(t)
	s := ensureStream(t, js)
	srv := newIngest(t, New(js, Options{}))
	sign := func(body string) string { return Sign([]byte(testSecret), time.Now(), []byte(body)) }
	future := strings.Replace(validEvent("e-b-future"), time.Now().Add(-time.Minute).UTC().Format("2006-01-02T15"),
		time.Now().Add(3*time.Hour).UTC().Format("2006-01-02T15"), 1)
	lines := []string{
		validEvent("e-b-1"),
		`{"spec_version":1,"type":`,                           // truncated
		strings.Replace(validEvent("e-b-x"), "p-1", "p.1", 1), // bad project id
		validEvent("e-b-2") + "\r",                            // CRLF line ending
		"",                                                    // blank line
		future,
		validEvent("e-b-1"), // a duplicate of line 0
		strings.Replace(validEvent(""), `"id":"",`, "", 1), // no id: one is generated
	}
	want := []struct {
		id     string
		reason string
	}{
		{"e-b-1", ""}, {"", "malformed_json"}, {"", "invalid_project_id"}, {"e-b-2", ""}, {"", "malformed_json"},
		{"", "occurred_in_future"}, {"e-b-1", ""}, {"*", ""},
	}
	body := strings.Join(lines, "\n") + "\n"
	req, _ := http.NewRequest("POST", srv.URL+"/v1/events/batch", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/x-ndjson")
	req.Header.Set(SignatureHeader, sign(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var got BatchResponse
	decodeErr := jsonDecode(resp, &got)
	if resp.StatusCode != http.StatusOK || decodeErr != nil || len(got.Results) != len(want) {
		t.Fatalf("POST batch = %d %+v (%v); want 200 with %d results", resp.StatusCode, got, decodeErr, len(want))
	}
	for i, w := range want {
		r := got.Results[i]
		switch {
		case w.reason != "":
			if string(r.Reason) != w.reason || r.Error == "" || r.Seq != 0 || r.ID != "" {
				t.Errorf("line %d: %+v; want refused with reason %s", i, r, w.reason)
			}
		case r.Seq == 0 || r.Error != "" || (w.id != "*" && r.ID != w.id) || r.ID == "":
			t.Errorf("line %d: %+v; want stored with id %s", i, r, w.id)
		default:
			if m, _ := stored(t, s, r.Seq); m.Header.Get(jetstream.MsgIDHeader) != r.ID {
				t.Errorf("line %d: stored seq %d has Nats-Msg-Id %q; want %q", i, r.Seq, m.Header.Get(jetstream.MsgIDHeader), r.ID)
			}
		}
	}
	if got.Results[6].Seq != got.Results[0].Seq || !got.Results[6].Duplicate && !got.Results[0].Duplicate {
		t.Errorf("lines 0 and 6 (one id) = %+v, %+v; want one stored copy, one duplicate", got.Results[0], got.Results[6])
	}
	if n := msgCount(t, s); n != 3 {
		t.Errorf("stream has %d messages; want 3 (e-b-1, e-b-2, the generated id): nothing for a refused line", n)
	}

	// The limits refuse the whole batch, publishing nothing.
	tooMany := strings.Repeat(validEvent("e-many")+"\n", MaxBatchLines+1)
	tooBig := strings.Repeat(strings.Repeat(" ", 60<<10)+"\n", MaxBatchBytes/(60<<10)+1)
	for _, tt := range []struct {
		name, body string
		code       int
		reason     string
	}{
		{"1001 lines", tooMany, 413, "too_many_lines"},
		{"over 4 MiB", tooBig, 413, "body_too_large"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := msgCount(t, s)
			code, got := postWith(t, srv.URL+"/v1/events/batch", "application/x-ndjson", sign(tt.body), tt.body)
			if code != tt.code || got["reason"] != tt.reason {
				t.Errorf("POST batch of %s = %d %v; want %d %s", tt.name, code, got, tt.code, tt.reason)
			}
			if after := msgCount(t, s); after != before {
				t.Errorf("stream grew from %d to %d; want nothing published", before, after)
			}
		})
	}
	t.Run("exactly 1000 lines", func(t *testing.T) {
		var b strings.Builder
		for i := range MaxBatchLines {
			b.WriteString(validEvent(fmt.Sprintf("e-k-%d", i)) + "\n")
		}
		code, got := postWith(t, srv.URL+"/v1/events/batch", "application/x-ndjson", sign(b.String()), b.String())
		if results, _ := got["results"].([]any); code != http.StatusOK || len(results) != MaxBatchLines {
			t.Errorf("POST batch of 1000 lines = %d with %d results; want 200 with 1000", code, len(results))
		}
	})
}
