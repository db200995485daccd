package events

// The implementation of Decode, Validate, ParseSubject and Digest before the
// single-pass decoder (encoding/json v1, one Unmarshal per field), kept as
// the reference the differential tests (oracle_test.go) compare the current
// code with. It is unchanged but for the contract's amendments of issue 9,
// each marked "issue 9" and written independently of the code under test:
// integral numbers such as 1.0 are integers (big.Float here), RFC 3339 is
// read strictly (a regular expression here), NUL in a data string is
// invalid, and the tolerant reading drops optional measurements out of range.

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
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
func decodeV1(prefix, subject string, body []byte, storedAt time.Time, tolerant bool) (Event, error) {
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
	at, ok := parseTimeV1(*w.OccurredAt)
	if !ok {
		return Event{}, invalid(ReasonInvalidOccurredAt, "occurred_at %q is not RFC 3339", *w.OccurredAt)
	}
	ev.OccurredAt = at.UTC().Truncate(time.Microsecond)
	data, err := decodeDataV1(kind, w.Data)
	if err != nil {
		return Event{}, err
	}
	ev.Data = data
	// issue 9: the tolerant reading leaves an out-of-range measurement out.
	if tolerant && kind == KindMetricsRecorded && data.Attempt != nil && *data.Attempt < 1 {
		ev.Dropped = append(ev.Dropped, Drop{"attempt", *data.Attempt})
		ev.Data.Attempt = nil
	}
	if tolerant && kind == KindCompleted && data.DurationMS != nil && *data.DurationMS < 0 {
		ev.Dropped = append(ev.Dropped, Drop{"duration_ms", *data.DurationMS})
		ev.Data.DurationMS = nil
	}
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
	// issue 9: NUL, which a Postgres text column cannot hold.
	var strs [][2]string
	add := func(name string, v *string) {
		if v != nil {
			strs = append(strs, [2]string{name, *v})
		}
	}
	switch kind {
	case KindStarted:
		add("framework", d.Framework)
	case KindMetricsRecorded:
		add("framework", d.Framework)
		add("node_version", d.NodeVersion)
		add("package_manager", d.PackageManager)
	case KindCompleted:
		add("error", d.Error)
	}
	for _, f := range strs {
		if strings.ContainsRune(f[1], 0) {
			return invalid(ReasonInvalidData, "data.%s contains U+0000 (NUL), which the read model cannot store", f[0])
		}
	}
	return nil
}

// rfc3339V1 is RFC 3339's date-time (section 5.6), in either case.
var rfc3339V1 = regexp.MustCompile(`^(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?(?:[Zz]|([+-])(\d\d):(\d\d))$`)

// parseTimeV1 (issue 9) reads RFC 3339 strictly, no leap second.
func parseTimeV1(s string) (time.Time, bool) {
	m := rfc3339V1.FindStringSubmatch(s)
	if m == nil {
		return time.Time{}, false
	}
	n := make([]int, 0, 8)
	for _, i := range []int{1, 2, 3, 4, 5, 6, 9, 10} {
		v, _ := strconv.Atoi(m[i])
		n = append(n, v)
	}
	year, month, day, hour, minute, sec, zh, zm := n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]
	if month < 1 || month > 12 || hour > 23 || minute > 59 || sec > 59 || zh > 23 || zm > 59 {
		return time.Time{}, false
	}
	if day < 1 || day > time.Date(year, time.Month(month)+1, 0, 0, 0, 0, 0, time.UTC).Day() {
		return time.Time{}, false
	}
	nsec := 0
	if m[7] != "" {
		f := (m[7][1:] + "000000000")[:9]
		nsec, _ = strconv.Atoi(f)
	}
	offset := (zh*60 + zm) * 60
	if m[8] == "-" {
		offset = -offset
	}
	return time.Date(year, time.Month(month), day, hour, minute, sec, nsec, time.FixedZone("", offset)), true
}

// integerV1 (issue 9) reads a JSON number into an integer by its value.
func integerV1(lit string) (int64, string) {
	f, _, err := big.ParseFloat(lit, 10, uint(4*len(lit)+64), big.ToNearestEven)
	msg := ""
	switch {
	case err != nil && strings.Contains(strings.ToLower(lit), "e-"):
		msg = "is not an integer"
	case err != nil:
		msg = "is out of range: integers are from -9223372036854775808 to 9223372036854775807"
	case !f.IsInt():
		msg = "is not an integer"
	default:
		if i, acc := f.Int64(); acc == big.Exact {
			return i, ""
		}
		msg = "is out of range: integers are from -9223372036854775808 to 9223372036854775807"
	}
	if len(lit) > 40 {
		lit = fmt.Sprintf("%s… (%d characters)", lit[:40], len(lit))
	}
	return 0, "number " + lit + " " + msg
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
		// issue 9: a number read into an integer counts by its value.
		var num json.Number
		_, isInt64 := dst.(**int64)
		_, isInt := dst.(**int)
		if (isInt64 || isInt) && isNumberV1(raw) && json.Unmarshal(raw, &num) == nil {
			i, msg := integerV1(string(num))
			if msg != "" {
				return fmt.Errorf("field %s: %s", name, msg)
			}
			if isInt64 {
				*dst.(**int64) = &i
			} else {
				v := int(i)
				*dst.(**int) = &v
			}
			continue
		}
		if err := json.Unmarshal(raw, dst); err != nil {
			return fmt.Errorf("field %s: %w", name, err)
		}
	}
	return nil
}

// isNumberV1 reports whether the JSON value raw is a number.
func isNumberV1(raw []byte) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && (raw[0] == '-' || '0' <= raw[0] && raw[0] <= '9')
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
