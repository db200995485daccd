package emitter

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/testenv"
)

// startJetStream starts an embedded NATS server with JetStream (a real
// server, its store in a temporary directory) and connects to it.
func startJetStream(t *testing.T) jetstream.JetStream {
	t.Helper()
	_, js := testenv.JetStream(t)
	return js
}

func ensureStream(t *testing.T, js jetstream.JetStream) jetstream.Stream {
	t.Helper()
	s, err := natsjs.EnsureStream(context.Background(), js, "BUILDS", "builds", 1)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func msgCount(t *testing.T, s jetstream.Stream) uint64 {
	t.Helper()
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatalf("stream info: %v", err)
	}
	return info.State.Msgs
}

// stored reads message seq back and decodes it with the projector's rules.
func stored(t *testing.T, s jetstream.Stream, seq uint64) (*jetstream.RawStreamMsg, events.Event) {
	t.Helper()
	m, err := s.GetMsg(context.Background(), seq)
	if err != nil {
		t.Fatalf("GetMsg(%d) = %v", seq, err)
	}
	ev, err := events.Decode("builds", m.Subject, m.Data, m.Time)
	if err != nil {
		t.Fatalf("Decode(%q, %q) = %v; want nil", m.Subject, m.Data, err)
	}
	return m, ev
}

func str(s string) *string { return &s }
func i64(n int64) *int64   { return &n }

func TestLifecycleSteps(t *testing.T) {
	js := startJetStream(t)
	s := ensureStream(t, js)
	p := New(js, Options{})
	ctx := context.Background()
	at := time.Now().Add(-time.Minute).UTC().Truncate(time.Millisecond)

	tests := []struct {
		name    string
		publish func() (uint64, error)
		kind    events.Kind
		at      time.Time // zero: about now
		data    events.Data
	}{
		{"queued", func() (uint64, error) { return p.Queued(ctx, "p-1", "b-1", at) }, events.KindQueued, at, events.Data{}},
		{"started", func() (uint64, error) { return p.Started(ctx, "p-1", "b-1", at, "nextjs") },
			events.KindStarted, at, events.Data{Framework: str("nextjs")}},
		{"started without framework, now", func() (uint64, error) { return p.Started(ctx, "p-1", "b-2", time.Time{}, "") },
			events.KindStarted, time.Time{}, events.Data{}},
		{"metrics", func() (uint64, error) {
			return p.MetricsRecorded(ctx, "p-1", "b-1", at, Metrics{Framework: "vite", NodeVersion: "22.11.0", PackageManager: "pnpm", Attempt: 2})
		}, events.KindMetricsRecorded, at, events.Data{Framework: str("vite"), NodeVersion: str("22.11.0"), PackageManager: str("pnpm"), Attempt: i64(2)}},
		{"metrics, all absent", func() (uint64, error) { return p.MetricsRecorded(ctx, "p-1", "b-2", at, Metrics{}) },
			events.KindMetricsRecorded, at, events.Data{}},
		{"completed", func() (uint64, error) {
			return p.Completed(ctx, "p-1", "b-1", at, Completion{Outcome: events.OutcomeFailed, DurationMS: i64(1234), Error: "exit 1"})
		}, events.KindCompleted, at, events.Data{Outcome: events.OutcomeFailed, DurationMS: i64(1234), Error: str("exit 1")}},
		{"completed, canceled", func() (uint64, error) {
			return p.Completed(ctx, "p-1", "b-2", at, Completion{Outcome: events.OutcomeCanceled})
		}, events.KindCompleted, at, events.Data{Outcome: events.OutcomeCanceled}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := time.Now()
			seq, err := tt.publish()
			if err != nil {
				t.Fatalf("publish %s = %v; want nil", tt.name, err)
			}
			m, ev := stored(t, s, seq)
			if want := "builds.p-1." + string(tt.kind); m.Subject != want {
				t.Errorf("subject = %q; want %q", m.Subject, want)
			}
			if got := m.Header.Get(jetstream.MsgIDHeader); got == "" || got != ev.ID {
				t.Errorf("Nats-Msg-Id = %q; want the event id %q", got, ev.ID)
			}
			if ev.Kind() != tt.kind || ev.ProjectID != "p-1" {
				t.Errorf("stored event = %+v; want a %s event of p-1", ev, tt.kind)
			}
			if !reflect.DeepEqual(ev.Data, tt.data) {
				t.Errorf("stored data = %+v; want %+v", ev.Data, tt.data)
			}
			switch {
			case !tt.at.IsZero() && !ev.OccurredAt.Equal(tt.at):
				t.Errorf("occurred_at = %s; want %s", ev.OccurredAt, tt.at)
			case tt.at.IsZero() && (ev.OccurredAt.Before(before.Truncate(time.Microsecond)) || ev.OccurredAt.After(time.Now())):
				t.Errorf("occurred_at = %s; want about now (%s)", ev.OccurredAt, before)
			}
		})
	}
}

