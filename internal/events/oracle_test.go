package events

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// The differential tests: Decode, Validate, ParseSubject, ValidProjectID and
// Digest must behave exactly as the reference implementation (v1_test.go)
// did, on valid input and on every kind of bad input.

var oracleStoredAt = time.Date(2026, 11, 26, 20, 30, 0, 0, time.UTC)

// kv is one "name": value of a JSON object, both as raw JSON text.
type kv struct{ name, value string }

func object(ms []kv) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, m := range ms {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(m.name + ":" + m.value)
	}
	b.WriteByte('}')
	return b.String()
}

// baseData is a valid data object of each kind with every field of its kind.
var baseData = map[Kind][]kv{
	KindQueued:  {},
	KindStarted: {{`"framework"`, `"nextjs"`}},
	KindMetricsRecorded: {{`"framework"`, `"remix"`}, {`"node_version"`, `"22.1"`}, {`"package_manager"`, `"pnpm"`},
		{`"attempt"`, `2`}},
	KindCompleted: {{`"outcome"`, `"failed"`}, {`"duration_ms"`, `61000`}, {`"error"`, `"exit 1"`}},
}

func baseTop(kind Kind, data string) []kv {
	return []kv{{`"spec_version"`, `1`}, {`"id"`, `"01JD0000000000000000000001"`}, {`"type"`, `"` + kind.Type() + `"`},
		{`"project_id"`, `"p-42"`}, {`"build_id"`, `"b-9001"`}, {`"occurred_at"`, `"2026-11-26T20:00:00.123Z"`},
		{`"data"`, data}}
}

// trickyValues are JSON values to put in place of a kv's value.
var trickyValues = []string{
	`1`, `2`, `0`, `-1`, `-0`, `1.0`, `1.5`, `1e0`, `1E2`, `1e2`, `100`, `1e-2`, `0.0`, `-0.0`,
	`9223372036854775807`, `9223372036854775808`, `-9223372036854775808`, `-9223372036854775809`,
	`18446744073709551616`, `1e400`, `123456789012345678901234567890`,
	`"1"`, `"3"`, `"x"`, `""`, `" "`, `"a\u0000b"`, `"a\nb"`, `"a\tb"`, `"\u007f"`, `"\ud800"`, `"\udc00x"`,
	`"\ud800\udc00"`, `"\ud800\ud800\udc00"`, `"\ud83d\ude00"`, `"é"`, `"\u00e9"`, `"\/"`, `"<&>"`, `"\u2028"`,
	`null`, `true`, `false`, `[]`, `[1]`, `{}`, `{"a":1}`, `{"framework":"x"}`,
	`"build.started"`, `"build.queued"`, `"build.completed"`, `"build.metrics_recorded"`, `"build.Started"`,
	`"p-42"`, `"p 42"`, `"succeeded"`, `"canceled"`, `"Succeeded"`,
	`"2026-11-26T20:00:00Z"`, `"2026-11-26T21:30:00.000001Z"`, `"0000-01-01T00:00:00+01:00"`,
	`"9999-12-31T23:59:59Z"`, `"2026-11-26T20:00:00"`, `"2026-11-26T20:00:00.123456789+00:00"`,
	`61000.0`, `-1.0`, `2.50e1`, `1.5e-1`, `-0e99999999`, `1e99999999`, `1e-99999999`, `10000000000000000000e-1`,
	`9223372036854775807.0`, `-9223372036854775808e0`, `0.00000000000000000001e20`,
	`"2026-11-26t20:00:00z"`, `"2026-11-26T20:00:00,5Z"`, `"2016-12-31T23:59:60Z"`, `"2026-11-26T2:00:00Z"`,
	`"2026-11-26T20:00:00+24:00"`, `"2026-11-26T20:00:00+23:60"`, `"2026-11-26T20:00:00.Z"`, `"2026-02-29T20:00:00Z"`,
	`"2026-11-26T20:00:00.1234567890123z"`, `"next\u0000"`,
	` 1 `, "\t\"x\"\n", `"` + strings.Repeat("i", 128) + `"`, `"` + strings.Repeat("i", 129) + `"`,
	`"` + strings.Repeat("a", 128) + `"`,
}

