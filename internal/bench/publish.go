package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/workload"
)

// Workload describes the events of a scenario.
type Workload struct {
	Seed     int64
	Events   int     // exactly this many messages, duplicates included
	Projects int     // over this many projects
	DupRate  float64 // exact duplicates, as a fraction of the distinct events
	Prefix   string  // project id prefix, default "p-"
	Start    time.Time
}

// Generate returns the workload's events, shuffled: the seeded workload
// with as many builds per project as it takes to reach Events, cut to
// Events (a prefix of a shuffled workload is a shuffled workload).
func (w Workload) Generate() []events.Event {
	start := w.Start
	if start.IsZero() {
		// The same events all day long; every occurred_at is in the past.
		start = time.Now().UTC().Truncate(24 * time.Hour).Add(-workload.Span)
	}
	cfg := workload.Config{Projects: max(w.Projects, 1), DupRate: w.DupRate, Shuffle: true, Start: start, ProjectPrefix: w.Prefix}
	// About 3.3 events per build (lost and unfinished steps included).
	cfg.BuildsPerProject = max(1, int(float64(w.Events)/(3.3*(1+w.DupRate)*float64(cfg.Projects))))
	for {
		evs := workload.Generate(w.Seed, cfg)
		if len(evs) >= w.Events {
			return evs[:w.Events]
		}
		cfg.BuildsPerProject++
	}
}

// Messages encodes events for stream subjects under prefix. An id's first
// copy carries Nats-Msg-Id, later copies do not, so that the duplicates
// reach the projector (as `emitter load` does by default).
func Messages(evs []events.Event, prefix string) ([]*nats.Msg, error) {
	msgs := make([]*nats.Msg, len(evs))
	seen := make(map[string]bool, len(evs))
	for i, ev := range evs {
		body, err := ev.Marshal()
		if err != nil {
			return nil, fmt.Errorf("encode %s: %w", ev.ID, err)
		}
		m := &nats.Msg{Subject: events.Subject(prefix, ev.ProjectID, ev.Kind()), Data: body, Header: nats.Header{}}
		if !seen[ev.ID] {
			m.Header.Set(jetstream.MsgIDHeader, ev.ID)
			seen[ev.ID] = true
		}
		msgs[i] = m
	}
	return msgs, nil
}

// Stream is one stream of a run and its subject prefix.
type Stream struct {
	Name, Prefix string
	Layout       events.Layout
}

// NewStream creates a stream (the projector's configuration) with a name
// and prefix of its own.
func (e *Env) NewStream(ctx context.Context, label string) (Stream, error) {
	layout, err := events.LayoutOf(max(e.Partitions, 1))
	if err != nil {
		return Stream{}, err
	}
	s := Stream{Name: "BENCH_" + label + "_" + randomSuffix(), Prefix: "bench" + label + randomSuffix(), Layout: layout}
	if _, _, err := natsjs.EnsureLayout(ctx, e.js, s.Name, s.Prefix, 1, layout, false, nil); err != nil {
		return Stream{}, err
	}
	return s, nil
}

// Sent is what a publish did: the stream sequence of each message, when
// it was handed to the client and when its JetStream ack came back.
type Sent struct {
	Seqs  []uint64
	Times []time.Time
	Acked []time.Time
	Took  time.Duration // from the first publish to the last ack
}

// Publish sends msgs asynchronously and waits for every ack. rate > 0
// paces them at rate per second (as evenly as a 1 ms clock allows); rate 0
// sends them as fast as the acks allow.
func (e *Env) Publish(ctx context.Context, msgs []*nats.Msg, rate int) (Sent, error) {
	js, err := jetstream.New(e.nc, jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		return Sent{}, fmt.Errorf("publish: %w", err)
	}
	sent := Sent{Seqs: make([]uint64, len(msgs)), Times: make([]time.Time, len(msgs)), Acked: make([]time.Time, len(msgs))}
	ctx, cancel := context.WithCancel(ctx) // on an early return, ends the goroutine below
	defer cancel()
	// The acks come back in order: one goroutine takes them as they come.
	futures := make(chan jetstream.PubAckFuture, len(msgs))
	ackErr := make(chan error, 1)
	go func() { // owner: Publish, which reads ackErr
		for i := range len(msgs) {
			var f jetstream.PubAckFuture
			select {
			case f = <-futures:
			case <-ctx.Done():
				ackErr <- ctx.Err()
				return
			}
			select {
			case ack := <-f.Ok():
				sent.Seqs[i], sent.Acked[i] = ack.Sequence, time.Now()
			case err := <-f.Err():
				ackErr <- fmt.Errorf("publish %d on %s: %w", i, msgs[i].Subject, err)
				return
			case <-ctx.Done():
				ackErr <- ctx.Err()
				return
			}
		}
		ackErr <- nil
	}()
	start := time.Now()
	for i := 0; i < len(msgs); {
		due := len(msgs)
		if rate > 0 {
			due = min(int(float64(rate)*time.Since(start).Seconds())+1, len(msgs))
		}
		for ; i < due; i++ {
			sent.Times[i] = time.Now()
			f, err := js.PublishMsgAsync(msgs[i], jetstream.WithStallWait(time.Minute))
			if err != nil {
				return Sent{}, fmt.Errorf("publish on %s: %w", msgs[i].Subject, err)
			}
			futures <- f
		}
		if i < len(msgs) {
			select {
			case <-ctx.Done():
				return Sent{}, ctx.Err()
			case <-time.After(time.Millisecond):
			}
		}
	}
	if err := <-ackErr; err != nil {
		return Sent{}, err
	}
	sent.Took = time.Since(start)
	return sent, nil
}