func TestPublishRefusesInvalidInput(t *testing.T) {
	js := startJetStream(t)
	s := ensureStream(t, js)
	p := New(js, Options{})
	ctx := context.Background()
	now := time.Now()
	valid := events.New(events.KindStarted, "p-1", "b-1", now, events.Data{})
	with := func(f func(*events.Event)) events.Event { ev := valid; f(&ev); return ev }

	tests := []struct {
		name    string
		publish func() (uint64, error)
		want    events.Reason
	}{
		{"project id with a dot", func() (uint64, error) { return p.Queued(ctx, "p.1", "b-1", now) }, events.ReasonInvalidProjectID},
		{"project id with a wildcard", func() (uint64, error) { return p.Queued(ctx, "p*", "b-1", now) }, events.ReasonInvalidProjectID},
		{"empty project id", func() (uint64, error) { return p.Queued(ctx, "", "b-1", now) }, events.ReasonInvalidProjectID},
		{"empty build id", func() (uint64, error) { return p.Started(ctx, "p-1", "", now, "") }, events.ReasonInvalidBuildID},
		{"build id too long", func() (uint64, error) { return p.Started(ctx, "p-1", strings.Repeat("b", 129), now, "") }, events.ReasonInvalidBuildID},
		{"in the future", func() (uint64, error) { return p.Queued(ctx, "p-1", "b-1", now.Add(2*time.Hour)) }, events.ReasonOccurredInFuture},
		{"attempt 0 is absent, -1 is invalid", func() (uint64, error) {
			return p.MetricsRecorded(ctx, "p-1", "b-1", now, Metrics{Attempt: -1})
		}, events.ReasonInvalidData},
		{"no outcome", func() (uint64, error) { return p.Completed(ctx, "p-1", "b-1", now, Completion{}) }, events.ReasonInvalidData},
		{"NUL in framework", func() (uint64, error) { return p.Started(ctx, "p-1", "b-1", now, "next\x00js") }, events.ReasonInvalidData},
		{"NUL in error", func() (uint64, error) {
			return p.Completed(ctx, "p-1", "b-1", now, Completion{Outcome: events.OutcomeFailed, Error: "exit\x001"})
		}, events.ReasonInvalidData},
		{"unknown outcome", func() (uint64, error) {
			return p.Completed(ctx, "p-1", "b-1", now, Completion{Outcome: "deployed"})
		}, events.ReasonInvalidData},
		{"negative duration", func() (uint64, error) {
			return p.Completed(ctx, "p-1", "b-1", now, Completion{Outcome: events.OutcomeSucceeded, DurationMS: i64(-1)})
		}, events.ReasonInvalidData},
		{"body too large", func() (uint64, error) {
			return p.Completed(ctx, "p-1", "b-1", now, Completion{Outcome: events.OutcomeFailed, Error: strings.Repeat("x", events.MaxBodySize)})
		}, events.ReasonBodyTooLarge},
		{"no occurred_at", func() (uint64, error) {
			return p.Publish(ctx, with(func(e *events.Event) { e.OccurredAt = time.Time{} }))
		},
			events.ReasonInvalidOccurredAt},
		{"no id", func() (uint64, error) { return p.Publish(ctx, with(func(e *events.Event) { e.ID = "" })) }, events.ReasonInvalidID},
		{"spec version 2", func() (uint64, error) { return p.Publish(ctx, with(func(e *events.Event) { e.SpecVersion = 2 })) },
			events.ReasonSpecVersion},
		{"unknown type", func() (uint64, error) {
			return p.Publish(ctx, with(func(e *events.Event) { e.Type = "build.deployed" }))
		},
			events.ReasonUnknownType},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := msgCount(t, s)
			seq, err := tt.publish()
			if !errors.Is(err, events.ErrInvalid) || events.ReasonOf(err) != tt.want {
				t.Fatalf("publish = %d, %v; want an invalid event error with reason %s", seq, err, tt.want)
			}
			var ie *events.InvalidError
			if !errors.As(err, &ie) {
				t.Errorf("error %v does not wrap an *events.InvalidError", err)
			}
			if after := msgCount(t, s); after != before {
				t.Errorf("stream has %d messages after the refused publish; want %d (nothing sent)", after, before)
			}
		})
	}
}