// nameVariants are other spellings of a kv name that must not, or
// must, match it.
func nameVariants(name string) []string {
	bare := strings.Trim(name, `"`)
	out := []string{`"` + strings.ToUpper(bare) + `"`, `"` + strings.ToUpper(bare[:1]) + bare[1:] + `"`, `"` + bare + ` "`}
	// The same name with an escaped first letter: the same kv.
	out = append(out, `"\u00`+strings.ToLower(string("0123456789abcdef"[bare[0]>>4])+string("0123456789abcdef"[bare[0]&15]))+bare[1:]+`"`)
	if strings.Contains(bare, "_") {
		out = append(out, `"`+strings.ReplaceAll(bare, "_", "")+`"`)
	}
	return out
}

// mutations returns each way of changing one kv of ms to make an object.
func mutations(ms []kv, extraNames []string, each func(string)) {
	with := func(i int, m ...kv) string {
		c := append(append(append([]kv(nil), ms[:i]...), m...), ms[i+1:]...)
		return object(c)
	}
	for i, m := range ms {
		each(with(i)) // deleted
		for _, v := range trickyValues {
			each(with(i, kv{m.name, v}))
			each(with(i, kv{m.name, v}, m)) // duplicate: the good one last
			each(with(i, m, kv{m.name, v})) // duplicate: the tricky one last
		}
		for _, n := range nameVariants(m.name) {
			each(with(i, kv{n, m.value}))
			each(with(i, m, kv{n, `"other"`}))
			each(with(i, kv{n, `[`}))
		}
	}
	for _, n := range extraNames {
		for _, v := range trickyValues {
			each(object(append(append([]kv(nil), ms...), kv{n, v})))
		}
	}
}

var dataNames = []string{`"framework"`, `"node_version"`, `"package_manager"`, `"attempt"`, `"outcome"`, `"duration_ms"`, `"error"`}

// trickyBodies is every body the differential test decodes.
func trickyBodies() []string {
	var out []string
	add := func(s string) { out = append(out, s) }
	for _, kind := range Kinds {
		data := object(baseData[kind])
		mutations(baseTop(kind, data), []string{`"extra"`, `"Data"`, `"\ud800"`, `"\u0069\u0064"`, `"id\u0000"`,
			`"\u0064ata"`}, add)
		mutations(baseData[kind], append([]string{`"\u0066ramework"`, `"attempt\u0000"`, `"\udc00"`}, dataNames...),
			func(d string) { add(object(baseTop(kind, d))) })
		top := object(baseTop(kind, data))
		for _, ws := range []string{" ", "\t", "\n", "\r", "\f", "\v", "\u00a0", "\ufeff", "\u0085"} {
			add(ws + top)
			add(top + ws)
			add(strings.Replace(top, ",", ws+","+ws, 1))
		}
		for _, tail := range []string{"{}", "x", "null", ",", "}", "]", "0", `""`} {
			add(top + tail)
			add(top + " " + tail)
		}
		for n := 1; n < len(top); n += 7 {
			add(top[:n])
		}
		for _, depth := range []int{9998, 9999, 10000, 10001} {
			deep := strings.Repeat("[", depth) + strings.Repeat("]", depth)
			add(object(append(baseTop(kind, data), kv{`"extra"`, deep})))
			add(object(baseTop(kind, object(append(append([]kv(nil), baseData[kind]...), kv{`"extra"`, deep})))))
			deepObj := strings.Repeat(`{"a":`, depth-1) + "{}" + strings.Repeat("}", depth-1)
			add(object(append(baseTop(kind, data), kv{`"extra"`, deepObj})))
		}
	}
	for _, s := range []string{``, ` `, `null`, ` null `, `[]`, `[{}]`, `"x"`, `1`, `true`, `false`, `{`, `}`, `{}`, `{ }`,
		`{"spec_version":1}`, `{"spec_version":1,}`, `{,}`, `{"a"}`, `{"a":}`, `{'a':1}`, `{a:1}`, `{"a":1 "b":2}`,
		`{"a":01}`, `{"a":.5}`, `{"a":+1}`, `{"a":NaN}`, `{"a":Infinity}`, `{"a":"\x"}`, `{"a":"\u12"}`, "{\"a\":\"\x01\"}",
		`{"a":tru}`, `{"a":nul}`, `{"a":[1,]}`, `{"a":1}//`, `/**/{}`} {
		add(s)
	}
	return out
}

