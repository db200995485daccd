package events

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"time"

	"github.com/go-json-experiment/json/jsontext"
)

// TimeOut is a build whose worker has not reported for too long: queued
// with no start, or started with no completion.
type TimeOut struct {
	ProjectID string
	BuildID   string
	Started   bool          // it started (and never completed); else it was queued and never started
	Since     time.Time     // occurred_at of the step it has waited on since
	After     time.Duration // how long it may wait (the threshold that was passed)
}

// TimeOutIDPrefix starts the id of every time-out completion.
const TimeOutIDPrefix = "timeout-"

// Event is the build.completed event that ends t through the log: outcome
// failed for a build that started, canceled for one that never did;
// data.error says why; data.timed_out is true, so any completion the
// worker sends, however late, wins over it. Every field is a function of t
// (occurred_at is Since+After, not the time it was computed), and the id is
// a hash of all of t, so the same time-out computed twice, or by two
// processes, is one event with one content: JetStream drops the second
// copy inside its duplicate window (Nats-Msg-Id), the projector's applied
// ids beyond it.
func (t TimeOut) Event() Event {
	since := t.Since.UTC().Truncate(time.Microsecond)
	d := Data{Outcome: OutcomeCanceled, TimedOut: true}
	why := "timed out: no start " + shortDuration(t.After) + " after queued"
	if t.Started {
		d.Outcome = OutcomeFailed
		why = "timed out: no completion " + shortDuration(t.After) + " after start"
	}
	d.Error = &why
	h := sha256.New()
	state := "queued"
	if t.Started {
		state = "started"
	}
	for _, s := range []string{t.ProjectID, t.BuildID, state, since.Format(time.RFC3339Nano), t.After.String()} {
		h.Write(append([]byte(s), 0xff)) // 0xff never occurs in UTF-8: the fields cannot run together
	}
	return Event{
		SpecVersion: SpecVersion,
		ID:          TimeOutIDPrefix + hex.EncodeToString(h.Sum(nil)[:16]),
		Type:        KindCompleted.Type(),
		ProjectID:   t.ProjectID,
		BuildID:     t.BuildID,
		OccurredAt:  since.Add(t.After),
		Data:        d,
	}
}

// shortDuration is d without zero trailing units: "3h", "1h30m", "90s".
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// jsonBool is a boolean member as encoding/json read it into a bool:
// absent and null leave it false; a value of another JSON type is recorded
// as wrong (see jsonString).
type jsonBool struct {
	v   bool
	bad string
}

// UnmarshalJSONFrom implements json.UnmarshalerFrom.
func (b *jsonBool) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	*b = jsonBool{}
	switch k := dec.PeekKind(); k {
	case jsontext.KindNull:
		_, err := dec.ReadToken()
		return err
	case jsontext.KindTrue, jsontext.KindFalse:
		tok, err := dec.ReadToken()
		if err != nil {
			return err
		}
		b.v = tok.Bool()
		return nil
	default:
		b.bad = kindName(k)
	}
	return dec.SkipValue()
}

func (b *jsonBool) typeError() string { return unmarshalTypeError(b.bad, "bool") }
