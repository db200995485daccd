package events

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
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
	// ReasonRejectedByDatabase: the database refused to store the event
	// (the detail names the SQLSTATE); no rule of the contract caught it.
	ReasonRejectedByDatabase Reason = "rejected_by_database"
)

// Reasons lists every Reason, in the order above.
var Reasons = []Reason{ReasonBodyTooLarge, ReasonNotUTF8, ReasonMalformedJSON, ReasonSpecVersion,
	ReasonUnknownType, ReasonBadSubject, ReasonSubjectMismatch, ReasonInvalidProjectID, ReasonInvalidID,
	ReasonInvalidBuildID, ReasonInvalidOccurredAt, ReasonOccurredInFuture, ReasonInvalidData,
	ReasonIDConflict, ReasonBuildProjectClash, ReasonRejectedByDatabase}

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

// ValidProjectID reports whether id matches ^[A-Za-z0-9_-]{1,128}$.
func ValidProjectID(id string) bool {
	if len(id) < 1 || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// wire is the JSON shape read off the log, decoded in one pass. Each member
// records whether it was present (absent and null are the same) and whether
// its value had the wrong JSON type; the types are checked afterwards, in
// the order of the contract's rules. data is read for every kind's fields
// at once: which of them count depends on the type.
type wire struct {
	SpecVersion jsonInt[int] `json:"spec_version"`
	ID          jsonString   `json:"id"`
	Type        jsonString   `json:"type"`
	ProjectID   jsonString   `json:"project_id"`
	BuildID     jsonString   `json:"build_id"`
	OccurredAt  jsonString   `json:"occurred_at"`
	Data        jsonData     `json:"data"`
}

// wires recycles the wire values Decode decodes into: one is about 600
// bytes, and nothing Decode returns points into it.
var wires = sync.Pool{New: func() any { return new(wire) }}

// decodeOptions make json v2 read a body as encoding/json did: a repeated
// member name is allowed (its last occurrence counts: each occurrence
// overwrites the member's field), and an escaped lone surrogate such as
// "\ud800" reads as U+FFFD. Raw invalid UTF-8 never reaches the decoder
// (Decode refuses it first). Member names match case-sensitively, json v2's
// default, so a key "ID" is not "id"; unknown members are skipped.
var decodeOptions = json.JoinOptions(jsontext.AllowDuplicateNames(true), jsontext.AllowInvalidUTF8(true))

// Decode reads one message body published on subject (under prefix) and
// applies every rule of the contract that needs no history: the consumer's
// reading. storedAt is when the log stored the message (the zero time means
// now). It is tolerant of an optional measurement out of range (see
// measurements): the value is left out of Data and listed in Event.Dropped,
// and the event is valid without it.
func Decode(prefix, subject string, body []byte, storedAt time.Time) (Event, error) {
	return decode(prefix, subject, body, storedAt, true)
}

// DecodeStrict is Decode with the publisher's reading (Validate's): an
// optional measurement out of range makes the event invalid_data. A body
// that DecodeStrict accepts, Decode accepts as the same event, with nothing
// dropped.
func DecodeStrict(prefix, subject string, body []byte, storedAt time.Time) (Event, error) {
	return decode(prefix, subject, body, storedAt, false)
}

func decode(prefix, subject string, body []byte, storedAt time.Time, tolerant bool) (Event, error) {
	if len(body) > MaxBodySize {
		return Event{}, invalid(ReasonBodyTooLarge, "body is %d bytes; the limit is %d", len(body), MaxBodySize)
	}
	if !utf8.Valid(body) {
		return Event{}, invalid(ReasonNotUTF8, "body is not valid UTF-8")
	}
	w := wires.Get().(*wire)
	defer func() {
		*w = wire{} // hold on to no strings
		wires.Put(w)
	}()
	if err := json.Unmarshal(body, w, decodeOptions); err != nil || !isObject(body) {
		return Event{}, invalid(ReasonMalformedJSON, "%s", notAnObject(body, err))
	}
	if err := typeError([]field{{"spec_version", &w.SpecVersion}, {"id", &w.ID}, {"type", &w.Type},
		{"project_id", &w.ProjectID}, {"build_id", &w.BuildID}, {"occurred_at", &w.OccurredAt}}); err != "" {
		return Event{}, invalid(ReasonMalformedJSON, "%s", err)
	}
	if !w.SpecVersion.set || w.SpecVersion.v != SpecVersion {
		got := "missing"
		if w.SpecVersion.set {
			got = fmt.Sprint(w.SpecVersion.v)
		}
		return Event{}, invalid(ReasonSpecVersion, "spec_version is %s; this projector reads %d", got, SpecVersion)
	}
	ev := Event{SpecVersion: SpecVersion}
	if !w.Type.set {
		return Event{}, invalid(ReasonUnknownType, "type is missing")
	}
	ev.Type = w.Type.v
	kind, ok := KindOfType(ev.Type)
	if !ok {
		return Event{}, invalid(ReasonUnknownType, "type %q is not one of build.queued, build.started, build.metrics_recorded, build.completed", ev.Type)
	}
	ev.ID, ev.ProjectID, ev.BuildID = w.ID.v, w.ProjectID.v, w.BuildID.v
	if !w.OccurredAt.set {
		return Event{}, invalid(ReasonInvalidOccurredAt, "occurred_at is missing")
	}
	at, ok := ParseTime(w.OccurredAt.v)
	if !ok {
		return Event{}, invalid(ReasonInvalidOccurredAt, "occurred_at %q is not RFC 3339", w.OccurredAt.v)
	}
	ev.OccurredAt = at.UTC().Truncate(time.Microsecond)
	data, err := w.Data.of(kind)
	if err != nil {
		return Event{}, err
	}
	ev.Data = data
	if tolerant {
		ev.Data, ev.Dropped = dropOutOfRange(kind, data)
	}
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
	if d.TimedOut && kind != KindCompleted {
		return invalid(ReasonInvalidData, "data.timed_out is only for build.completed")
	}
	if kind == KindCompleted && !d.Outcome.Valid() {
		return invalid(ReasonInvalidData, "data.outcome %q must be succeeded, failed or canceled", d.Outcome)
	}
	for _, m := range measurements {
		if v := *m.of(&d); m.kind == kind && v != nil && *v < m.min {
			return invalid(ReasonInvalidData, "data.%s is %d; %s", m.name, *v, m.rule)
		}
	}
	d = d.only(kind)
	for _, f := range []struct {
		name string
		v    *string
	}{{"framework", d.Framework}, {"node_version", d.NodeVersion}, {"package_manager", d.PackageManager}, {"error", d.Error}} {
		if f.v != nil && strings.IndexByte(*f.v, 0) >= 0 {
			return invalid(ReasonInvalidData, "data.%s contains U+0000 (NUL), which the read model cannot store", f.name)
		}
	}
	return nil
}

// measurements are the optional numbers of Data and the range the contract
// gives each: the one place these ranges are stated. A publisher must keep
// to them (Validate, DecodeStrict refuse a value out of range); a consumer
// (Decode) leaves such a value out of the event, which applies without it.
var measurements = []struct {
	kind Kind
	name string // the JSON name, also Drop.Field
	min  int64
	rule string // the range, for the message
	of   func(*Data) **int64
}{
	{KindMetricsRecorded, "attempt", 1, "it must be at least 1", func(d *Data) **int64 { return &d.Attempt }},
	{KindCompleted, "duration_ms", 0, "it must not be negative", func(d *Data) **int64 { return &d.DurationMS }},
}

// Measurements lists the JSON names of the optional measurements Decode may
// drop (for metrics that count them per field).
func Measurements() []string {
	names := make([]string, len(measurements))
	for i, m := range measurements {
		names[i] = m.name
	}
	return names
}

// dropOutOfRange returns d without the measurements of kind that are out
// of range, and what it left out.
func dropOutOfRange(kind Kind, d Data) (Data, []Drop) {
	var dropped []Drop
	for _, m := range measurements {
		if p := m.of(&d); m.kind == kind && *p != nil && **p < m.min {
			dropped = append(dropped, Drop{Field: m.name, Value: **p})
			*p = nil
		}
	}
	return d, dropped
}

// ParseTime reads an RFC 3339 date-time (section 5.6): date, "T", time,
// offset. As RFC 3339 allows, "t" and "z" may be lower case; the fraction of
// a second may have any number of digits; the offset is "Z" or ±hh:mm with
// hh 00-23 and mm 00-59. A leap second (second 60) is refused: Go's time
// has none. Anything else time.Parse would take (a comma before the
// fraction, a one-digit hour, offset +24:00) is refused too.
func ParseTime(s string) (time.Time, bool) {
	digits := func(i, j int) bool {
		for ; i < j; i++ {
			if s[i] < '0' || s[i] > '9' {
				return false
			}
		}
		return true
	}
	const prefix = len("2006-01-02T15:04:05")
	if len(s) < prefix+1 || !digits(0, 4) || s[4] != '-' || !digits(5, 7) || s[7] != '-' || !digits(8, 10) ||
		s[10] != 'T' && s[10] != 't' || !digits(11, 13) || s[13] != ':' || !digits(14, 16) || s[16] != ':' || !digits(17, 19) {
		return time.Time{}, false
	}
	i := prefix
	if s[i] == '.' {
		j := i + 1
		for j < len(s) && '0' <= s[j] && s[j] <= '9' {
			j++
		}
		if j == i+1 {
			return time.Time{}, false
		}
		i = j
	}
	switch zone := s[i:]; {
	case zone == "Z" || zone == "z":
	case len(zone) == len("+07:00") && (zone[0] == '+' || zone[0] == '-') && zone[3] == ':' &&
		digits(i+1, i+3) && digits(i+4, i+6) && zone[1:3] <= "23" && zone[4:6] <= "59":
	default:
		return time.Time{}, false
	}
	// The shape is RFC 3339's; time.Parse checks the ranges (month, day of
	// that month, hour, minute, second).
	norm := s
	if s[10] == 't' || s[len(s)-1] == 'z' {
		b := []byte(s)
		b[10] = 'T'
		if b[len(b)-1] == 'z' {
			b[len(b)-1] = 'Z'
		}
		norm = string(b)
	}
	t, err := time.Parse(time.RFC3339Nano, norm)
	return t, err == nil
}

// DecodeData reads a data object of kind as Decode reads a body's data
// member (JSON types, integers by their value, fields of other kinds and
// unknown ones ignored; null is {}). It checks no range: Validate does.
func DecodeData(kind Kind, raw []byte) (Data, error) {
	var d jsonData
	if err := json.Unmarshal(raw, &d, decodeOptions); err != nil {
		return Data{}, invalid(ReasonMalformedJSON, "data: %v", err)
	}
	return d.of(kind)
}

// jsonData is the data member: an object of kind-specific fields, absent,
// or null (both read as {}). A repeated data member counts by its last
// occurrence only, as a whole.
type jsonData struct {
	notObject bool // data is neither an object nor null
	fields    dataFields
}

// dataFields holds the fields of every kind; only those of the event's kind
// count (their types included): the contract ignores the others.
type dataFields struct {
	Framework      jsonString     `json:"framework"`
	NodeVersion    jsonString     `json:"node_version"`
	PackageManager jsonString     `json:"package_manager"`
	Attempt        jsonInt[int64] `json:"attempt"`
	Outcome        jsonString     `json:"outcome"`
	DurationMS     jsonInt[int64] `json:"duration_ms"`
	Error          jsonString     `json:"error"`
	TimedOut       jsonBool       `json:"timed_out"`
}

// UnmarshalJSONFrom implements json.UnmarshalerFrom.
func (d *jsonData) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	*d = jsonData{}
	switch dec.PeekKind() {
	case jsontext.KindNull:
		_, err := dec.ReadToken()
		return err
	case jsontext.KindBeginObject:
		return json.UnmarshalDecode(dec, &d.fields)
	}
	d.notObject = true
	return dec.SkipValue()
}