// checkSame fails t if Decode and the reference decode body differently:
// the same event, or the same reason and detail. The one difference allowed
// is the wording of a syntax error's detail, which is the JSON decoder's own.
func checkSame(t *testing.T, subject string, body []byte) {
	t.Helper()
	checkSameMode(t, subject, body, true)
	if subject == "" { // the two readings differ in data only: one subject is enough
		checkSameMode(t, subject, body, false)
	}
}

func checkSameMode(t *testing.T, subject string, body []byte, tolerant bool) {
	t.Helper()
	want, werr := decodeV1("builds", subject, body, oracleStoredAt, tolerant)
	decode := DecodeStrict
	if tolerant {
		decode = Decode
	}
	got, gerr := decode("builds", subject, body, oracleStoredAt)
	if ReasonOf(werr) != ReasonOf(gerr) || (werr == nil) != (gerr == nil) {
		t.Fatalf("Decode(%q, %.300q) = %v; the reference gives %v", subject, body, gerr, werr)
	}
	if werr != nil {
		if ReasonOf(gerr) == "" {
			t.Fatalf("Decode(%q, %.300q) = %v; want an *InvalidError", subject, body, gerr)
		}
		if gerr.Error() != werr.Error() && json.Valid(body) && !referenceCanSay(subject, body, gerr.Error(), tolerant) {
			t.Fatalf("Decode(%q, %.300q) = %v; the reference gives %v", subject, body, gerr, werr)
		}
		if !reflect.DeepEqual(got, Event{}) {
			t.Fatalf("Decode(%q, %.300q) refused the body but returned %+v", subject, body, got)
		}
		return
	}
	if !reflect.DeepEqual(got, want) || got.Digest() != digestV1(want) {
		t.Fatalf("Decode(%q, %.300q) = %s; the reference gives %s", subject, body, dump(got), dump(want))
	}
}

// referenceCanSay reports whether the reference gives the error msg for
// body in some run: with several fields of the wrong type it reported one
// of them, in random order (it ranged over a map).
func referenceCanSay(subject string, body []byte, msg string, tolerant bool) bool {
	for range 200 {
		if _, err := decodeV1("builds", subject, body, oracleStoredAt, tolerant); err != nil && err.Error() == msg {
			return true
		}
	}
	return false
}

func dump(ev Event) string {
	d := ev.Data
	return fmt.Sprintf("%q %q %q %q %v framework=%s node=%s pm=%s attempt=%s outcome=%q duration=%s error=%s dropped=%v",
		ev.ID, ev.Type, ev.ProjectID, ev.BuildID, ev.OccurredAt, ptrString(d.Framework), ptrString(d.NodeVersion),
		ptrString(d.PackageManager), ptrString(d.Attempt), d.Outcome, ptrString(d.DurationMS), ptrString(d.Error), ev.Dropped)
}

func ptrString[T any](p *T) string {
	if p == nil {
		return "nil"
	}
	return fmt.Sprintf("&%#v", *p)
}

