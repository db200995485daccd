package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/events"
)

// runPublish publishes one event and prints its stream sequence. Input is
// validated before anything connects, so invalid input sends nothing.
func runPublish(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("publish", stderr)
	nf := addNATSFlags(fs, getenv)
	typ := fs.String("type", "", "event kind (queued, started, metrics_recorded, completed) or type (build.started); required")
	project := fs.String("project", "", "project id; required")
	build := fs.String("build", "", "build id; required")
	at := fs.String("at", "", "occurred_at, RFC 3339 (default now)")
	data := fs.String("data", "", `the kind's data as a JSON object, e.g. {"outcome":"succeeded","duration_ms":61000}`)
	id := fs.String("id", "", "event id (default a new ULID); publish again with the same id to retry safely")
	timeout := fs.Duration("timeout", emitter.DefaultTimeout, "wait for the JetStream ack, per attempt")
	if err := parse(fs, args); err != nil {
		return err
	}

	ev, err := buildEvent(*typ, *project, *build, *at, *data, *id)
	if err != nil {
		return err
	}

	nc, js, err := nf.connect("buildstate emitter publish", nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	pub := emitter.New(js, emitter.Options{Prefix: nf.prefix, Timeout: *timeout})
	seq, err := pub.Publish(ctx, ev)
	if errors.Is(err, emitter.ErrNoStream) {
		return fmt.Errorf("%w %s: start the projector (it creates the stream) or check that --subject-prefix "+
			"(BUILDS_SUBJECT_PREFIX, now %q) matches the stream's subjects; event %s was not published",
			emitter.ErrNoStream, events.Subject(nf.prefix, ev.ProjectID, ev.Kind()), nf.prefix, ev.ID)
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, seq)
	return nil
}

// dataFields are the data fields each kind has.
var dataFields = map[events.Kind][]string{
	events.KindQueued:          nil,
	events.KindStarted:         {"framework"},
	events.KindMetricsRecorded: {"framework", "node_version", "package_manager", "attempt"},
	events.KindCompleted:       {"outcome", "duration_ms", "error"},
}

// buildEvent makes and validates the event the publish flags describe.
func buildEvent(typ, project, build, at, data, id string) (events.Event, error) {
	var missing []string
	for _, f := range []struct{ name, v string }{{"--type", typ}, {"--project", project}, {"--build", build}} {
		if f.v == "" {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return events.Event{}, fmt.Errorf("publish: %s required", strings.Join(missing, ", "))
	}
	kind := events.Kind(typ)
	if !kind.Valid() {
		var ok bool
		if kind, ok = events.KindOfType(typ); !ok {
			return events.Event{}, fmt.Errorf("--type %q: want queued, started, metrics_recorded or completed (or build.<kind>)", typ)
		}
	}
	when := time.Now()
	if at != "" {
		var ok bool
		if when, ok = events.ParseTime(at); !ok { // occurred_at's own rule
			return events.Event{}, fmt.Errorf("--at %q is not an RFC 3339 time like 2026-11-26T20:00:00Z", at)
		}
	}
	d, err := parseData(kind, data)
	if err != nil {
		return events.Event{}, err
	}
	ev := events.New(kind, project, build, when, d)
	if id != "" {
		ev.ID = id
	}
	if err := events.Validate(ev, time.Time{}); err != nil {
		return events.Event{}, fmt.Errorf("invalid event: %w", err)
	}
	return ev, nil
}

// parseData reads --data strictly: a JSON object with only the kind's fields.
func parseData(kind events.Kind, s string) (events.Data, error) {
	var d events.Data
	if strings.TrimSpace(s) == "" {
		return d, nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal([]byte(s), &fields); err != nil || fields == nil {
		return d, fmt.Errorf("--data %q is not a JSON object", s)
	}
	for name := range fields {
		if !slices.Contains(dataFields[kind], name) {
			want := "no data"
			if fs := dataFields[kind]; len(fs) > 0 {
				want = "only " + strings.Join(fs, ", ")
			}
			return d, fmt.Errorf("--data: %q is not a field of %s (it takes %s)", name, kind.Type(), want)
		}
	}
	// The values as the contract reads them (61000.0 is an integer);
	// buildEvent's Validate then checks their ranges.
	d, err := events.DecodeData(kind, []byte(s))
	if err != nil {
		return d, fmt.Errorf("--data: %w", err)
	}
	return d, nil
}