// of returns the data of kind; a field of kind with a value of the wrong
// JSON type, or data that is not an object, is invalid.
func (d *jsonData) of(kind Kind) (Data, error) {
	if d.notObject {
		return Data{}, invalid(ReasonInvalidData, "data must be a JSON object")
	}
	f := &d.fields
	var err string
	switch kind {
	case KindStarted:
		err = typeError([]field{{"framework", &f.Framework}})
	case KindMetricsRecorded:
		err = typeError([]field{{"framework", &f.Framework}, {"node_version", &f.NodeVersion},
			{"package_manager", &f.PackageManager}, {"attempt", &f.Attempt}})
	case KindCompleted:
		err = typeError([]field{{"outcome", &f.Outcome}, {"duration_ms", &f.DurationMS}, {"error", &f.Error}, {"timed_out", &f.TimedOut}})
	}
	if err != "" {
		return Data{}, invalid(ReasonInvalidData, "data: %s", err)
	}
	// The values are copied out of d (which is large and short-lived), in
	// one allocation per event.
	switch kind {
	case KindStarted:
		if f.Framework.set {
			framework := f.Framework.v
			return Data{Framework: &framework}, nil
		}
	case KindMetricsRecorded:
		if f.Framework.set || f.NodeVersion.set || f.PackageManager.set || f.Attempt.set {
			v := &struct {
				framework, nodeVersion, packageManager string
				attempt                                int64
			}{f.Framework.v, f.NodeVersion.v, f.PackageManager.v, f.Attempt.v}
			return Data{Framework: f.Framework.at(&v.framework), NodeVersion: f.NodeVersion.at(&v.nodeVersion),
				PackageManager: f.PackageManager.at(&v.packageManager), Attempt: f.Attempt.at(&v.attempt)}, nil
		}
	case KindCompleted:
		out := Data{Outcome: Outcome(f.Outcome.v), TimedOut: f.TimedOut.v}
		if f.DurationMS.set || f.Error.set {
			v := &struct {
				err        string
				durationMS int64
			}{f.Error.v, f.DurationMS.v}
			out.DurationMS, out.Error = f.DurationMS.at(&v.durationMS), f.Error.at(&v.err)
		}
		return out, nil
	}
	return Data{}, nil
}

