package events

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"time"
	"unicode"
	"unicode/utf8"
)

// ErrInvalid is matched (errors.Is) by every *InvalidError: the event can
// never be applied as sent, so retrying it is pointless.
var ErrInvalid = errors.New("invalid event")

// Reason is a machine-readable cause of rejection, stored with dead letters.
type Reason string

const (
	ReasonBodyTooLarge      Reason = "body_too_large"
	ReasonNotUTF8           Reason = "not_utf8"
	ReasonMalformedJSON     Reason = "malformed_json"
	ReasonSpecVersion       Reason = "unsupported_spec_version"
	ReasonUnknownType       Reason = "unknown_type"
	ReasonBadSubject        Reason = "bad_subject"
	ReasonSubjectMismatch   Reason = "subject_mismatch"
	ReasonInvalidProjectID  Reason = "invalid_project_id"
	ReasonInvalidID         Reason = "invalid_id"
	ReasonInvalidBuildID    Reason = "invalid_build_id"
	ReasonInvalidOccurredAt Reason = "invalid_occurred_at"
	ReasonOccurredInFuture  Reason = "occurred_in_future"
	ReasonInvalidData       Reason = "invalid_data"
	ReasonIDConflict        Reason = "id_conflict"
	ReasonBuildProjectClash Reason = "build_project_conflict"
)

// InvalidError says why an event was refused.
type InvalidError struct {
	Reason Reason
	Detail string
}

func (e *InvalidError) Error() string { return string(e.Reason) + ": " + e.Detail }

// Is makes errors.Is(err, ErrInvalid) true.
func (e *InvalidError) Is(target error) bool { return target == ErrInvalid }

func invalid(r Reason, format string, args ...any) error {
	return &InvalidError{Reason: r, Detail: fmt.Sprintf(format, args...)}
}

// ReasonOf returns the reason of an *InvalidError in err's chain, or "".
func ReasonOf(err error) Reason {
	var ie *InvalidError
	if errors.As(err, &ie) {
		return ie.Reason
	}
	return ""
}

// Conflict builds the error for the two rules that need history to check
// (id seen with other content, build seen under another project).
func Conflict(r Reason, format string, args ...any) error { return invalid(r, format, args...) }

var projectIDPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)

// ValidProjectID reports whether id matches ^[A-Za-z0-9_-]{1,128}$.
func ValidProjectID(id string) bool { return projectIDPattern.MatchString(id) }

// wire is the JSON shape read off the log; pointers tell absent from zero.
type wire struct {
	SpecVersion *int            `json:"spec_version"`
	ID          *string         `json:"id"`
	Type        *string         `json:"type"`
	ProjectID   *string         `json:"project_id"`
	BuildID     *string         `json:"build_id"`
	OccurredAt  *string         `json:"occurred_at"`
	Data        json.RawMessage `json:"data"`
}

// Decode reads one message body published on subject (under prefix) and
// applies every rule of the contract that needs no history. storedAt is when
// the log stored the message (the zero time means now).
func Decode(prefix, subject string, body []byte, storedAt time.Time) (Event, error) {
	if len(body) > MaxBodySize {
		return Event{}, invalid(ReasonBodyTooLarge, "body is %d bytes; the limit is %d", len(body), MaxBodySize)
	}
	if !utf8.Valid(body) {
		return Event{}, invalid(ReasonNotUTF8, "body is not valid UTF-8")
	}
	var w wire
	if err := exactFields(body, map[string]any{
		"spec_version": &w.SpecVersion, "id": &w.ID, "type": &w.Type, "project_id": &w.ProjectID,
		"build_id": &w.BuildID, "occurred_at": &w.OccurredAt, "data": &w.Data,
	}); err != nil {
		return Event{}, invalid(ReasonMalformedJSON, "%v", err)
	}
	if w.SpecVersion == nil || *w.SpecVersion != SpecVersion {
		got := "missing"
		if w.SpecVersion != nil {
			got = fmt.Sprint(*w.SpecVersion)
		}
		return Event{}, invalid(ReasonSpecVersion, "spec_version is %s; this projector reads %d", got, SpecVersion)
	}
	ev := Event{SpecVersion: SpecVersion}
	if w.Type == nil {
		return Event{}, invalid(ReasonUnknownType, "type is missing")
	}
	ev.Type = *w.Type
	kind, ok := KindOfType(ev.Type)
	if !ok {
		return Event{}, invalid(ReasonUnknownType, "type %q is not one of build.queued, build.started, build.metrics_recorded, build.completed", ev.Type)
	}
	ev.ID, ev.ProjectID, ev.BuildID = deref(w.ID), deref(w.ProjectID), deref(w.BuildID)
	if w.OccurredAt == nil {
		return Event{}, invalid(ReasonInvalidOccurredAt, "occurred_at is missing")
	}
	at, err := time.Parse(time.RFC3339Nano, *w.OccurredAt)
	if err != nil {
		return Event{}, invalid(ReasonInvalidOccurredAt, "occurred_at %q is not RFC 3339", *w.OccurredAt)
	}
	ev.OccurredAt = at.UTC().Truncate(time.Microsecond)
	data, err := decodeData(kind, w.Data)
	if err != nil {
		return Event{}, err
	}
	ev.Data = data
	if err := Validate(ev, storedAt); err != nil {
		return Event{}, err
	}
	if subject != "" {
		project, skind, err := ParseSubject(prefix, subject)
		if err != nil {
			return Event{}, err
		}
		if skind != kind {
			return Event{}, invalid(ReasonSubjectMismatch, "type %q does not match subject kind %q", ev.Type, skind)
		}
		if project != ev.ProjectID {
			return Event{}, invalid(ReasonSubjectMismatch, "project_id %q does not match subject token %q", ev.ProjectID, project)
		}
	}
	return ev, nil
}

