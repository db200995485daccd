package events_test

import (
	"bytes"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
)

// FuzzDecode checks that Decode never panics and that whatever it accepts
// survives its canonical encoding: Marshal gives a body that Decode accepts
// again, as the same event. The seed corpus is testdata/fuzz/FuzzDecode
// (arguments: subject string, body []byte); run with
//
//	go test ./internal/events -run '^$' -fuzz FuzzDecode -fuzztime 30s
func FuzzDecode(f *testing.F) {
	stored := time.Date(2026, 11, 26, 20, 30, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, subject string, body []byte) {
		ev, err := events.Decode("builds", subject, body, stored)
		if err != nil {
			if events.ReasonOf(err) == "" {
				t.Fatalf("Decode(%q, %q) = %v; want an *InvalidError with a reason", subject, body, err)
			}
			return
		}
		if err := events.Validate(ev, stored); err != nil {
			t.Fatalf("Decode(%q, %q) accepted %+v, but Validate = %v", subject, body, ev, err)
		}
		if ev.OccurredAt.Nanosecond()%1000 != 0 {
			t.Fatalf("Decode(%q) occurred_at = %v; want microsecond precision", body, ev.OccurredAt)
		}
		canon, err := ev.Marshal()
		if err != nil {
			t.Fatalf("Marshal(Decode(%q, %q)) = %v; want the canonical body", subject, body, err)
		}
		again, err := events.Decode("builds", subject, canon, stored)
		if err != nil {
			t.Fatalf("Decode(Marshal(Decode(%q, %q))) = %v; want %+v", subject, body, err, ev)
		}
		if again.Digest() != ev.Digest() {
			t.Fatalf("Decode(%q) = %+v; want %+v (same digest)", canon, again, ev)
		}
		if b, _ := again.Marshal(); !bytes.Equal(b, canon) {
			t.Fatalf("Marshal is not canonical: %q then %q", canon, b)
		}
	})
}
