package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/workload"
)

// loadResult is what `emitter load` prints.
type loadResult struct {
	Seed         int64   `json:"seed"`
	Mode         string  `json:"mode"`
	Events       int     `json:"events"`       // acknowledged by JetStream
	Duplicates   int     `json:"duplicates"`   // of them, copies of an earlier event of the workload
	Deduplicated int64   `json:"deduplicated"` // acks that JetStream dropped as duplicates
	Seconds      float64 `json:"seconds"`
	EventsPerSec float64 `json:"events_per_second"`
}

// runLoad publishes a seeded workload (internal/workload) asynchronously,
// as a backlog or at a fixed rate, waits for every ack and prints the rate.
func runLoad(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("load", stderr)
	nf := addNATSFlags(fs, getenv)
	stream := fs.String("stream", envOr(getenv, "BUILDS_STREAM", defaultStream), "stream name, created if missing (env BUILDS_STREAM)")
	seed := fs.Int64("seed", 1, "workload seed: the same seed gives the same events")
	projects := fs.Int("projects", 1000, "number of projects")
	builds := fs.Int("builds-per-project", 3, "builds per project (the least, with --max-builds-per-project)")
	maxBuilds := fs.Int("max-builds-per-project", 0, "if greater than --builds-per-project, a random count in between per project")
	dupRate := fs.Float64("dup-rate", 0.05, "exact duplicates added, as a fraction of the distinct events")
	shuffle := fs.Bool("shuffle", true, "publish in random order (false: project by project, in lifecycle order)")
	startAt := fs.String("start", "", "earliest occurred_at, RFC 3339 (default 24h ago); fix it for byte-identical events across runs")
	clean := fs.Bool("clean", false, "no irregular histories (lost steps, corrections, clock skew, overlaps)")
	dedupe := fs.Bool("dedupe-header", false, "send Nats-Msg-Id on duplicate copies too, so JetStream drops those inside its "+
		"duplicate window; by default only an id's first copy has it and the duplicates reach the projector")
	mode := fs.String("mode", "backlog", "backlog (as fast as acks allow) or rate (--rate events/s)")
	rate := fs.Int("rate", 1000, "events per second in rate mode")
	duration := fs.Duration("duration", 0, "stop publishing after this long (0: when the workload is published)")
	maxPending := fs.Int("max-pending", 4096, "most publishes awaiting their ack at once")
	asJSON := fs.Bool("json", false, "print the result as one JSON object")
	if err := parse(fs, args); err != nil {
		return err
	}
	switch {
	case *mode != "backlog" && *mode != "rate":
		return fmt.Errorf("--mode %q: want backlog or rate", *mode)
	case *mode == "rate" && *rate < 1:
		return fmt.Errorf("--rate %d: want at least 1 event/s", *rate)
	case *projects < 1:
		return fmt.Errorf("--projects %d: want at least 1", *projects)
	case *dupRate < 0:
		return fmt.Errorf("--dup-rate %v: want 0 or more", *dupRate)
	case *maxPending < 1:
		return fmt.Errorf("--max-pending %d: want at least 1", *maxPending)
	}

	var from time.Time
	if *startAt != "" {
		var err error
		if from, err = time.Parse(time.RFC3339Nano, *startAt); err != nil {
			return fmt.Errorf("--start %q is not an RFC 3339 time", *startAt)
		}
		if from.After(time.Now().Add(events.MaxClockSkew - workload.Span)) {
			return fmt.Errorf("--start %s: the workload spans %s from it, so it must be at least %s ago", *startAt, workload.Span, workload.Span-events.MaxClockSkew)
		}
	}

	evs := workload.Generate(*seed, workload.Config{
		Projects: *projects, BuildsPerProject: *builds, MaxBuildsPerProject: *maxBuilds,
		DupRate: *dupRate, Shuffle: *shuffle, Clean: *clean, Start: from,
	})
	msgs, dup, err := loadMessages(evs, nf.prefix, *dedupe)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "workload: %d events (%d duplicates) over %d projects, seed %d\n", len(msgs), count(dup), *projects, *seed)

	var (
		acked, deduplicated atomic.Int64
		mu                  sync.Mutex
		failed              []*nats.Msg
		firstErr            error
	)
	nc, js, err := nf.connect("buildstate emitter load", nil,
		jetstream.WithPublishAsyncMaxPending(*maxPending),
		jetstream.WithPublishAsyncTimeout(30*time.Second),
		jetstream.WithPublishAsyncAckHandler(func(_ jetstream.JetStream, _ *nats.Msg, ack *jetstream.PubAck) {
			acked.Add(1)
			if ack.Duplicate {
				deduplicated.Add(1)
			}
		}),
		jetstream.WithPublishAsyncErrHandler(func(_ jetstream.JetStream, m *nats.Msg, err error) {
			mu.Lock()
			defer mu.Unlock()
			failed = append(failed, m)
			if firstErr == nil {
				firstErr = err
			}
		}),
	)
	if err != nil {
		return err
	}
	defer nc.Close()
	if err := ensureStream(ctx, js, *stream, nf.prefix); err != nil {
		return err
	}

	start := time.Now()
	sent, err := publishAll(ctx, js, msgs, *mode, *rate, *duration)
	if err != nil {
		return err
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		return fmt.Errorf("wait for acks: %w", ctx.Err())
	}
	// Publishes that failed (no ack in time, no stream for a moment) go
	// again, one by one, with their headers: a copy with Nats-Msg-Id cannot
	// be stored twice; a duplicate without it might, which only adds one
	// more duplicate.
	mu.Lock()
	retry := failed
	mu.Unlock()
	for _, m := range retry {
		if err := publishSync(ctx, js, m); err != nil {
			if errors.Is(err, jetstream.ErrNoStreamResponse) {
				return fmt.Errorf("no JetStream stream takes subject %s: does stream %s take %s.>? %w", m.Subject, *stream, nf.prefix, err)
			}
			return fmt.Errorf("%d of %d publishes failed (first: %v); retry of one on %s: %w", len(retry), sent, firstErr, m.Subject, err)
		}
		acked.Add(1)
	}
	elapsed := time.Since(start)

	if sent < len(msgs) {
		fmt.Fprintf(stderr, "stopped after %s: published %d of the workload's %d events\n", *duration, sent, len(msgs))
	} else if *mode == "rate" && *duration > 0 && elapsed < *duration {
		fmt.Fprintf(stderr, "the workload ran out after %.1f s; raise --projects for a %s run\n", elapsed.Seconds(), *duration)
	}
	res := loadResult{
		Seed: *seed, Mode: *mode, Events: int(acked.Load()), Duplicates: count(dup[:sent]),
		Deduplicated: deduplicated.Load(), Seconds: elapsed.Seconds(),
	}
	if res.Seconds > 0 {
		res.EventsPerSec = float64(res.Events) / res.Seconds
	}
	if len(retry) > 0 {
		fmt.Fprintf(stderr, "%d publishes were retried (first error: %v)\n", len(retry), firstErr)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(res)
	}
	fmt.Fprintf(stdout, "published %d events (%d duplicates, %d dropped by JetStream) in %.3f s: %.0f events/s\n",
		res.Events, res.Duplicates, res.Deduplicated, res.Seconds, res.EventsPerSec)
	return nil
}