// member is a decoded member whose value may have had the wrong JSON type.
type member interface {
	// typeError is "" or, when the value had the wrong JSON type, the
	// message encoding/json gave for it.
	typeError() string
}

// field is a member with its name.
type field struct {
	name string
	m    member
}

// typeError returns "field <name>: <message>" for the first of fields with
// a value of the wrong JSON type, or "". (encoding/json reported one of
// them, in no fixed order.)
func typeError(fields []field) string {
	for _, f := range fields {
		if msg := f.m.typeError(); msg != "" {
			return "field " + f.name + ": " + msg
		}
	}
	return ""
}

// jsonString is a string member as encoding/json read it into a *string:
// absent and null leave it unset; a value of another JSON type is recorded
// (not returned: a later occurrence of the member may replace it).
type jsonString struct {
	v   string
	set bool
	bad string // the JSON type of a wrong value, as encoding/json named it
}

// UnmarshalJSONFrom implements json.UnmarshalerFrom.
func (s *jsonString) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	*s = jsonString{}
	switch k := dec.PeekKind(); k {
	case jsontext.KindNull:
		_, err := dec.ReadToken()
		return err
	case jsontext.KindString:
		tok, err := dec.ReadToken()
		if err != nil {
			return err
		}
		s.v, s.set = tok.String(), true
		return nil
	case jsontext.KindNumber:
		s.bad = "number"
	default:
		s.bad = kindName(k)
	}
	return dec.SkipValue()
}

