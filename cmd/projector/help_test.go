package main

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/internal/when"
)

// runOut runs the command in-process with an environment that points at
// nothing but databaseURL, and returns stdout, stderr and its error.
func runOut(databaseURL string, args ...string) (string, string, error) {
	var out, errb bytes.Buffer
	getenv := func(k string) string {
		if k == "DATABASE_URL" {
			return databaseURL
		}
		return ""
	}
	err := run(context.Background(), append([]string{"projector"}, args...), getenv, &out, &errb)
	return out.String(), errb.String(), err
}

func TestHelp(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		out, errOut, err := runOut("", args...)
		if err != nil || errOut != "" {
			t.Errorf("projector %v = %v, stderr %q; want nil, nothing on stderr", args, err, errOut)
		}
		for _, c := range commands {
			if !strings.Contains(out, "\n  "+c.name+" ") {
				t.Errorf("projector %v does not list %s:\n%s", args, c.name, out)
			}
		}
	}
	for _, tt := range []struct {
		args []string
		want []string
	}{
		{[]string{"help", "status"}, []string{"usage: projector status PROJECT_ID", "-json", "-database-url"}},
		{[]string{"status", "--help"}, []string{"usage: projector status PROJECT_ID", "-json"}},
		{[]string{"run", "--help"}, []string{"usage: projector run", "-http-addr"}},
		{[]string{"--help", "ignored"}, []string{"commands:"}},
		{[]string{"dead-letters", "retry", "-h"}, []string{"usage: projector dead-letters", "-reason"}},
		{[]string{"help", "verify"}, []string{"-no-rebuild", "-max-diff"}},
		{[]string{"rebuild", "-help"}, []string{"-dry-run"}},
	} {
		out, errOut, err := runOut("", tt.args...)
		if err != nil || errOut != "" {
			t.Errorf("projector %v = %v, stderr %q; want nil, help on stdout", tt.args, err, errOut)
		}
		for _, w := range tt.want {
			if !strings.Contains(out, w) {
				t.Errorf("projector %v output lacks %q:\n%s", tt.args, w, out)
			}
		}
	}
	if _, _, err := runOut("", "help", "bogus"); err == nil || !strings.Contains(err.Error(), `unknown command "bogus"`) {
		t.Errorf("projector help bogus = %v; want unknown command", err)
	}
	if _, errOut, err := runOut("", "status", "-bogus"); err == nil || !strings.Contains(errOut, "usage: projector status") {
		t.Errorf("projector status -bogus = %v, stderr %q; want an error with the usage on stderr", err, errOut)
	}
}

func TestDeadLettersUnknownReason(t *testing.T) {
	t.Parallel()
	_, _, err := runOut("postgres://nobody@127.0.0.1:1/none", "dead-letters", "--reason", "bogus")
	if err == nil || !strings.Contains(err.Error(), `unknown reason "bogus"`) {
		t.Fatalf("dead-letters --reason bogus = %v; want unknown reason", err)
	}
	for _, r := range events.Reasons {
		if !strings.Contains(err.Error(), string(r)) {
			t.Errorf("the error does not list reason %s: %v", r, err)
		}
	}
}

