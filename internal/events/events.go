// Package events is the build lifecycle event contract (spec version 1):
// the types publishers send, how they are encoded, and the rules that make
// one valid. It imports no infrastructure: NATS subjects are plain strings here.
package events

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"strconv"
	"strings"
	"time"

	"github.com/oklog/ulid/v2"
)

// SpecVersion is the only contract version this package reads and writes.
const SpecVersion = 1

// MaxBodySize is the largest encoded event accepted, in bytes.
const MaxBodySize = 64 << 10

// MaxClockSkew is how far occurred_at may lie after the time the log stored the event.
const MaxClockSkew = time.Hour

// Kind is the lifecycle step an event reports; it is also the last subject token.
type Kind string

const (
	KindQueued          Kind = "queued"
	KindStarted         Kind = "started"
	KindMetricsRecorded Kind = "metrics_recorded"
	KindCompleted       Kind = "completed"
)

// Kinds lists every kind in lifecycle order.
var Kinds = []Kind{KindQueued, KindStarted, KindMetricsRecorded, KindCompleted}

// Type is the event's "type" field for this kind, e.g. "build.started".
func (k Kind) Type() string { return "build." + string(k) }

// Valid reports whether k is one of Kinds.
func (k Kind) Valid() bool {
	switch k {
	case KindQueued, KindStarted, KindMetricsRecorded, KindCompleted:
		return true
	}
	return false
}

// KindOfType maps a "type" field value to its Kind.
func KindOfType(t string) (Kind, bool) {
	k := Kind(strings.TrimPrefix(t, "build."))
	if !strings.HasPrefix(t, "build.") || !k.Valid() {
		return "", false
	}
	return k, true
}

// Outcome is how a completed build ended.
type Outcome string

const (
	OutcomeSucceeded Outcome = "succeeded"
	OutcomeFailed    Outcome = "failed"
	OutcomeCanceled  Outcome = "canceled"
)

// Valid reports whether o is one of the three outcomes.
func (o Outcome) Valid() bool {
	return o == OutcomeSucceeded || o == OutcomeFailed || o == OutcomeCanceled
}

// Data carries the kind-specific fields. Only the fields of the event's kind
// are kept (queued: none; started: Framework; metrics_recorded: Framework,
// NodeVersion, PackageManager, Attempt; completed: Outcome, DurationMS, Error,
// TimedOut).
type Data struct {
	Framework      *string `json:"framework,omitempty"`
	NodeVersion    *string `json:"node_version,omitempty"`
	PackageManager *string `json:"package_manager,omitempty"`
	Attempt        *int64  `json:"attempt,omitempty"`
	Outcome        Outcome `json:"outcome,omitempty"`
	DurationMS     *int64  `json:"duration_ms,omitempty"`
	Error          *string `json:"error,omitempty"`
	// TimedOut marks a completion published by a time-out (`projector stuck
	// --time-out`), not by the build's worker: it loses to any completion
	// without it (see fsm's winner rule).
	TimedOut bool `json:"timed_out,omitempty"`
}

// Event is one build lifecycle event.
type Event struct {
	SpecVersion int       `json:"spec_version"`
	ID          string    `json:"id"`
	Type        string    `json:"type"`
	ProjectID   string    `json:"project_id"`
	BuildID     string    `json:"build_id"`
	OccurredAt  time.Time `json:"occurred_at"`
	Data        Data      `json:"data"`

	// Dropped lists the optional measurements Decode left out of Data
	// because their values were out of the contract's range. It is not
	// part of the event's content: Marshal and Digest leave it out.
	Dropped []Drop `json:"-"`
}

// Drop is an optional measurement left out of an event: the field's JSON
// name (data.<Field>) and the value it had.
type Drop struct {
	Field string
	Value int64
}

// Kind is the event's kind, derived from Type ("" if Type is unknown).
func (e Event) Kind() Kind {
	k, _ := KindOfType(e.Type)
	return k
}

