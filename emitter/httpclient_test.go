package emitter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
)

// recording serves h and keeps the bodies it was sent, in order; delay, if
// set, is called before each answer leaves.
type recording struct {
	mu     sync.Mutex
	bodies [][]byte
	delay  func(n int)
}

func (rec *recording) serve(t *testing.T, h http.Handler) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		rec.mu.Lock()
		rec.bodies = append(rec.bodies, body)
		n := len(rec.bodies)
		rec.mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(body))
		out := httptest.NewRecorder()
		h.ServeHTTP(out, r)
		if rec.delay != nil {
			rec.delay(n)
		}
		for k, v := range out.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(out.Code)
		w.Write(out.Body.Bytes())
	}))
	t.Cleanup(srv.Close)
	return srv
}

func (rec *recording) sent() [][]byte {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([][]byte(nil), rec.bodies...)
}

func TestHTTPClient(t *testing.T) {
	js := startJetStream(t)
	s := ensureStream(t, js)
	ingest := newIngest(t, New(js, Options{}))
	c := NewHTTPClient(ingest.URL, testSecret, HTTPOptions{})
	ctx := context.Background()
	at := time.Now().Add(-time.Minute)

	seq, err := c.Started(ctx, "p-7", "b-7", at, "astro")
	if err != nil || seq == 0 {
		t.Fatalf("Started = %d, %v; want a sequence", seq, err)
	}
	if m, ev := stored(t, s, seq); m.Subject != "builds.p-7.started" || ev.Data.Framework == nil || *ev.Data.Framework != "astro" {
		t.Errorf("stored %q %+v; want build.started of p-7 with framework astro", m.Subject, ev.Data)
	}

	t.Run("wrong secret", func(t *testing.T) {
		var rec recording
		srv := rec.serve(t, ingest.Config.Handler)
		_, err := NewHTTPClient(srv.URL, "not-the-secret-0123456789", HTTPOptions{}).Queued(ctx, "p-7", "b-8", at)
		var herr *HTTPError
		if !errors.Is(err, ErrUnauthenticated) || !errors.As(err, &herr) || herr.Reason != ReasonUnauthenticated {
			t.Errorf("Queued with a wrong secret = %v; want ErrUnauthenticated with reason unauthenticated", err)
		}
		if n := len(rec.sent()); n != 1 {
			t.Errorf("%d requests sent; want 1 (a refusal is not retried)", n)
		}
	})

	t.Run("invalid event is not sent", func(t *testing.T) {
		var rec recording
		srv := rec.serve(t, ingest.Config.Handler)
		_, err := NewHTTPClient(srv.URL, testSecret, HTTPOptions{}).Completed(ctx, "p-7", "b-7", at, Completion{Outcome: "deployed"})
		if !errors.Is(err, events.ErrInvalid) || len(rec.sent()) != 0 {
			t.Errorf("Completed(outcome deployed) = %v after %d requests; want ErrInvalid and none", err, len(rec.sent()))
		}
	})

	t.Run("a timed-out request is sent again with the same id", func(t *testing.T) {
		// The first answer comes after the client gave up; the event was
		// stored meanwhile (as when an ack is lost).
		rec := recording{delay: func(n int) {
			if n == 1 {
				time.Sleep(time.Second)
			}
		}}
		srv := rec.serve(t, ingest.Config.Handler)
		before := msgCount(t, s)
		ev := NewQueued("p-7", "b-9", at)
		seq, err := NewHTTPClient(srv.URL, testSecret, HTTPOptions{Timeout: 300 * time.Millisecond}).Publish(ctx, ev)
		sent := rec.sent()
		if err != nil || seq == 0 || len(sent) != 2 || !bytes.Equal(sent[0], sent[1]) {
			t.Fatalf("Publish = %d, %v after %d requests; want a sequence after 2 identical ones", seq, err, len(sent))
		}
		if after := msgCount(t, s); after != before+1 {
			t.Errorf("stream grew from %d to %d; want one message", before, after)
		}
		if m, _ := stored(t, s, seq); m.Header.Get(jetstream.MsgIDHeader) != ev.ID {
			t.Errorf("seq %d has id %q; want %q", seq, m.Header.Get(jetstream.MsgIDHeader), ev.ID)
		}
	})

	t.Run("batches", func(t *testing.T) {
		var rec recording
		srv := rec.serve(t, ingest.Config.Handler)
		var evs []Event
		for i := range 1200 {
			evs = append(evs, NewQueued("p-batch", fmt.Sprintf("b-%d", i), at))
		}
		evs = append(evs, NewQueued("p.bad", "b-1", at), evs[0]) // invalid; a repeat of the first
		before := msgCount(t, s)
		results, err := NewHTTPClient(srv.URL, testSecret, HTTPOptions{}).PublishBatch(ctx, evs)
		if err != nil || len(results) != len(evs) {
			t.Fatalf("PublishBatch = %d results, %v; want %d", len(results), err, len(evs))
		}
		for i, r := range results[:1200] {
			if r.Seq == 0 || r.ID != evs[i].ID {
				t.Fatalf("result %d = %+v; want stored with id %s", i, r, evs[i].ID)
			}
		}
		if r := results[1200]; r.Reason != events.ReasonInvalidProjectID {
			t.Errorf("result of the invalid event = %+v; want invalid_project_id", r)
		}
		if r := results[1201]; r.Seq != results[0].Seq {
			t.Errorf("result of the repeat = %+v; want the first copy's seq %d", r, results[0].Seq)
		}
		if n := len(rec.sent()); n != 2 {
			t.Errorf("%d requests for 1,201 lines to send; want 2 (at most 1,000 lines each)", n)
		}
		if after := msgCount(t, s); after != before+1200 {
			t.Errorf("stream grew by %d; want 1200", after-before)
		}
	})
}
