// Package natsjs is the NATS wiring: the connection (which refuses servers
// older than MinServerVersion), the BUILDS stream and its durable
// consumer, and the consume loop that hands batches of messages to a handler.
package natsjs

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
)

// DuplicateWindow is how long JetStream remembers a Nats-Msg-Id and drops a
// republish of it. Publishers retry with the same id inside this window; the
// projector also ignores a repeat of an applied id at any age.
const DuplicateWindow = 2 * time.Minute

// layoutKey is the stream metadata key that names its layout (events.Layout);
// formerKey lists the partitioned layouts it had before (a repartition),
// whose stored forms it still holds.
const (
	layoutKey = "buildstate.layout"
	formerKey = "buildstate.former_layouts"
)

// StreamConfig is the BUILDS stream: file storage, every subject under
// prefix, no age or count limits (the log is the truth and must stay whole for
// replay), and deny delete/purge so no one trims it by accident. A
// partitioned layout adds its subject transform (events.Layout.Transform):
// the partition goes into the stored subject, publishers change nothing;
// former are the partitioned layouts it had before (metadata: replay reads
// their stored forms too).
func StreamConfig(name, prefix string, replicas int, layout events.Layout, former ...events.Layout) jetstream.StreamConfig {
	if replicas < 1 {
		replicas = 1
	}
	c := jetstream.StreamConfig{
		Name:        name,
		Description: "build lifecycle events (buildstate contract v1)",
		Subjects:    []string{prefix + ".>"},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		MaxMsgs:     -1,
		MaxBytes:    -1,
		MaxAge:      0,
		Discard:     jetstream.DiscardOld,
		Duplicates:  DuplicateWindow,
		Replicas:    replicas,
		DenyDelete:  true,
		DenyPurge:   true,
		Metadata:    map[string]string{layoutKey: layout.Name()},
	}
	if layout.Partitioned() {
		src, dst := layout.Transform(prefix)
		c.SubjectTransform = &jetstream.SubjectTransformConfig{Source: src, Destination: dst}
	}
	var names []string
	for _, l := range former {
		if l.Partitioned() && l != layout && !slices.Contains(names, l.Name()) {
			names = append(names, l.Name())
		}
	}
	if len(names) > 0 {
		c.Metadata[formerKey] = strings.Join(names, ",")
	}
	return c
}

// FormerLayouts reads the partitioned layouts a stream had before its
// current one (StreamConfig's former).
func FormerLayouts(c jetstream.StreamConfig) ([]events.Layout, error) {
	var out []events.Layout
	for name := range strings.SplitSeq(c.Metadata[formerKey], ",") {
		if name == "" {
			continue
		}
		l, err := events.ParseLayout(name)
		if err != nil {
			return nil, fmt.Errorf("stream %s metadata %s: %w", c.Name, formerKey, err)
		}
		out = append(out, l)
	}
	return out, nil
}

// LayoutOf reads a stream's layout from its subject transform: none is p1.
func LayoutOf(c jetstream.StreamConfig, prefix string) (events.Layout, error) {
	if c.SubjectTransform == nil || c.SubjectTransform.Destination == "" {
		return events.Layout{Partitions: 1}, nil
	}
	name, _, _ := strings.Cut(c.SubjectTransform.Destination, ".")
	if l, err := events.ParseLayout(name); err == nil {
		src, dst := l.Transform(prefix)
		if c.SubjectTransform.Source == src && c.SubjectTransform.Destination == dst {
			return l, nil
		}
	}
	return events.Layout{}, fmt.Errorf("stream %s has a subject transform buildstate did not make (%s → %s)",
		c.Name, c.SubjectTransform.Source, c.SubjectTransform.Destination)
}