// Validate checks an event built in code (the emitter's path) against the
// contract. storedAt bounds occurred_at (zero means now).
func Validate(ev Event, storedAt time.Time) error {
	if ev.SpecVersion != SpecVersion {
		return invalid(ReasonSpecVersion, "spec_version is %d; want %d", ev.SpecVersion, SpecVersion)
	}
	kind, ok := KindOfType(ev.Type)
	if !ok {
		return invalid(ReasonUnknownType, "type %q is not a build lifecycle type", ev.Type)
	}
	if !ValidProjectID(ev.ProjectID) {
		return invalid(ReasonInvalidProjectID, "project_id %q must match ^[A-Za-z0-9_-]{1,128}$", ev.ProjectID)
	}
	if !printable(ev.ID) {
		return invalid(ReasonInvalidID, "id %q must be 1-128 printable characters", ev.ID)
	}
	if !printable(ev.BuildID) {
		return invalid(ReasonInvalidBuildID, "build_id %q must be 1-128 printable characters", ev.BuildID)
	}
	if ev.OccurredAt.IsZero() {
		return invalid(ReasonInvalidOccurredAt, "occurred_at is missing")
	}
	if y := ev.OccurredAt.UTC().Year(); y < 1 || y > 9999 {
		return invalid(ReasonInvalidOccurredAt, "occurred_at %s is outside years 0001-9999 UTC", ev.OccurredAt.Format(time.RFC3339Nano))
	}
	if storedAt.IsZero() {
		storedAt = time.Now()
	}
	if ev.OccurredAt.After(storedAt.Add(MaxClockSkew)) {
		return invalid(ReasonOccurredInFuture, "occurred_at %s is more than %s after the log stored it (%s)",
			ev.OccurredAt.Format(time.RFC3339Nano), MaxClockSkew, storedAt.UTC().Format(time.RFC3339Nano))
	}
	return validateData(kind, ev.Data)
}

func validateData(kind Kind, d Data) error {
	switch kind {
	case KindMetricsRecorded:
		if d.Attempt != nil && *d.Attempt < 1 {
			return invalid(ReasonInvalidData, "data.attempt is %d; it must be at least 1", *d.Attempt)
		}
	case KindCompleted:
		if !d.Outcome.Valid() {
			return invalid(ReasonInvalidData, "data.outcome %q must be succeeded, failed or canceled", d.Outcome)
		}
		if d.DurationMS != nil && *d.DurationMS < 0 {
			return invalid(ReasonInvalidData, "data.duration_ms is %d; it must not be negative", *d.DurationMS)
		}
	}
	return nil
}

// decodeData reads only the fields of kind; other fields are ignored, as the
// contract says of unknown fields.
func decodeData(kind Kind, raw json.RawMessage) (Data, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		raw = []byte("{}")
	}
	if raw[0] != '{' {
		return Data{}, invalid(ReasonInvalidData, "data must be a JSON object")
	}
	var d Data
	var outcome *string
	var fields map[string]any
	switch kind {
	case KindQueued:
		fields = map[string]any{}
	case KindStarted:
		fields = map[string]any{"framework": &d.Framework}
	case KindMetricsRecorded:
		fields = map[string]any{"framework": &d.Framework, "node_version": &d.NodeVersion,
			"package_manager": &d.PackageManager, "attempt": &d.Attempt}
	case KindCompleted:
		fields = map[string]any{"outcome": &outcome, "duration_ms": &d.DurationMS, "error": &d.Error}
	}
	err := exactFields(raw, fields)
	d.Outcome = Outcome(deref(outcome))
	if err != nil {
		return Data{}, invalid(ReasonInvalidData, "data: %v", err)
	}
	return d, nil
}

// exactFields decodes a JSON object, taking each named field only when its
// key matches exactly (encoding/json alone would also take "ID" for "id");
// other keys are ignored, as the contract says of unknown fields.
func exactFields(obj []byte, fields map[string]any) error {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(obj, &m); err != nil {
		return err
	}
	if m == nil {
		return errors.New("not a JSON object")
	}
	for name, dst := range fields {
		raw, ok := m[name]
		if !ok {
			continue
		}
		if err := json.Unmarshal(raw, dst); err != nil {
			return fmt.Errorf("field %s: %w", name, err)
		}
	}
	return nil
}

func printable(s string) bool {
	n := utf8.RuneCountInString(s)
	if n < 1 || n > 128 {
		return false
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
