// Package emitter publishes build lifecycle events (the contract of
// internal/events) to NATS JetStream for Go services: one call per lifecycle
// step, each validated before anything is sent.
//
// # Durability
//
// A call returns nil only once JetStream has acknowledged the event: the
// stream has stored it (with the server's sync settings; see the README's
// Guarantees) and the returned number is its stream sequence. Every message
// carries the event id in the Nats-Msg-Id header. A publish attempt that
// times out, or that finds no stream listening (no responders, as during a
// stream leader election or a server restart), is retried with capped
// exponential backoff and the SAME id and bytes, so a retry of a publish
// whose ack was lost is dropped by JetStream's duplicate window (2 minutes on
// the BUILDS stream) instead of stored twice; the projector also ignores a
// repeat of an applied id at any age. Publishing an event again with the same
// id is therefore always safe, and the call reports the sequence of the copy
// JetStream kept. An error means the event may or may not be stored: retry
// it with the same event (same id), never with a fresh one.
//
// Invalid input (an *events.InvalidError in the chain; errors.Is(err,
// events.ErrInvalid)) is never sent and never retried.
package emitter

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
)

// Defaults of Options.
const (
	DefaultPrefix  = "builds"
	DefaultTimeout = 5 * time.Second
	DefaultRetries = 3
)

// ErrNoStream is in the chain of a publish whose last attempt found no
// JetStream stream taking its subject: the stream does not exist (the
// projector creates it at start-up), does not cover the subject prefix, or
// JetStream is not enabled on the server.
var ErrNoStream = errors.New("no JetStream stream takes the subject")

// Options configure a Publisher. Zero values take the defaults.
type Options struct {
	// Prefix is the subject prefix (default "builds"): events go to
	// <prefix>.<project_id>.<kind>.
	Prefix string
	// Timeout bounds each attempt's wait for the JetStream ack (default 5s).
	Timeout time.Duration
	// Retries is how many more attempts follow a first one that timed out or
	// found no stream (default 3; negative means none).
	Retries int
	// Logger receives a warning for each retry (default: no logging).
	Logger *zap.Logger
}

// Publisher publishes events to JetStream. It is safe for concurrent use.
type Publisher struct {
	js      jetstream.JetStream
	prefix  string
	timeout time.Duration
	retries int
	log     *zap.Logger
}

// New returns a Publisher that publishes through js.
func New(js jetstream.JetStream, opts Options) *Publisher {
	p := &Publisher{js: js, prefix: opts.Prefix, timeout: opts.Timeout, retries: opts.Retries, log: opts.Logger}
	if p.prefix == "" {
		p.prefix = DefaultPrefix
	}
	if p.timeout <= 0 {
		p.timeout = DefaultTimeout
	}
	switch {
	case p.retries == 0:
		p.retries = DefaultRetries
	case p.retries < 0:
		p.retries = 0
	}
	if p.log == nil {
		p.log = zap.NewNop()
	}
	return p
}

// Prefix is the subject prefix the publisher publishes under.
func (p *Publisher) Prefix() string { return p.prefix }

// Metrics are the fields of a metrics_recorded event; zero values are left
// out of the event.
type Metrics struct {
	Framework      string
	NodeVersion    string
	PackageManager string
	Attempt        int64 // the build's attempt number, 1 or more
}

// Completion is how a build ended.
type Completion struct {
	Outcome    events.Outcome // required: succeeded, failed or canceled
	DurationMS *int64         // nil: unknown
	Error      string         // "": none
}

// Event is an event of the contract (internal/events). Build one with
// NewQueued, NewStarted, NewMetricsRecorded or NewCompleted.
type Event = events.Event

// NewQueued returns a build.queued event for buildID of projectID, with a
// fresh id. A zero at means now.
func NewQueued(projectID, buildID string, at time.Time) Event {
	return events.New(events.KindQueued, projectID, buildID, orNow(at), events.Data{})
}

// NewStarted returns a build.started event; framework "" is left out.
func NewStarted(projectID, buildID string, at time.Time, framework string) Event {
	return events.New(events.KindStarted, projectID, buildID, orNow(at), events.Data{Framework: ptr(framework)})
}

// NewMetricsRecorded returns a build.metrics_recorded event with m.
func NewMetricsRecorded(projectID, buildID string, at time.Time, m Metrics) Event {
	d := events.Data{Framework: ptr(m.Framework), NodeVersion: ptr(m.NodeVersion), PackageManager: ptr(m.PackageManager)}
	if m.Attempt != 0 {
		d.Attempt = &m.Attempt
	}
	return events.New(events.KindMetricsRecorded, projectID, buildID, orNow(at), d)
}

// NewCompleted returns a build.completed event with c.
func NewCompleted(projectID, buildID string, at time.Time, c Completion) Event {
	d := events.Data{Outcome: c.Outcome, DurationMS: c.DurationMS, Error: ptr(c.Error)}
	return events.New(events.KindCompleted, projectID, buildID, orNow(at), d)
}