// Only run and migrate change the schema: the other commands refuse a
// database without it, or at another version, and say what to do.
func TestCommandsNeedTheSchema(t *testing.T) {
	t.Parallel()
	dbURL := testenv.Database(t)
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	dbName := strings.TrimPrefix(u.Path, "/")
	pool, err := projector.OpenPool(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	hasSchema := func() bool {
		var ok bool
		if err := pool.QueryRow(context.Background(), `SELECT to_regclass('public.schema_version') IS NOT NULL`).Scan(&ok); err != nil {
			t.Fatal(err)
		}
		return ok
	}
	readers := [][]string{{"status", "p-43"}, {"dead-letters"}, {"dead-letters", "retry"}, {"verify", "--no-rebuild"}, {"rebuild"}}
	want := fmt.Sprintf("no buildstate schema in %s (run projector migrate, or check DATABASE_URL)", dbName)
	for _, args := range readers {
		if _, _, err := runOut(dbURL, args...); err == nil || err.Error() != want {
			t.Errorf("projector %v on an empty database = %v; want %q", args, err, want)
		}
	}
	if hasSchema() {
		t.Fatalf("a read-only command created the schema")
	}
	if out, _, err := runOut(dbURL, "migrate"); err != nil || !strings.Contains(out, "migrations applied") {
		t.Fatalf("migrate = %q, %v", out, err)
	}
	if _, _, err := runOut(dbURL, "dead-letters"); err != nil {
		t.Errorf("dead-letters after migrate = %v; want nil", err)
	}
	current := projection.SchemaVersion()
	for _, tt := range []struct {
		version int
		want    string
	}{
		{current + 5, fmt.Sprintf("the buildstate schema in %s is at version %d, newer than this binary's %d: run a newer projector", dbName, current+5, current)},
		{current - 1, fmt.Sprintf("the buildstate schema in %s is at version %d; this binary needs %d (run projector migrate)", dbName, current-1, current)},
	} {
		if _, err := pool.Exec(context.Background(), `UPDATE schema_version SET version = $1`, tt.version); err != nil {
			t.Fatal(err)
		}
		if _, _, err := runOut(dbURL, "status", "p-43"); err == nil || err.Error() != tt.want {
			t.Errorf("status on schema version %d = %v; want %q", tt.version, err, tt.want)
		}
	}
	if _, err := pool.Exec(context.Background(), `UPDATE schema_version SET version = $1`, current+5); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runOut(dbURL, "migrate"); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("at version %d, newer than this binary's %d", current+5, current)) {
		t.Errorf("migrate on a newer schema = %v; want a refusal naming both versions", err)
	}
}

// status explains in words why the current build is not the newest, and
// prints every time in one format, with its zone.
func TestStatusExplains(t *testing.T) {
	t.Parallel()
	dbURL := testenv.Database(t)
	if _, _, err := runOut(dbURL, "migrate"); err != nil {
		t.Fatal(err)
	}
	pool, err := projector.OpenPool(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	store := projection.New(pool, projection.Options{})
	t0 := time.Now().Add(-time.Hour).Truncate(time.Millisecond)
	dur := int64(61000)
	evs := []events.Event{
		events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{}),
		events.New(events.KindStarted, "p-1", "b-1", t0.Add(time.Second), events.Data{}),
		events.New(events.KindMetricsRecorded, "p-1", "b-1", t0.Add(2*time.Second), events.Data{}),
		events.New(events.KindCompleted, "p-1", "b-1", t0.Add(62*time.Second), events.Data{Outcome: events.OutcomeSucceeded, DurationMS: &dur}),
		events.New(events.KindQueued, "p-1", "b-2", t0.Add(10*time.Minute), events.Data{}),
		events.New(events.KindStarted, "p-1", "b-2", t0.Add(11*time.Minute+500*time.Millisecond), events.Data{}),
	}
	msgs := make([]projection.Message, len(evs))
	for i, ev := range evs {
		body, err := ev.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		msgs[i] = projection.Message{Seq: uint64(i + 1), Subject: events.Subject("builds", "p-1", ev.Kind()), Data: body, StoredAt: time.Now()}
	}
	if _, err := store.Apply(context.Background(), nil, msgs); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := runOut(dbURL, "status", "p-1")
	if err != nil || errOut != "" {
		t.Fatalf("status p-1 = %v, stderr %q", err, errOut)
	}
	for _, want := range []string{
		"status          building",
		"current build   b-1",
		"note: status is that of the newest build, b-2, which has no metrics row yet; the current build, b-1, is the newest build with a metrics row",
		"last started    " + when.Format(t0.Add(11*time.Minute+500*time.Millisecond), time.Local),
		when.Format(t0.Add(62*time.Second), time.Local), // b-1's completion, in the builds table
		when.Format(t0.Add(time.Second), time.Local),    // b-1's start: same format, fractions and all
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status p-1 lacks %q:\n%s", want, out)
		}
	}

}