func TestPublishTwiceStoresOnce(t *testing.T) {
	js := startJetStream(t)
	s := ensureStream(t, js)
	p := New(js, Options{})
	ctx := context.Background()
	ev := events.New(events.KindQueued, "p-1", "b-1", time.Now(), events.Data{})

	first, err := p.Publish(ctx, ev)
	if err != nil {
		t.Fatalf("Publish = %v", err)
	}
	second, err := p.Publish(ctx, ev)
	if err != nil {
		t.Fatalf("Publish again = %v", err)
	}
	if second != first {
		t.Errorf("Publish again = seq %d; want the stored copy's %d", second, first)
	}
	if n := msgCount(t, s); n != 1 {
		t.Errorf("stream has %d messages after publishing one event twice; want 1", n)
	}
}

func TestPublishWithoutStream(t *testing.T) {
	js := startJetStream(t)
	p := New(js, Options{Retries: 1, Timeout: time.Second})
	_, err := p.Queued(context.Background(), "p-1", "b-1", time.Time{})
	if !errors.Is(err, ErrNoStream) {
		t.Fatalf("Queued with no stream = %v; want ErrNoStream", err)
	}
	if !strings.Contains(err.Error(), "builds.p-1.queued") {
		t.Errorf("error %q does not name the subject builds.p-1.queued", err)
	}
	if errors.Is(err, events.ErrInvalid) {
		t.Errorf("error %v is an invalid event error; want a transport error", err)
	}
}

// A publisher started before the projector: the first attempts find no
// stream, a retry finds the one created meanwhile.
func TestPublishRetriesUntilTheStreamExists(t *testing.T) {
	js := startJetStream(t)
	p := New(js, Options{Retries: 8})
	ev := events.New(events.KindQueued, "p-1", "b-1", time.Now(), events.Data{})

	done := make(chan error, 1)
	var seq uint64
	go func() {
		var err error
		seq, err = p.Publish(context.Background(), ev)
		done <- err
	}()
	time.Sleep(150 * time.Millisecond)
	s := ensureStream(t, js)
	if err := <-done; err != nil {
		t.Fatalf("Publish = %v; want success once the stream exists", err)
	}
	if m, got := stored(t, s, seq); got.ID != ev.ID || m.Header.Get(jetstream.MsgIDHeader) != ev.ID {
		t.Errorf("stored %s with Nats-Msg-Id %q; want %s", got.ID, m.Header.Get(jetstream.MsgIDHeader), ev.ID)
	}
}

// An attempt whose ack never comes is retried with the same id: a plain
// subscriber swallows the first request (a responder that never answers, as
// a lost ack looks to the publisher), then the stream is created and answers
// the retry.
func TestPublishRetriesATimeoutWithTheSameID(t *testing.T) {
	js := startJetStream(t)
	nc := js.Conn()
	var mu sync.Mutex
	var ids []string
	first := make(chan struct{})
	sub, err := nc.Subscribe("builds.>", func(m *nats.Msg) {
		mu.Lock()
		defer mu.Unlock()
		ids = append(ids, m.Header.Get(jetstream.MsgIDHeader))
		if len(ids) == 1 {
			close(first)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	nc.Flush()

	p := New(js, Options{Timeout: 300 * time.Millisecond, Retries: 3})
	ev := events.New(events.KindStarted, "p-1", "b-1", time.Now(), events.Data{})
	done := make(chan error, 1)
	go func() {
		_, err := p.Publish(context.Background(), ev)
		done <- err
	}()
	<-first
	s := ensureStream(t, js)
	if err := <-done; err != nil {
		t.Fatalf("Publish = %v; want success on a retry", err)
	}
	// The subscriber may see the retry after the stream answered it.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		n := len(ids)
		mu.Unlock()
		if n >= 2 || time.Now().After(deadline) {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ids) < 2 {
		t.Fatalf("saw %d attempts; want a retry after the timeout", len(ids))
	}
	for i, id := range ids {
		if id != ev.ID {
			t.Errorf("attempt %d had Nats-Msg-Id %q; want %q", i+1, id, ev.ID)
		}
	}
	if n := msgCount(t, s); n != 1 {
		t.Errorf("stream has %d messages; want 1", n)
	}
}

func TestPublishStopsWithTheContext(t *testing.T) {
	js := startJetStream(t)
	p := New(js, Options{Retries: 100})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := p.Queued(ctx, "p-1", "b-1", time.Time{})
	if err == nil {
		t.Fatal("Queued with no stream = nil; want an error")
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("Queued returned after %s; want soon after the context ended", took)
	}
}