func (s *jsonString) typeError() string { return unmarshalTypeError(s.bad, "string") }

// at returns p, which holds s's value, or nil if s is unset.
func (s *jsonString) at(p *string) *string {
	if !s.set {
		return nil
	}
	return p
}

// jsonInt is an integer member: absent and null leave it unset; a number
// whose value is not an integer in T's range (parseInteger), or a value of
// another JSON type (as encoding/json named it), is recorded as wrong.
type jsonInt[T int | int64] struct {
	v   T
	set bool
	bad string
}

// UnmarshalJSONFrom implements json.UnmarshalerFrom.
func (n *jsonInt[T]) UnmarshalJSONFrom(dec *jsontext.Decoder) error {
	*n = jsonInt[T]{}
	switch k := dec.PeekKind(); k {
	case jsontext.KindNull:
		_, err := dec.ReadToken()
		return err
	case jsontext.KindNumber:
		lit, err := dec.ReadValue()
		if err != nil {
			return err
		}
		i, msg := parseInteger(lit)
		if msg == "" && int64(T(i)) != i {
			msg = outOfRange
		}
		if msg != "" {
			n.bad = "number " + shorten(lit) + " " + msg
			return nil
		}
		n.v, n.set = T(i), true
		return nil
	default:
		n.bad = kindName(k)
		return dec.SkipValue()
	}
}

