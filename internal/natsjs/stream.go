// Package natsjs is the NATS wiring: the connection (which refuses servers
// older than MinServerVersion), the BUILDS stream and its durable
// consumer, and the consume loop that hands batches of messages to a handler.
package natsjs

import (
	"context"
	"errors"
	"fmt"
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

// layoutKey is the stream metadata key that names its layout (events.Layout).
const layoutKey = "buildstate.layout"

// StreamConfig is the BUILDS stream: file storage, every subject under
// prefix, no age or count limits (the log is the truth and must stay whole for
// replay), and deny delete/purge so no one trims it by accident. A
// partitioned layout adds its subject transform (events.Layout.Transform):
// the partition goes into the stored subject, publishers change nothing.
func StreamConfig(name, prefix string, replicas int, layout events.Layout) jetstream.StreamConfig {
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
	return c
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
	if s, err := js.Stream(ctx, name); err == nil {
		if layout, err = LayoutOf(s.CachedInfo().Config, prefix); err != nil {
			return nil, err
		}
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("ensure stream %s: %w", name, err)
	}
	s, err := js.CreateOrUpdateStream(ctx, StreamConfig(name, prefix, replicas, layout))
	if err != nil {
		return nil, fmt.Errorf("ensure stream %s: %w", name, err)
	}
	return s, nil
}

// ErrLayout is returned by EnsureLayout when the stream is partitioned in
// another way than asked.
var ErrLayout = errors.New("stream layout differs")

// EnsureLayout creates the stream with layout, or updates it to
// StreamConfig with it. A stream of layout p1 (every stream before
// partitions) may become partitioned: the transform applies to messages
// stored from then on, and what was stored before stays under the published
// subjects for the durable that reads them (docs/engine.md §9; switched is
// true the one time this happens). A partitioned stream keeps its count:
// asking for another is ErrLayout, which says what to run.
func EnsureLayout(ctx context.Context, js jetstream.JetStream, name, prefix string, replicas int, layout events.Layout, log *zap.Logger) (s jetstream.Stream, switched bool, err error) {
	if log == nil {
		log = zap.NewNop()
	}
	if old, err := js.Stream(ctx, name); err == nil {
		have, err := LayoutOf(old.CachedInfo().Config, prefix)
		if err != nil {
			return nil, false, err
		}
		switch {
		case have == layout:
		case have.Partitioned():
			return nil, false, fmt.Errorf("%w: stream %s has layout %s (%d partitions), this projector was started with %d: "+
				"run every projector with --partitions %d (a partitioned stream keeps its count: docs/engine.md §9)",
				ErrLayout, name, have.Name(), have.N(), layout.N(), have.N())
		default:
			switched = true
			log.Info("stream layout switched: messages stored from now on carry their partition",
				zap.String("stream", name), zap.String("from", have.Name()), zap.String("to", layout.Name()),
				zap.Uint64("last_seq_before", old.CachedInfo().State.LastSeq))
		}
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, false, fmt.Errorf("ensure stream %s: %w", name, err)
	}
	s, err = js.CreateOrUpdateStream(ctx, StreamConfig(name, prefix, replicas, layout))
	if err != nil {
		return nil, false, fmt.Errorf("ensure stream %s: %w", name, err)
	}
	return s, switched, nil
}

// StreamLayout is the layout of the stream name (p1 if it has no transform).
func StreamLayout(ctx context.Context, js jetstream.JetStream, name, prefix string) (events.Layout, error) {
	s, err := js.Stream(ctx, name)
	if err != nil {
		return events.Layout{}, fmt.Errorf("stream %s: %w", name, err)
	}
	return LayoutOf(s.CachedInfo().Config, prefix)
}