// EnsureStream creates the stream (layout p1) or updates it to StreamConfig,
// keeping the layout it has: publishers, the demo and the bench call it, and
// only the projector chooses the layout (EnsureLayout).
func EnsureStream(ctx context.Context, js jetstream.JetStream, name, prefix string, replicas int) (jetstream.Stream, error) {
	layout := events.Layout{Partitions: 1}
	var former []events.Layout
	if s, err := js.Stream(ctx, name); err == nil {
		if layout, former, err = streamLayouts(s.CachedInfo().Config, prefix); err != nil {
			return nil, err
		}
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("ensure stream %s: %w", name, err)
	}
	s, err := js.CreateOrUpdateStream(ctx, StreamConfig(name, prefix, replicas, layout, former...))
	if err != nil {
		return nil, fmt.Errorf("ensure stream %s: %w", name, err)
	}
	return s, nil
}

func streamLayouts(c jetstream.StreamConfig, prefix string) (events.Layout, []events.Layout, error) {
	l, err := LayoutOf(c, prefix)
	if err != nil {
		return l, nil, err
	}
	former, err := FormerLayouts(c)
	return l, former, err
}

// ErrLayout is returned by EnsureLayout when the stream is partitioned in
// another way than asked.
var ErrLayout = errors.New("stream layout differs")

// Switch is a change of a stream's layout made by EnsureLayout.
type Switch struct {
	From, To events.Layout
	LastSeq  uint64 // the stream's last sequence before the switch
}

// Repartition is whether a switch leaves messages under a partitioned
// layout's stored form (which a drain then applies: DrainConsumerConfig).
func (s *Switch) Repartition() bool { return s != nil && s.From.Partitioned() }

// EnsureLayout creates the stream with layout, or updates it to
// StreamConfig with it. A stream of layout p1 (every stream before
// partitions) may become partitioned: the transform applies to messages
// stored from then on, and what was stored before stays under the published
// subjects for the durable that reads them (docs/engine.md §9). A
// partitioned stream keeps its count unless repartition: asking for another
// is ErrLayout, which says what to run; with repartition the transform
// changes (to none for p1), and the earlier layout is kept in the stream's
// metadata (FormerLayouts), as what it stored stays in its form. sw reports
// a switch (nil: none).
func EnsureLayout(ctx context.Context, js jetstream.JetStream, name, prefix string, replicas int, layout events.Layout, repartition bool, log *zap.Logger) (s jetstream.Stream, sw *Switch, err error) {
	if log == nil {
		log = zap.NewNop()
	}
	var former []events.Layout
	if old, err := js.Stream(ctx, name); err == nil {
		have, was, err := streamLayouts(old.CachedInfo().Config, prefix)
		if err != nil {
			return nil, nil, err
		}
		former = was
		switch {
		case have == layout:
		case have.Partitioned() && !repartition:
			return nil, nil, fmt.Errorf("%w: stream %s has layout %s (%d partitions), this projector was started with %d: "+
				"run every projector with --partitions %d, or, to change the count, stop them all and start one with "+
				"--partitions %d --repartition (docs/engine.md §9)",
				ErrLayout, name, have.Name(), have.N(), layout.N(), have.N(), layout.N())
		default:
			sw = &Switch{From: have, To: layout, LastSeq: old.CachedInfo().State.LastSeq}
			former = append(former, have)
		}
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, nil, fmt.Errorf("ensure stream %s: %w", name, err)
	}
	s, err = js.CreateOrUpdateStream(ctx, StreamConfig(name, prefix, replicas, layout, former...))
	if err != nil {
		return nil, nil, fmt.Errorf("ensure stream %s: %w", name, err)
	}
	if sw != nil {
		log.Info("stream layout switched: messages stored from now on carry their partition in the new layout",
			zap.String("stream", name), zap.String("from", sw.From.Name()), zap.String("to", sw.To.Name()),
			zap.Uint64("last_seq_before", sw.LastSeq))
	}
	return s, sw, nil
}

// StreamLayout is the layout of the stream name (p1 if it has no
// transform), and the partitioned layouts it had before (FormerLayouts).
func StreamLayout(ctx context.Context, js jetstream.JetStream, name, prefix string) (events.Layout, []events.Layout, error) {
	s, err := js.Stream(ctx, name)
	if err != nil {
		return events.Layout{}, nil, fmt.Errorf("stream %s: %w", name, err)
	}
	return streamLayouts(s.CachedInfo().Config, prefix)
}
