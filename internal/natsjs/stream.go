// Package natsjs is the NATS wiring: the connection (which refuses servers
// older than MinServerVersion), the BUILDS stream and its durable
// consumer, and the consume loop that hands batches of messages to a handler.
package natsjs

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// DuplicateWindow is how long JetStream remembers a Nats-Msg-Id and drops a
// republish of it. Publishers retry with the same id inside this window; the
// projector also ignores a repeat of an applied id at any age.
const DuplicateWindow = 2 * time.Minute

// StreamConfig is the BUILDS stream: file storage, every subject under
// prefix, no age or count limits (the log is the truth and must stay whole for
// replay), and deny delete/purge so no one trims it by accident.
func StreamConfig(name, prefix string, replicas int) jetstream.StreamConfig {
	if replicas < 1 {
		replicas = 1
	}
	return jetstream.StreamConfig{
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
	}
}

// EnsureStream creates the stream or updates it to StreamConfig.
func EnsureStream(ctx context.Context, js jetstream.JetStream, name, prefix string, replicas int) (jetstream.Stream, error) {
	s, err := js.CreateOrUpdateStream(ctx, StreamConfig(name, prefix, replicas))
	if err != nil {
		return nil, fmt.Errorf("ensure stream %s: %w", name, err)
	}
	return s, nil
}