// New makes an event of the given kind with a fresh ULID id. The result is
// not validated; call Validate (the emitter does) before publishing it.
func New(kind Kind, projectID, buildID string, at time.Time, data Data) Event {
	return Event{
		SpecVersion: SpecVersion,
		ID:          ulid.Make().String(),
		Type:        kind.Type(),
		ProjectID:   projectID,
		BuildID:     buildID,
		OccurredAt:  at.UTC().Truncate(time.Microsecond),
		Data:        data,
	}
}

// Subject is the NATS subject an event is published on: <prefix>.<project_id>.<kind>.
func Subject(prefix, projectID string, kind Kind) string {
	return prefix + "." + projectID + "." + string(kind)
}

// ParseSubject splits a subject published under prefix into project id and
// kind. It also reads the subject as a partitioned stream stores it
// (Layout: p<n>.<k>.<prefix>.<project_id>.<kind>), if k is the project's
// partition among n.
func ParseSubject(prefix, subject string) (projectID string, kind Kind, err error) {
	rest, ok := strings.CutPrefix(subject, prefix+".")
	n, part := 0, 0
	if !ok {
		var after string
		n, part, after, ok = storedForm(subject)
		if rest, ok = strings.CutPrefix(after, prefix+"."); !ok {
			return "", "", invalid(ReasonBadSubject, "subject %q is not under prefix %q", subject, prefix)
		}
	}
	projectID, k, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(k, ".") {
		return "", "", invalid(ReasonBadSubject, "subject %q is not <prefix>.<project_id>.<kind>", subject)
	}
	if n > 0 && Partition(projectID, n) != part {
		return "", "", invalid(ReasonBadSubject, "subject %q is stored in partition %d of p%d, but project %q belongs to partition %d",
			subject, part, n, projectID, Partition(projectID, n))
	}
	return projectID, Kind(k), nil
}

// Marshal encodes the event canonically: the same event always gives the same bytes.
func (e Event) Marshal() ([]byte, error) {
	w := e
	w.OccurredAt = e.OccurredAt.UTC()
	w.Data = e.Data.only(e.Kind())
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // keep "<" as one byte: the body limit is on what is sent
	if err := enc.Encode(w); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// Digest is a hash of the canonical encoding; two events with one id and
// different digests are a conflict.
func (e Event) Digest() [32]byte {
	// Every field of the canonical content, each ended by a byte that cannot
	// occur in it (0xff is never in UTF-8); absent optional fields differ
	// from empty ones.
	d := e.Data.only(e.Kind())
	b := make([]byte, 0, 256)
	field := func(s string) { b = append(append(b, s...), 0xff) }
	opt := func(s *string) {
		if s == nil {
			b = append(b, 0xfe)
			return
		}
		field(*s)
	}
	num := func(n *int64) {
		if n == nil {
			b = append(b, 0xfe)
			return
		}
		b = append(strconv.AppendInt(b, *n, 10), 0xff)
	}
	b = append(strconv.AppendInt(b, int64(e.SpecVersion), 10), 0xff)
	field(e.ID)
	field(e.Type)
	field(e.ProjectID)
	field(e.BuildID)
	b = append(e.OccurredAt.UTC().AppendFormat(b, time.RFC3339Nano), 0xff)
	opt(d.Framework)
	opt(d.NodeVersion)
	opt(d.PackageManager)
	num(d.Attempt)
	field(string(d.Outcome))
	num(d.DurationMS)
	opt(d.Error)
	if d.TimedOut { // only when set: the digests of events without it are unchanged
		b = append(b, 't', 0xff)
	}
	return sha256.Sum256(b)
}

// only returns the fields of d that belong to kind k.
func (d Data) only(k Kind) Data {
	switch k {
	case KindStarted:
		return Data{Framework: d.Framework}
	case KindMetricsRecorded:
		return Data{Framework: d.Framework, NodeVersion: d.NodeVersion, PackageManager: d.PackageManager, Attempt: d.Attempt}
	case KindCompleted:
		return Data{Outcome: d.Outcome, DurationMS: d.DurationMS, Error: d.Error, TimedOut: d.TimedOut}
	}
	return Data{}
}
