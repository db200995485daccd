package events_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
)

func TestDecodeTimedOut(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		kind events.Kind
		data map[string]any
		want bool   // data.timed_out after decoding
		bad  string // "" if accepted, else a part of the refusal's detail
	}{
		{name: "true", kind: events.KindCompleted, data: map[string]any{"outcome": "failed", "timed_out": true}, want: true},
		{name: "false", kind: events.KindCompleted, data: map[string]any{"outcome": "failed", "timed_out": false}},
		{name: "null", kind: events.KindCompleted, data: map[string]any{"outcome": "failed", "timed_out": nil}},
		{name: "absent", kind: events.KindCompleted, data: map[string]any{"outcome": "failed"}},
		{name: "string", kind: events.KindCompleted, data: map[string]any{"outcome": "failed", "timed_out": "true"}, bad: "timed_out"},
		{name: "number", kind: events.KindCompleted, data: map[string]any{"outcome": "failed", "timed_out": 1}, bad: "timed_out"},
		// Fields of other kinds are ignored, this one too.
		{name: "on started", kind: events.KindStarted, data: map[string]any{"timed_out": true}},
		{name: "on started, wrong type", kind: events.KindStarted, data: map[string]any{"timed_out": "x"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ev, err := events.Decode("builds", subject(tc.kind), kindBody(t, tc.kind, tc.data), storedAt)
			if tc.bad != "" {
				var ie *events.InvalidError
				if !errors.As(err, &ie) || ie.Reason != events.ReasonInvalidData || !strings.Contains(ie.Detail, tc.bad) {
					t.Fatalf("Decode(%v) = %v; want invalid_data naming %s", tc.data, err, tc.bad)
				}
				return
			}
			if err != nil {
				t.Fatalf("Decode(%v) = %v; want nil", tc.data, err)
			}
			if ev.Data.TimedOut != tc.want {
				t.Errorf("Decode(%v).Data.TimedOut = %v; want %v", tc.data, ev.Data.TimedOut, tc.want)
			}
		})
	}
}

func TestValidateTimedOutOnlyOnCompleted(t *testing.T) {
	t.Parallel()
	at := storedAt.Add(-time.Hour)
	for _, k := range events.Kinds {
		d := events.Data{TimedOut: true}
		if k == events.KindCompleted {
			d.Outcome = events.OutcomeFailed
		}
		err := events.Validate(events.New(k, "p", "b", at, d), storedAt)
		if k == events.KindCompleted && err != nil {
			t.Errorf("Validate(%s with timed_out) = %v; want nil", k, err)
		}
		if k != events.KindCompleted && events.ReasonOf(err) != events.ReasonInvalidData {
			t.Errorf("Validate(%s with timed_out) = %v; want invalid_data", k, err)
		}
	}
}

func TestTimedOutRoundTripAndDigest(t *testing.T) {
	t.Parallel()
	ev := events.New(events.KindCompleted, "p-42", "b-9001", storedAt.Add(-time.Minute),
		events.Data{Outcome: events.OutcomeCanceled, TimedOut: true})
	body, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(body), `"timed_out":true`) {
		t.Errorf("Marshal = %s; want timed_out true in it", body)
	}
	got, err := events.Decode("builds", subject(events.KindCompleted), body, storedAt)
	if err != nil {
		t.Fatalf("Decode(Marshal) = %v", err)
	}
	if got.Digest() != ev.Digest() || !got.Data.TimedOut {
		t.Errorf("Decode(Marshal(ev)) = %+v; want ev back", got)
	}
	real := ev
	real.Data.TimedOut = false
	if real.Digest() == ev.Digest() {
		t.Error("a time-out and the same completion without timed_out have one digest; want two")
	}
	plain, err := real.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(plain), "timed_out") {
		t.Errorf("Marshal without time-out = %s; want no timed_out member", plain)
	}
}

func TestTimeOutEvent(t *testing.T) {
	t.Parallel()
	since := time.Date(2026, 11, 26, 17, 0, 0, 123456789, time.UTC)
	for _, tc := range []struct {
		to      events.TimeOut
		outcome events.Outcome
		why     string
	}{
		{events.TimeOut{ProjectID: "p", BuildID: "b", Started: true, Since: since, After: 3 * time.Hour},
			events.OutcomeFailed, "timed out: no completion 3h after start"},
		{events.TimeOut{ProjectID: "p", BuildID: "b", Since: since, After: 90 * time.Minute},
			events.OutcomeCanceled, "timed out: no start 1h30m after queued"},
		{events.TimeOut{ProjectID: "p", BuildID: "b", Since: since, After: 45 * time.Second},
			events.OutcomeCanceled, "timed out: no start 45s after queued"},
	} {
		ev := tc.to.Event()
		if err := events.Validate(ev, time.Now()); err != nil {
			t.Errorf("%+v: Validate = %v", tc.to, err)
		}
		wantAt := since.Truncate(time.Microsecond).Add(tc.to.After)
		if ev.Kind() != events.KindCompleted || ev.Data.Outcome != tc.outcome || !ev.Data.TimedOut ||
			ev.Data.Error == nil || *ev.Data.Error != tc.why || !ev.OccurredAt.Equal(wantAt) {
			t.Errorf("%+v.Event() = %+v (error %v); want completed %s, timed out, error %q, at %v",
				tc.to, ev, ev.Data.Error, tc.outcome, tc.why, wantAt)
		}
		if !strings.HasPrefix(ev.ID, events.TimeOutIDPrefix) {
			t.Errorf("id %q lacks the prefix %q", ev.ID, events.TimeOutIDPrefix)
		}
		// Deterministic: computed again (later, elsewhere), the same event.
		again := tc.to
		again.Since = since.In(time.FixedZone("x", 3600))
		if a := again.Event(); a.ID != ev.ID || a.Digest() != ev.Digest() {
			t.Errorf("%+v.Event() twice: ids %s, %s; want one event", tc.to, ev.ID, a.ID)
		}
	}
	// Any change of what the time-out is gives another id.
	base := events.TimeOut{ProjectID: "p", BuildID: "b", Started: true, Since: since, After: time.Hour}
	ids := map[string]bool{base.Event().ID: true}
	for _, v := range []events.TimeOut{
		{ProjectID: "q", BuildID: "b", Started: true, Since: since, After: time.Hour},
		{ProjectID: "p", BuildID: "c", Started: true, Since: since, After: time.Hour},
		{ProjectID: "p", BuildID: "b", Since: since, After: time.Hour},
		{ProjectID: "p", BuildID: "b", Started: true, Since: since.Add(time.Microsecond), After: time.Hour},
		{ProjectID: "p", BuildID: "b", Started: true, Since: since, After: 2 * time.Hour},
	} {
		id := v.Event().ID
		if ids[id] {
			t.Errorf("%+v.Event().ID = %s, already the id of another time-out", v, id)
		}
		ids[id] = true
	}
}