func (n *jsonInt[T]) typeError() string {
	if n.bad == "" || strings.HasPrefix(n.bad, "number ") {
		return n.bad
	}
	var zero T
	return unmarshalTypeError(n.bad, fmt.Sprintf("%T", zero))
}

const (
	notInteger = "is not an integer"
	outOfRange = "is out of range: integers are from -9223372036854775808 to 9223372036854775807"
)

// parseInteger reads a JSON number literal (its syntax already checked) as
// an integer: its value counts, not its spelling, so 61000.0, 1e3 and
// 1.5e1 are integers (JSON Schema's "integer"; what Python and many JSON
// libraries write), 1.5 is not. It returns "" or why lit is not an int64
// (notInteger, outOfRange).
func parseInteger(lit []byte) (int64, string) {
	if i, err := strconv.ParseInt(string(lit), 10, 64); err == nil {
		return i, ""
	}
	// lit is -?digits(.digits)?([eE][+-]?digits)?: its value is
	// sign × mantissa × 10^scale, the mantissa being its digits without the dot.
	neg := lit[0] == '-'
	if neg {
		lit = lit[1:]
	}
	end := len(lit)
	exp := ""
	for i, c := range lit {
		if c == 'e' || c == 'E' {
			end, exp = i, string(lit[i+1:])
			break
		}
	}
	whole, frac, _ := strings.Cut(string(lit[:end]), ".")
	mantissa := strings.TrimLeft(whole+frac, "0")
	if mantissa == "" {
		return 0, "" // zero, whatever its exponent
	}
	trimmed := strings.TrimRight(mantissa, "0")
	scale := len(mantissa) - len(trimmed) - len(frac) // the exponent adds to this
	mantissa = trimmed
	expNeg := strings.HasPrefix(exp, "-")
	exp = strings.TrimLeft(strings.TrimLeft(exp, "+-"), "0")
	if len(exp) > 6 { // beyond ±999999: the mantissa (≤ 64 KiB of digits) cannot make up for it
		if expNeg {
			return 0, notInteger
		}
		return 0, outOfRange
	}
	if e, _ := strconv.Atoi(exp); expNeg {
		scale -= e
	} else {
		scale += e
	}
	switch {
	case scale < 0:
		return 0, notInteger
	case len(mantissa)+scale > 19: // more digits than any int64
		return 0, outOfRange
	}
	digits := mantissa + strings.Repeat("0", scale)
	if neg {
		digits = "-" + digits
	}
	i, err := strconv.ParseInt(digits, 10, 64)
	if err != nil {
		return 0, outOfRange
	}
	return i, ""
}

// shorten returns lit, cut to 40 bytes with its length said if longer.
func shorten(lit []byte) string {
	if len(lit) <= 40 {
		return string(lit)
	}
	return fmt.Sprintf("%s… (%d characters)", lit[:40], len(lit))
}