func TestDecodeMatchesReference(t *testing.T) {
	t.Parallel()
	bodies := trickyBodies()
	accepted := 0
	for _, b := range bodies {
		body := []byte(b)
		kinds := []string{""}
		for _, k := range Kinds {
			kinds = append(kinds, Subject("builds", "p-42", k))
		}
		for _, subject := range kinds {
			checkSame(t, subject, body)
		}
		if _, err := decodeV1("builds", "", body, oracleStoredAt, true); err == nil {
			accepted++
		}
	}
	t.Logf("%d bodies, %d accepted", len(bodies), accepted)
}

// FuzzDecodeMatchesReference is the differential test on random input:
//
//	go test ./internal/events -run '^$' -fuzz FuzzDecodeMatchesReference -fuzztime 30s
func FuzzDecodeMatchesReference(f *testing.F) {
	for i, b := range trickyBodies() {
		if i%5 == 0 && len(b) < 1000 {
			f.Add(Subject("builds", "p-42", Kinds[i%len(Kinds)]), []byte(b))
		}
	}
	f.Fuzz(func(t *testing.T, subject string, body []byte) {
		checkSame(t, subject, body)
		checkSameMode(t, subject, body, false)
	})
}

func TestValidProjectIDMatchesReference(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(1, 2))
	alphabet := []byte("aZ09_-. \n\x00\x7f\xc3\xa9\xff/")
	check := func(id string) {
		if got, want := ValidProjectID(id), validProjectIDV1(id); got != want {
			t.Fatalf("ValidProjectID(%q) = %v; the reference gives %v", id, got, want)
		}
	}
	for _, id := range []string{"", "a", "p-42", "AZaz09_-", strings.Repeat("a", 128), strings.Repeat("a", 129), "a\n", "\na",
		"pé", "p.42", "p 42", "\xff", "a\x00"} {
		check(id)
	}
	for range 20000 {
		b := make([]byte, r.IntN(131))
		for i := range b {
			if r.IntN(20) == 0 {
				b[i] = alphabet[r.IntN(len(alphabet))]
			} else {
				b[i] = alphabet[r.IntN(6)]
			}
		}
		check(string(b))
	}
}

func TestValidateMatchesReference(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 11, 26, 20, 0, 0, 0, time.UTC)
	one, zero, neg := int64(1), int64(0), int64(-1)
	var evs []Event
	for _, kind := range append(Kinds, "deployed") {
		for _, d := range []Data{{}, {Attempt: &one}, {Attempt: &zero}, {Outcome: OutcomeSucceeded}, {Outcome: "x"},
			{Outcome: OutcomeFailed, DurationMS: &neg}, {Outcome: OutcomeCanceled, DurationMS: &zero}} {
			for _, id := range []string{"", "e", strings.Repeat("é", 128), strings.Repeat("é", 129), "a\x00", "\xff", "a b"} {
				for _, when := range []time.Time{{}, at, oracleStoredAt.Add(time.Hour), oracleStoredAt.Add(time.Hour + 1),
					time.Date(0, 12, 31, 23, 0, 0, 0, time.UTC), time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)} {
					for _, project := range []string{"p-1", "", "p.1"} {
						ev := New(kind, project, "b-1", when, d)
						ev.ID = id
						evs = append(evs, ev)
					}
				}
			}
		}
	}
	for _, ev := range evs {
		for _, sv := range []int{1, 2} {
			ev.SpecVersion = sv
			got, want := Validate(ev, oracleStoredAt), validateV1(ev, oracleStoredAt)
			if (got == nil) != (want == nil) || got != nil && got.Error() != want.Error() {
				t.Fatalf("Validate(%+v) = %v; the reference gives %v", ev, got, want)
			}
			if got, want := ev.Digest(), digestV1(ev); got != want {
				t.Fatalf("Digest(%+v) differs from the reference", ev)
			}
		}
	}
}