// loadMessages encodes the workload before the clock starts. Each id's first
// copy carries Nats-Msg-Id; later copies (dup[i]) carry it only with dedupe.
func loadMessages(evs []events.Event, prefix string, dedupe bool) (msgs []*nats.Msg, dup []bool, err error) {
	msgs = make([]*nats.Msg, len(evs))
	dup = make([]bool, len(evs))
	seen := make(map[string]bool, len(evs))
	for i, ev := range evs {
		body, err := ev.Marshal()
		if err != nil {
			return nil, nil, fmt.Errorf("encode event %s: %w", ev.ID, err)
		}
		m := &nats.Msg{Subject: events.Subject(prefix, ev.ProjectID, ev.Kind()), Data: body, Header: nats.Header{}}
		dup[i] = seen[ev.ID]
		if !dup[i] || dedupe {
			m.Header.Set(jetstream.MsgIDHeader, ev.ID)
		}
		seen[ev.ID] = true
		msgs[i] = m
	}
	return msgs, dup, nil
}

func count(bs []bool) int {
	n := 0
	for _, b := range bs {
		if b {
			n++
		}
	}
	return n
}

// ensureStream creates the stream if it is missing. An existing stream is
// left as it is: the projector owns its configuration (replicas above all).
func ensureStream(ctx context.Context, js jetstream.JetStream, name, prefix string) error {
	_, err := js.Stream(ctx, name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = natsjs.EnsureStream(ctx, js, name, prefix, 1)
		return err
	}
	if err != nil {
		return fmt.Errorf("look up stream %s: %w", name, err)
	}
	return nil
}

// publishAll sends msgs asynchronously, at most rate per second in rate
// mode, until they are all sent or duration has passed. It returns how many
// it sent.
func publishAll(ctx context.Context, js jetstream.JetStream, msgs []*nats.Msg, mode string, rate int, duration time.Duration) (int, error) {
	start := time.Now()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	sent := 0
	for sent < len(msgs) {
		if err := ctx.Err(); err != nil {
			return sent, fmt.Errorf("publish: %w", err)
		}
		elapsed := time.Since(start)
		if duration > 0 && elapsed >= duration {
			break
		}
		due := len(msgs)
		if mode == "rate" {
			due = min(int(float64(rate)*elapsed.Seconds())+1, len(msgs))
		} else {
			due = min(sent+1000, len(msgs)) // look at the clock and ctx every 1000
		}
		for ; sent < due; sent++ {
			// A full window of pending acks blocks here (up to the stall
			// wait) instead of failing.
			if _, err := js.PublishMsgAsync(msgs[sent], jetstream.WithStallWait(time.Minute)); err != nil {
				return sent, fmt.Errorf("publish on %s: %w", msgs[sent].Subject, err)
			}
		}
		if mode == "rate" && sent < len(msgs) {
			select {
			case <-tick.C:
			case <-ctx.Done():
			}
		}
	}
	return sent, nil
}

// publishSync publishes m again and waits for its ack, a few times.
func publishSync(ctx context.Context, js jetstream.JetStream, m *nats.Msg) error {
	var err error
	for attempt := range 5 {
		if attempt > 0 {
			select {
			case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = js.PublishMsg(actx, &nats.Msg{Subject: m.Subject, Data: m.Data, Header: m.Header})
		cancel()
		if err == nil {
			return nil
		}
	}
	return err
}
