package events

// The implementation of Decode, Validate, ParseSubject and Digest before the
// single-pass decoder (encoding/json v1, one Unmarshal per field), kept
// unchanged as the reference the differential tests (oracle_test.go)
// compare the current code with.

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// parseSubjectV1 is ParseSubject as it was.
func parseSubjectV1(prefix, subject string) (projectID string, kind Kind, err error) {
	rest, ok := strings.CutPrefix(subject, prefix+".")
	if !ok {
		return "", "", invalid(ReasonBadSubject, "subject %q is not under prefix %q", subject, prefix)
	}
	projectID, k, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(k, ".") {
		return "", "", invalid(ReasonBadSubject, "subject %q is not <prefix>.<project_id>.<kind>", subject)
	}
	return projectID, Kind(k), nil
}

// digestV1 is Event.Digest as it was.
func digestV1(e Event) [32]byte {
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
		field(strconv.FormatInt(*n, 10))
	}
	field(strconv.Itoa(e.SpecVersion))
	field(e.ID)
	field(e.Type)
	field(e.ProjectID)
	field(e.BuildID)
	field(e.OccurredAt.UTC().Format(time.RFC3339Nano))
	opt(d.Framework)
	opt(d.NodeVersion)
	opt(d.PackageManager)
	num(d.Attempt)
	field(string(d.Outcome))
	num(d.DurationMS)
	opt(d.Error)
	return sha256.Sum256(b)
}

var projectIDPatternV1 = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)

// validProjectIDV1 reports whether id matches ^[A-Za-z0-9_-]{1,128}$.
func validProjectIDV1(id string) bool { return projectIDPatternV1.MatchString(id) }

// wire is the JSON shape read off the log; pointers tell absent from zero.
type wireV1 struct {
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
func decodeV1(prefix, subject string, body []byte, storedAt time.Time) (Event, error) {
	if len(body) > MaxBodySize {
		return Event{}, invalid(ReasonBodyTooLarge, "body is %d bytes; the limit is %d", len(body), MaxBodySize)
	}
	if !utf8.Valid(body) {
		return Event{}, invalid(ReasonNotUTF8, "body is not valid UTF-8")
	}
	var w wireV1
	if err := exactFieldsV1(body, map[string]any{
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
	ev.ID, ev.ProjectID, ev.BuildID = derefV1(w.ID), derefV1(w.ProjectID), derefV1(w.BuildID)
	if w.OccurredAt == nil {
		return Event{}, invalid(ReasonInvalidOccurredAt, "occurred_at is missing")
	}
	at, err := time.Parse(time.RFC3339Nano, *w.OccurredAt)
	if err != nil {
		return Event{}, invalid(ReasonInvalidOccurredAt, "occurred_at %q is not RFC 3339", *w.OccurredAt)
	}
	ev.OccurredAt = at.UTC().Truncate(time.Microsecond)
	data, err := decodeDataV1(kind, w.Data)
	if err != nil {
		return Event{}, err
	}
	ev.Data = data
	if err := validateV1(ev, storedAt); err != nil {
		return Event{}, err
	}
	if subject != "" {
		project, skind, err := parseSubjectV1(prefix, subject)
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
func validateV1(ev Event, storedAt time.Time) error {
	if ev.SpecVersion != SpecVersion {
		return invalid(ReasonSpecVersion, "spec_version is %d; want %d", ev.SpecVersion, SpecVersion)
	}
	kind, ok := KindOfType(ev.Type)
	if !ok {
		return invalid(ReasonUnknownType, "type %q is not a build lifecycle type", ev.Type)
	}
	if !validProjectIDV1(ev.ProjectID) {
		return invalid(ReasonInvalidProjectID, "project_id %q must match ^[A-Za-z0-9_-]{1,128}$", ev.ProjectID)
	}
	if !printableV1(ev.ID) {
		return invalid(ReasonInvalidID, "id %q must be 1-128 printable characters", ev.ID)
	}
	if !printableV1(ev.BuildID) {
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
	return validateDataV1(kind, ev.Data)
}

func validateDataV1(kind Kind, d Data) error {
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

// decodeDataV1 reads only the fields of kind; other fields are ignored, as the
// contract says of unknown fields.
func decodeDataV1(kind Kind, raw json.RawMessage) (Data, error) {
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
	err := exactFieldsV1(raw, fields)
	d.Outcome = Outcome(derefV1(outcome))
	if err != nil {
		return Data{}, invalid(ReasonInvalidData, "data: %v", err)
	}
	return d, nil
}

// exactFieldsV1 decodes a JSON object, taking each named field only when its
// key matches exactly (encoding/json alone would also take "ID" for "id");
// other keys are ignored, as the contract says of unknown fields.
func exactFieldsV1(obj []byte, fields map[string]any) error {
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

func printableV1(s string) bool {
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

func derefV1(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