func TestParseSubjectMatchesReference(t *testing.T) {
	t.Parallel()
	for _, prefix := range []string{"builds", "", "a.b", "builds."} {
		for _, subject := range []string{"", ".", "builds", "builds.", "builds..", "builds.p.started", "builds.p.started.x",
			"builds.p", "a.b.p.queued", "buildsx.p.queued", ".p.queued", "builds..queued", "builds.p.", "builds.p.q.r.s"} {
			p1, k1, e1 := ParseSubject(prefix, subject)
			p2, k2, e2 := parseSubjectV1(prefix, subject)
			if p1 != p2 || k1 != k2 || (e1 == nil) != (e2 == nil) || e1 != nil && e1.Error() != e2.Error() {
				t.Fatalf("ParseSubject(%q, %q) = %q, %q, %v; the reference gives %q, %q, %v", prefix, subject, p1, k1, e1, p2, k2, e2)
			}
		}
	}
}

// The bodies must be valid UTF-8 for the JSON rules to be reached at all.
func TestTrickyBodiesAreUTF8(t *testing.T) {
	for _, b := range trickyBodies() {
		if !utf8.ValidString(b) || bytes.Contains([]byte(b), []byte{0xff}) {
			t.Fatalf("tricky body %.100q is not UTF-8", b)
		}
	}
}

func TestPrintableMatchesReference(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(3, 4))
	check := func(s string) {
		if got, want := printable(s), printableV1(s); got != want {
			t.Fatalf("printable(%q) = %v; the reference gives %v", s, got, want)
		}
	}
	for c := range 256 {
		check(string([]byte{byte(c)}))
		check("a" + string([]byte{byte(c)}) + "b")
		check(strings.Repeat(string([]byte{byte(c)}), 128))
		check(strings.Repeat(string([]byte{byte(c)}), 129))
	}
	pieces := []string{"a", " ", "~", "\x7f", "\x00", "\t", "é", "\u00a0", "\u2028", "\ufffd", "\U0001F600", "\xff", "\xc3", "\u200b"}
	for range 20000 {
		var b strings.Builder
		for n := r.IntN(140); n > 0; n-- {
			if r.IntN(30) == 0 {
				b.WriteString(pieces[r.IntN(len(pieces))])
			} else {
				b.WriteString(pieces[r.IntN(3)])
			}
		}
		check(b.String())
	}
}

func TestDigestMatchesReference(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(5, 6))
	strs := []*string{nil, new(string), ptrTo("x"), ptrTo("é\xff\u2028")}
	nums := []*int64{nil, ptrTo(int64(0)), ptrTo(int64(-1)), ptrTo(int64(99)), ptrTo(int64(100)), ptrTo(int64(1) << 62), ptrTo(int64(-1) << 63)}
	zones := []*time.Location{time.UTC, time.FixedZone("X", -7*3600), time.FixedZone("Y", 5*3600+1800)}
	for range 20000 {
		ev := Event{
			SpecVersion: []int{1, 0, -5, math.MaxInt}[r.IntN(4)],
			ID:          []string{"", "e-1", "é"}[r.IntN(3)],
			Type:        []string{"build.queued", "build.started", "build.metrics_recorded", "build.completed", "x"}[r.IntN(5)],
			ProjectID:   "p-1",
			BuildID:     "b",
			OccurredAt:  time.Unix(r.Int64N(1<<36)-1<<35, r.Int64N(1e9)).In(zones[r.IntN(len(zones))]),
			Data: Data{Framework: strs[r.IntN(len(strs))], NodeVersion: strs[r.IntN(len(strs))],
				PackageManager: strs[r.IntN(len(strs))], Attempt: nums[r.IntN(len(nums))],
				Outcome: []Outcome{"", OutcomeFailed}[r.IntN(2)], DurationMS: nums[r.IntN(len(nums))], Error: strs[r.IntN(len(strs))]},
		}
		if ev.Digest() != digestV1(ev) {
			t.Fatalf("Digest(%+v) differs from the reference", ev)
		}
	}
}

func ptrTo[T any](v T) *T { return &v }
