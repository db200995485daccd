package events_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math/big"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/schema"
)

// The differential test of the contract's two statements: every body of a
// corpus of generated and hand-written ones is judged by events.Decode (and
// DecodeStrict) and by an independent JSON Schema 2020-12 validator
// (santhosh-tekuri/jsonschema, format assertion on) loading
// schema/event.v1.schema.json. They must agree, except where a body breaks
// one of the rules a schema cannot state, each named below and in
// docs/contract.md: the corpus says which bodies break which rule, so a new
// disagreement, or a listed one that went away, fails the test.

// cannotState are the rules of the contract a JSON Schema cannot state:
// the schema accepts a body that breaks one, the decoder refuses it with
// one of reasons. (The subject's rules, and the two that need history,
// id_conflict and build_project_conflict, cannot be seen in a body at all.)
var cannotState = map[string][]events.Reason{
	// occurred_at at most MaxClockSkew after the time the log stored the message.
	"clock_skew": {events.ReasonOccurredInFuture},
	// occurred_at in years 0001-9999 once converted to UTC (and not the zero
	// time 0001-01-01T00:00:00Z): offsets move the year.
	"utc_years": {events.ReasonInvalidOccurredAt},
	// At most 64 KiB of valid UTF-8: rules on the bytes, before there is a
	// JSON document to validate.
	"body_bytes": {events.ReasonBodyTooLarge, events.ReasonNotUTF8},
}

// measurementDropped names the one way the consumer's reading (Decode)
// differs from the publisher's (DecodeStrict, which the schema states): an
// optional measurement out of range is left out, not refused.
const measurementDropped = "measurement_dropped"

// schemaCase is one body of the corpus.
type schemaCase struct {
	name    string
	body    []byte
	rule    string // the rule of cannotState the body breaks, or ""
	dropped bool   // Decode drops a measurement that DecodeStrict refuses
}

// schemaStoredAt is when the log stored every body of the corpus.
var schemaStoredAt = storedAt // 2026-11-26T20:30:00Z

func validator(t *testing.T) *jsonschema.Schema {
	t.Helper()
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(schema.EventV1))
	if err != nil {
		t.Fatalf("schema/event.v1.schema.json: %v", err)
	}
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	c.AssertFormat() // "format": "date-time" is an assertion, not a note
	const loc = "https://github.com/buildstate/buildstate/schema/event.v1.schema.json"
	if err := c.AddResource(loc, doc); err != nil {
		t.Fatal(err)
	}
	sch, err := c.Compile(loc)
	if err != nil {
		t.Fatalf("compile schema/event.v1.schema.json: %v", err)
	}
	return sch
}

// schemaAccepts reports whether body is a JSON document the schema accepts.
func schemaAccepts(sch *jsonschema.Schema, body []byte) (bool, error) {
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	if err := sch.Validate(inst); err != nil {
		return false, err
	}
	return true, nil
}