// Queued publishes NewQueued(projectID, buildID, at) and returns its
// stream sequence.
func (p *Publisher) Queued(ctx context.Context, projectID, buildID string, at time.Time) (uint64, error) {
	return p.Publish(ctx, NewQueued(projectID, buildID, at))
}

// Started publishes NewStarted.
func (p *Publisher) Started(ctx context.Context, projectID, buildID string, at time.Time, framework string) (uint64, error) {
	return p.Publish(ctx, NewStarted(projectID, buildID, at, framework))
}

// MetricsRecorded publishes NewMetricsRecorded.
func (p *Publisher) MetricsRecorded(ctx context.Context, projectID, buildID string, at time.Time, m Metrics) (uint64, error) {
	return p.Publish(ctx, NewMetricsRecorded(projectID, buildID, at, m))
}

// Completed publishes NewCompleted.
func (p *Publisher) Completed(ctx context.Context, projectID, buildID string, at time.Time, c Completion) (uint64, error) {
	return p.Publish(ctx, NewCompleted(projectID, buildID, at, c))
}

// Publish validates ev, publishes it to <prefix>.<project_id>.<kind> with
// Nats-Msg-Id = ev.ID, waits for JetStream's ack and returns the stream
// sequence (of the stored copy, if JetStream dropped this one as a
// duplicate). See the package documentation for retries and durability.
func (p *Publisher) Publish(ctx context.Context, ev events.Event) (uint64, error) {
	ack, err := p.publish(ctx, ev)
	if err != nil {
		return 0, err
	}
	return ack.Sequence, nil
}

// publish is Publish returning the whole ack.
func (p *Publisher) publish(ctx context.Context, ev events.Event) (*jetstream.PubAck, error) {
	body, err := encode(ev)
	if err != nil {
		return nil, err
	}
	subject := events.Subject(p.prefix, ev.ProjectID, ev.Kind())

	attempt := 0
	ack, err := backoff.Retry(ctx, func() (*jetstream.PubAck, error) {
		attempt++
		actx, cancel := context.WithTimeout(ctx, p.timeout)
		defer cancel()
		// A fresh message each attempt (PublishMsg sets its headers); the
		// library's own no-responders retry is off: the backoff here owns it.
		msg := &nats.Msg{Subject: subject, Data: body, Header: nats.Header{}}
		ack, err := p.js.PublishMsg(actx, msg, jetstream.WithMsgID(ev.ID), jetstream.WithRetryAttempts(0))
		if err == nil {
			return ack, nil
		}
		if ctx.Err() != nil || !transient(err) {
			return nil, backoff.Permanent(err)
		}
		return nil, err
	},
		backoff.WithBackOff(retryBackOff()),
		backoff.WithMaxTries(uint(p.retries)+1),
		backoff.WithMaxElapsedTime(0),
		backoff.WithNotify(func(err error, wait time.Duration) {
			p.log.Warn("publish retry", zap.String("id", ev.ID), zap.String("subject", subject),
				zap.Int("attempt", attempt), zap.Duration("wait", wait), zap.Error(err))
		}),
	)
	switch {
	case err == nil:
		return ack, nil
	case noStream(err):
		return nil, fmt.Errorf("publish %s: %w %s (%d attempts): %w", ev.ID, ErrNoStream, subject, attempt, err)
	default:
		return nil, fmt.Errorf("publish %s to %s (%d attempts): %w", ev.ID, subject, attempt, err)
	}
}

// encode validates ev and returns the bytes to send: what every way of
// publishing (JetStream, HTTP) sends, so none sends an event another refuses.
func encode(ev events.Event) ([]byte, error) {
	if err := events.Validate(ev, time.Time{}); err != nil {
		return nil, fmt.Errorf("invalid event: %w", err)
	}
	body, err := ev.Marshal()
	if err != nil {
		return nil, fmt.Errorf("encode event %s: %w", ev.ID, err)
	}
	if len(body) > events.MaxBodySize {
		return nil, fmt.Errorf("invalid event: %w", &events.InvalidError{
			Reason: events.ReasonBodyTooLarge,
			Detail: fmt.Sprintf("encoded event is %d bytes; the limit is %d", len(body), events.MaxBodySize),
		})
	}
	return body, nil
}

// retryBackOff is the wait between attempts of every retried call.
func retryBackOff() backoff.BackOff {
	return &backoff.ExponentialBackOff{
		InitialInterval:     100 * time.Millisecond,
		RandomizationFactor: 0.5,
		Multiplier:          2,
		MaxInterval:         2 * time.Second,
	}
}

// transient reports whether a publish attempt may succeed if repeated with
// the same id: the ack did not come in time, no stream answered, or JetStream
// said it is temporarily unavailable.
func transient(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, nats.ErrTimeout) ||
		noStream(err) ||
		errors.As(err, &apiErr) && apiErr.Code == 503
}

func noStream(err error) bool {
	return errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders)
}

func orNow(t time.Time) time.Time {
	if t.IsZero() {
		return time.Now()
	}
	return t
}

func ptr(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}