// at returns p, which holds n's value, or nil if n is unset.
func (n *jsonInt[T]) at(p *T) *T {
	if !n.set {
		return nil
	}
	return p
}

// kindName names a JSON kind as encoding/json's type errors did ("" for
// KindInvalid: a syntax error, which SkipValue then reports).
func kindName(k jsontext.Kind) string {
	switch k {
	case jsontext.KindString:
		return "string"
	case jsontext.KindNumber:
		return "number"
	case jsontext.KindTrue, jsontext.KindFalse:
		return "bool"
	case jsontext.KindBeginObject:
		return "object"
	case jsontext.KindBeginArray:
		return "array"
	}
	return ""
}

// Plain returns err's message for people. The decoder's details keep the
// JSON packages' wording (the reference test compares it), which names Go
// types and packages ("json: cannot unmarshal array into Go value of type
// map[string]json.RawMessage", "jsontext: unexpected EOF"); Plain names JSON
// types instead ("got a JSON array; want an object", "invalid JSON: …").
// The HTTP ingest answers with it and dead letters keep it as their detail.
func Plain(err error) string { return PlainText(err.Error()) }

// PlainText is Plain of a message.
func PlainText(msg string) string {
	msg = strings.Replace(msg, "jsontext: ", "invalid JSON: ", 1)
	for {
		i := strings.Index(msg, typeErrorPrefix)
		if i < 0 {
			return msg
		}
		rest := msg[i+len(typeErrorPrefix):]
		bad, typ, ok := strings.Cut(rest, typeErrorMiddle)
		if !ok {
			return msg
		}
		typ, tail, _ := strings.Cut(typ, " ")
		if tail != "" {
			tail = " " + tail
		}
		want, known := jsonTypeOf[typ]
		if !known {
			want = typ
		}
		msg = msg[:i] + "got a JSON " + bad + "; want " + want + tail
	}
}

const (
	typeErrorPrefix = "json: cannot unmarshal "
	typeErrorMiddle = " into Go value of type "
)

// jsonTypeOf names, in JSON's terms, the Go types unmarshalTypeError is given.
var jsonTypeOf = map[string]string{
	"map[string]json.RawMessage": "an object",
	"string":                     "a string",
	"int":                        "an integer",
	"int64":                      "an integer",
}

// unmarshalTypeError is encoding/json's message for a value of JSON type
// bad read into Go type typ, or "" if bad is "".
func unmarshalTypeError(bad, typ string) string {
	if bad == "" {
		return ""
	}
	return typeErrorPrefix + bad + typeErrorMiddle + typ
}

// isObject reports whether the JSON value obj (with optional whitespace
// around it) is an object.
func isObject(obj []byte) bool {
	for _, c := range obj {
		switch c {
		case ' ', '\t', '\n', '\r':
			continue
		}
		return c == '{'
	}
	return false
}

// notAnObject says why body, which did not decode into wire with error err
// (maybe nil), is not a JSON object. A syntax error comes first (as in
// encoding/json, which checked the whole body before decoding any of it).
func notAnObject(body []byte, err error) string {
	var v jsontext.Value
	if err := json.Unmarshal(body, &v, decodeOptions); err != nil {
		return err.Error()
	}
	if isObject(body) { // cannot happen: wire takes every syntactically valid object
		return err.Error()
	}
	if k := v.Kind(); k != jsontext.KindNull {
		return unmarshalTypeError(kindName(k), "map[string]json.RawMessage")
	}
	return "not a JSON object"
}

// printable reports whether s is 1 to 128 characters, each of them
// printable (unicode.IsPrint; an invalid UTF-8 byte counts as one U+FFFD,
// which is).
func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= utf8.RuneSelf {
			return printableRunes(s)
		}
		if c < ' ' || c == 0x7f { // the ASCII characters unicode.IsPrint refuses
			return false
		}
	}
	return len(s) >= 1 && len(s) <= 128 // ASCII: one byte per character
}

func printableRunes(s string) bool {
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