func TestSchemaAgreesWithDecode(t *testing.T) {
	t.Parallel()
	sch := validator(t)
	corpus := schemaCorpus()
	if len(corpus) < 500 {
		t.Fatalf("corpus has %d bodies; want several hundred", len(corpus))
	}
	accepted, refused, broken := 0, 0, map[string]int{}
	for _, c := range corpus {
		ok, why := schemaAccepts(sch, c.body)
		strict, serr := events.DecodeStrict("builds", "", c.body, schemaStoredAt)
		tolerant, terr := events.Decode("builds", "", c.body, schemaStoredAt)
		if ok {
			accepted++
		} else {
			refused++
		}
		switch reasons, listed := cannotState[c.rule]; {
		case c.rule == "" && ok != (serr == nil):
			t.Errorf("%s: the schema says %v (%v), DecodeStrict says %v, and no rule a schema cannot state explains it\nbody: %.400s",
				c.name, verdict(ok), why, serr, c.body)
		case c.rule != "" && !listed:
			t.Fatalf("%s: rule %q is not listed in cannotState", c.name, c.rule)
		case c.rule != "" && !(ok && slices.Contains(reasons, events.ReasonOf(serr))):
			t.Errorf("%s: breaks rule %s, so the schema should accept it (it says %v: %v) and the decoder refuse it with one of %v (it says %v)\nbody: %.400s",
				c.name, c.rule, verdict(ok), why, reasons, serr, c.body)
		case c.rule != "":
			broken[c.rule]++
		}
		// The consumer's reading: the same verdict and event, but for a
		// measurement out of range, which it drops.
		switch {
		case c.dropped:
			if terr != nil || len(tolerant.Dropped) == 0 || events.ReasonOf(serr) != events.ReasonInvalidData || ok {
				t.Errorf("%s (%s): Decode = %v with %+v dropped, DecodeStrict = %v, schema %v; want Decode to drop what the others refuse\nbody: %.400s",
					c.name, measurementDropped, terr, tolerant.Dropped, serr, verdict(ok), c.body)
			}
			broken[measurementDropped]++
		case events.ReasonOf(terr) != events.ReasonOf(serr) || len(tolerant.Dropped) > 0 || terr == nil && tolerant.Digest() != strict.Digest():
			t.Errorf("%s: Decode = %v (dropped %+v), DecodeStrict = %v; want the same\nbody: %.400s", c.name, terr, tolerant.Dropped, serr, c.body)
		}
	}
	for rule := range cannotState {
		if broken[rule] == 0 {
			t.Errorf("no body of the corpus breaks rule %s", rule)
		}
	}
	if broken[measurementDropped] == 0 || accepted < 100 || refused < 100 {
		t.Errorf("corpus too one-sided: %d accepted, %d refused by the schema, %d measurements dropped", accepted, refused,
			broken[measurementDropped])
	}
	t.Logf("%d bodies: the schema accepts %d, refuses %d; rules a schema cannot state: %v", len(corpus), accepted, refused, broken)
}

// The rules a schema cannot state are the ones docs/contract.md lists.
func TestContractDocListsWhatTheSchemaCannotState(t *testing.T) {
	t.Parallel()
	doc, err := os.ReadFile("../../docs/contract.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, rule := range append(slices.Sorted(maps.Keys(cannotState)), measurementDropped) {
		if !bytes.Contains(doc, []byte("`"+rule+"`")) {
			t.Errorf("docs/contract.md does not name the rule `%s`", rule)
		}
	}
}

func verdict(ok bool) string {
	if ok {
		return "valid"
	}
	return "invalid"
}

// member is one "name": value of a body, both raw JSON.
type member struct{ name, value string }

func render(ms []member) []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, m := range ms {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(m.name + ":" + m.value)
	}
	b.WriteByte('}')
	return b.Bytes()
}

func quote(s string) string {
	b, err := json.Marshal(s)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// schemaBaseData is a valid data object of each kind, every field given.
var schemaBaseData = map[events.Kind][]member{
	events.KindQueued:  {},
	events.KindStarted: {{`"framework"`, `"nextjs"`}},
	events.KindMetricsRecorded: {{`"framework"`, `"remix"`}, {`"node_version"`, `"22.11.0"`},
		{`"package_manager"`, `"pnpm"`}, {`"attempt"`, `2`}},
	events.KindCompleted: {{`"outcome"`, `"failed"`}, {`"duration_ms"`, `61000`}, {`"error"`, `"exit 1"`}},
}

func schemaTop(kind events.Kind, data string) []member {
	return []member{{`"spec_version"`, `1`}, {`"id"`, `"01JD0000000000000000000001"`}, {`"type"`, quote(kind.Type())},
		{`"project_id"`, `"p-42"`}, {`"build_id"`, `"b-9001"`}, {`"occurred_at"`, `"2026-11-26T20:00:00.123Z"`},
		{`"data"`, data}}
}

// with returns ms with member name set to value ("" deletes it).
func with(ms []member, name, value string) []member {
	out := make([]member, 0, len(ms))
	for _, m := range ms {
		switch {
		case m.name != name:
			out = append(out, m)
		case value != "":
			out = append(out, member{name, value})
		}
	}
	return out
}

// labelled is a JSON value and the rule a body breaks by holding it.
type labelled struct {
	value string
	rule  string
}

// timeValues are occurred_at values: RFC 3339 in every form, and near misses.
func timeValues() []labelled {
	var out []labelled
	add := func(s, rule string) { out = append(out, labelled{quote(s), rule}) }
	// One dimension at a time, from 2026-11-25T20:00:00Z (a day before the
	// store time, so that no offset makes it too far ahead).
	dates := []string{"2026-11-25", "2024-02-29", "2026-02-29", "2026-11-31", "2026-13-01", "2026-00-10", "2026-11-00",
		"2026-1-25", "26-11-25", "2026/11/25", "２０２６-11-25", "+2026-11-25"}
	seps := []string{"T", "t", " ", "_", "TT", ""}
	times := []string{"20:00:00", "00:00:00", "23:59:59", "23:59:60", "20:00:60", "24:00:00", "20:60:00", "2:00:00",
		"20:00", "20:00:00:00", "20-00-00", "٢٠:00:00"}
	fracs := []string{"", ".", ",5", ".5.5", ".x", ".٥"}
	for n := 1; n <= 12; n++ {
		fracs = append(fracs, "."+"123456789012"[:n])
	}
	zones := []string{"Z", "z", "+00:00", "-00:00", "+01:00", "-05:30", "+23:59", "+24:00", "+23:60", "-24:00", "+0100",
		"+01", "+1:00", "", "UTC", " Z", "Z ", "+01:00:00", "++1:00", "+-1:00", "ZZ"}
	base := [...]string{dates[0], seps[0], times[0], fracs[0], zones[0]}
	build := func(p [5]string) string { return p[0] + p[1] + p[2] + p[3] + p[4] }
	for i, dim := range [][]string{dates, seps, times, fracs, zones} {
		for _, v := range dim {
			p := base
			p[i] = v
			add(build(p), "")
		}
	}
	// And a sample of every combination of the valid forms.
	r := rand.New(rand.NewPCG(9, 2))
	okSeps, okFracs, okZones := []string{"T", "t"}, []string{"", ".1", ".123", ".123456", ".123456789", ".1234567890123"},
		[]string{"Z", "z", "+00:00", "-00:00", "+01:00", "-05:30", "+23:59", "-23:59", "+14:00"}
	for range 120 {
		add(build([5]string{[]string{"2026-11-24", "2024-02-29", "1999-12-31", "0001-01-02"}[r.IntN(4)], okSeps[r.IntN(2)],
			[]string{"00:00:00", "12:34:56", "23:59:59"}[r.IntN(3)], okFracs[r.IntN(len(okFracs))], okZones[r.IntN(len(okZones))]}), "")
	}
	// The rules a schema cannot state.
	add("2026-11-26T21:30:00Z", "")                  // exactly MaxClockSkew ahead
	add("2026-11-26T21:30:00.000001Z", "clock_skew") // just over
	add("2026-11-26t21:30:00.000001z", "clock_skew") // in lower case
	add("2026-11-26T20:00:00-05:00", "clock_skew")   // 01:00Z the next day
	add("2030-01-01T00:00:00Z", "clock_skew")        // years ahead
	add("9999-12-31T23:59:59.999999Z", "clock_skew") // the last instant
	add("0000-01-01T00:00:00Z", "utc_years")         // year 0
	add("0001-01-01T00:00:00Z", "utc_years")         // the zero time
	add("0001-01-01T00:30:00+01:00", "utc_years")    // year 0 in UTC
	add("9999-12-31T23:00:00-02:00", "utc_years")    // year 10000 in UTC
	add("0001-01-01T00:00:00.000001Z", "")           // the first instant
	add("0001-01-01T01:00:00+01:00", "utc_years")    // the zero time again
	add("0001-01-01T00:00:00.0000001Z", "utc_years") // the zero time once kept to the µs
	add("2016-12-31T23:59:60Z", "")                  // a real leap second: refused by both
	add("2016-12-31T18:59:60-05:00", "")             // the same one
	return out
}

// integerValues are values for an integer field whose range starts at min.
func integerValues(min int64) []labelled {
	var out []labelled
	for _, v := range []string{"0", "1", "2", "-1", "-0", "1.0", "61000.0", "6.1e4", "1e3", "1E3", "1e+3", "100e-2", "1.5",
		"0.5", "-0.0", "-1.0", "1e400", "-1e400", "1e-400", "9223372036854775807", "9223372036854775808",
		"9223372036854775807.0", "92233720368547758070e-1", "-9223372036854775808", "-9223372036854775809",
		"123456789012345678901234567890", "0.1e1", "0e999", `"1"`, `null`, `true`, `[]`, `{}`, `[1]`} {
		out = append(out, labelled{value: v})
	}
	return out
}

// textValues are values for a free-text data field.
var textValues = []string{`""`, `"x"`, `"\u0000"`, `"a\u0000b"`, `"\u0001"`, `"\u2028"`, `"\t"`, `"\ud800"`, `"é"`,
	`"\ud83d\ude00"`, quote(strings.Repeat("long", 3000)), `null`, `1`, `1.0`, `true`, `[]`, `{}`, `["x"]`}

// identifierValues are values for id and build_id: printable, or not.
var identifierValues = []string{`""`, `"a"`, `" "`, `"evt 1/2:#"`, quote(strings.Repeat("i", 128)), quote(strings.Repeat("i", 129)),
	quote(strings.Repeat("é", 128)), quote(strings.Repeat("é", 129)), `"a\u0000b"`, `"a\u0001"`, `"a\tb"`, `"a\nb"`,
	`"a\u007f"`, `"a\u0085"`, `"a\u00a0b"`, `"a\u2028b"`, `"a\u2029b"`, `"a\u200bb"`, `"\ufeffa"`, `"a\u00adb"`,
	`"a\u200db"`, `"a\u3000b"`, `"\ud800"`, `"a\udc00"`, `"\ud83d\ude00"`, `"\ue000"`, `"\u0378"`, `"e\u0301"`,
	`"\u061c"`, `"\u1680"`, `"a b"`, `null`, `1`, `true`, `[]`, `{}`}

func schemaCorpus() []schemaCase {
	var out []schemaCase
	add := func(name string, ms []member, rule string) {
		out = append(out, schemaCase{name: name, body: render(ms), rule: rule})
	}
	times := timeValues()
	for _, kind := range events.Kinds {
		data := string(render(schemaBaseData[kind]))
		top := schemaTop(kind, data)
		add(string(kind)+" valid", top, "")
		// Each top-level member missing, null, or of another type.
		for _, m := range top {
			add(fmt.Sprintf("%s without %s", kind, m.name), with(top, m.name, ""), "")
			for _, v := range []string{`null`, `1`, `1.5`, `true`, `"x"`, `[]`, `{}`} {
				add(fmt.Sprintf("%s %s=%s", kind, m.name, v), with(top, m.name, v), "")
			}
		}
		for _, v := range []string{`1.0`, `1e0`, `10e-1`, `2`, `0`, `"1"`, `1.000000000000000000001`} {
			add(fmt.Sprintf("%s spec_version=%s", kind, v), with(top, `"spec_version"`, v), "")
		}
		for _, v := range identifierValues {
			add(fmt.Sprintf("%s id=%s", kind, v), with(top, `"id"`, v), "")
			add(fmt.Sprintf("%s build_id=%s", kind, v), with(top, `"build_id"`, v), "")
		}
		for _, v := range []string{`"p"`, `"AZaz09_-"`, quote(strings.Repeat("a", 128)), quote(strings.Repeat("a", 129)),
			`""`, `"p.42"`, `"pé"`, `"p 42"`, `"p-42\u0000"`, `"p\n"`} {
			add(fmt.Sprintf("%s project_id=%s", kind, v), with(top, `"project_id"`, v), "")
		}
		for _, v := range []string{`"build.Started"`, `"started"`, `"build.deployed"`, quote(kind.Type() + "\x00"), `" ` + kind.Type() + `"`} {
			add(fmt.Sprintf("%s type=%s", kind, v), with(top, `"type"`, v), "")
		}
		for _, tv := range times {
			add(fmt.Sprintf("%s occurred_at=%s", kind, tv.value), with(top, `"occurred_at"`, tv.value), tv.rule)
		}
		// Each data member missing, null, or another value.
		for _, m := range schemaBaseData[kind] {
			withData := func(v string) []member {
				return with(top, `"data"`, string(render(with(schemaBaseData[kind], m.name, v))))
			}
			add(fmt.Sprintf("%s without data.%s", kind, m.name), withData(""), "")
			switch m.name {
			case `"attempt"`, `"duration_ms"`:
				min := int64(0)
				if m.name == `"attempt"` {
					min = 1
				}
				for _, v := range integerValues(min) {
					c := schemaCase{name: fmt.Sprintf("%s data.%s=%s", kind, m.name, v.value), body: render(withData(v.value))}
					// An integer in int64's range, below the minimum, is dropped.
					if r, ok := new(big.Rat).SetString(v.value); ok && r.IsInt() && r.Num().IsInt64() && r.Num().Int64() < min {
						c.dropped = true
					}
					out = append(out, c)
				}
			case `"outcome"`:
				for _, v := range []string{`"succeeded"`, `"canceled"`, `"Succeeded"`, `""`, `"failed\u0000"`, `null`, `1`} {
					add(fmt.Sprintf("%s data.outcome=%s", kind, v), withData(v), "")
				}
			default:
				for _, v := range textValues {
					add(fmt.Sprintf("%s data.%s=%s", kind, m.name, v), withData(v), "")
				}
			}
		}
		for _, v := range []string{`{}`, `null`, `[]`, `"x"`, `1`, `true`, `{"unknown":1}`} {
			add(fmt.Sprintf("%s data=%s", kind, v), with(top, `"data"`, v), "")
		}
		// Fields of other kinds, and unknown fields, are ignored, whatever they hold.
		for _, v := range []string{`"\u0000"`, `-1`, `0`, `1.5`, `"bogus"`, `null`, `[]`, `1e400`} {
			for _, name := range []string{`"framework"`, `"attempt"`, `"outcome"`, `"duration_ms"`, `"error"`, `"extra"`} {
				d := schemaBaseData[kind]
				if slices.ContainsFunc(d, func(m member) bool { return m.name == name }) {
					continue
				}
				add(fmt.Sprintf("%s data.%s=%s (not of this kind)", kind, name, v),
					with(top, `"data"`, string(render(append(slices.Clone(d), member{name, v})))), "")
			}
			for _, name := range []string{`"extra"`, `"ID"`, `"Data"`, `"id\u0000"`, `"\u2028"`} {
				add(fmt.Sprintf("%s %s=%s (unknown)", kind, name, v), append(slices.Clone(top), member{name, v}), "")
			}
		}
		// A repeated member counts by its last occurrence.
		add(string(kind)+" id twice, bad last", append(slices.Clone(top), member{`"id"`, `""`}), "")
		add(string(kind)+" id twice, good last", append([]member{{`"id"`, `""`}}, top...), "")
	}
	// Whole bodies.
	for _, s := range []string{``, `null`, `[]`, `1`, `"x"`, `{`, `{}`, `{"spec_version":1}`, `{"a":1}{}`} {
		out = append(out, schemaCase{name: "body " + s, body: []byte(s)})
	}
	big := render(append(schemaTop(events.KindQueued, `{}`), member{`"pad"`, quote(strings.Repeat("x", events.MaxBodySize))}))
	out = append(out, schemaCase{name: "body over 64 KiB", body: big, rule: "body_bytes"})
	notUTF8 := bytes.Replace(render(schemaTop(events.KindStarted, `{"framework":"nextjs"}`)), []byte("nextjs"), []byte("next\xffjs"), 1)
	out = append(out, schemaCase{name: "body not UTF-8", body: notUTF8, rule: "body_bytes"})
	return out
}
