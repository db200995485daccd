package natsjs

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// ConsumerConfig is the projector's durable pull consumer.
func ConsumerConfig(durable, prefix string) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       durable,
		Description:   "buildstate projector",
		AckPolicy:     jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		FilterSubject: prefix + ".>",
		AckWait:       AckWait,
		MaxDeliver:    -1, // never give a message up: invalid ones are dead-lettered by the projector
		MaxAckPending: 20000,
	}
}

// AckWait is how long a delivered message may stay unacknowledged before
// JetStream delivers it again (after a projector crash, say). The loop keeps
// the messages it is working on in progress, so a slow batch is not redelivered.
const AckWait = 10 * time.Second

// EnsureConsumer creates the durable consumer or updates it to ConsumerConfig.
func EnsureConsumer(ctx context.Context, js jetstream.JetStream, stream, durable, prefix string) (jetstream.Consumer, error) {
	c, err := js.CreateOrUpdateConsumer(ctx, stream, ConsumerConfig(durable, prefix))
	if err != nil {
		return nil, fmt.Errorf("ensure consumer %s on %s: %w", durable, stream, err)
	}
	return c, nil
}

// Handler applies a batch. nil: every message is acked. An error wrapping
// ErrRedeliverLater: every message is nak'ed with a delay. Any other error is
// taken as transient: the same batch is retried with capped exponential
// backoff and jitter, the messages kept in progress, until it succeeds or the
// loop stops.
type Handler func(ctx context.Context, msgs []jetstream.Msg) error

// ErrRedeliverLater marks a handler error after which the batch should be
// redelivered later rather than retried at once.
var ErrRedeliverLater = errors.New("redeliver later")

// LoopOptions tune Loop.
type LoopOptions struct {
	BatchSize   int           // most messages per handler call, default 1000
	Linger      time.Duration // how long to wait to fill a batch once a message is in hand, default 0
	MaxBackoff  time.Duration // cap of the retry backoff, default 5s
	NakDelay    time.Duration // delay of ErrRedeliverLater redelivery, default 5s
	StopTimeout time.Duration // how long a stop waits for the batch in hand, default 10s
	Logger      *zap.Logger
}

// Loop consumes a durable pull consumer in batches.
type Loop struct {
	cons  jetstream.Consumer
	h     Handler
	opts  LoopOptions
	ready atomic.Bool
}

// NewLoop returns a loop over cons calling h.
func NewLoop(cons jetstream.Consumer, h Handler, opts LoopOptions) *Loop {
	if opts.BatchSize <= 0 {
		opts.BatchSize = 1000
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 5 * time.Second
	}
	if opts.NakDelay <= 0 {
		opts.NakDelay = 5 * time.Second
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	return &Loop{cons: cons, h: h, opts: opts}
}

// Ready reports whether the last batch went through (false while a batch is
// being retried after a failure).
func (l *Loop) Ready() bool { return l.ready.Load() }

// Run consumes until ctx is done. On stop it stops pulling, finishes and
// acks the batch in hand (bounded by StopTimeout), naks what was pulled but
// not handled so that another projector takes it at once, and returns nil.
// If the consumer is deleted under it, it does the same and returns an error.
func (l *Loop) Run(ctx context.Context) error {
	it, err := l.cons.Messages(
		jetstream.PullMaxMessages(2*l.opts.BatchSize),
		jetstream.WithMessagesErrOnMissingHeartbeat(false),
	)
	if err != nil {
		return fmt.Errorf("pull messages: %w", err)
	}
	l.ready.Store(true)
	in := make(chan jetstream.Msg, l.opts.BatchSize)
	var lost error // why the consumer is gone, if it is
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // owner: Run, which waits for it below
		defer wg.Done()
		defer close(in)
		for {
			msg, err := it.Next()
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return
			}
			if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
				lost = err
				return
			}
			if err != nil {
				l.opts.Logger.Warn("pull", zap.Error(err))
				continue
			}
			in <- msg
		}
	}()
	for {
		batch, open := l.collect(ctx, in)
		if len(batch) > 0 {
			l.handle(ctx, batch)
		}
		if ctx.Err() != nil || !open {
			break
		}
	}
	it.Drain()
	// Pulled but not handled: give them back now.
	for msg := range in {
		_ = msg.Nak()
	}
	wg.Wait()
	if lost != nil {
		// Not a stop: whoever supervises the projector restarts it, and
		// the start creates the consumer again.
		return fmt.Errorf("consumer %s: %w", consumerName(l.cons), lost)
	}
	return nil
}

func consumerName(c jetstream.Consumer) string {
	if info := c.CachedInfo(); info != nil {
		return info.Name
	}
	return "?"
}

// collect blocks for one message, then takes what is ready up to BatchSize
// (waiting at most Linger for more). It returns early when ctx is done.
func (l *Loop) collect(ctx context.Context, in <-chan jetstream.Msg) ([]jetstream.Msg, bool) {
	var batch []jetstream.Msg
	select {
	case <-ctx.Done():
		return nil, true
	case msg, ok := <-in:
		if !ok {
			return nil, false
		}
		batch = append(batch, msg)
	}
	var linger <-chan time.Time
	if l.opts.Linger > 0 {
		t := time.NewTimer(l.opts.Linger)
		defer t.Stop()
		linger = t.C
	}
	for len(batch) < l.opts.BatchSize {
		select {
		case msg, ok := <-in:
			if !ok {
				return batch, false
			}
			batch = append(batch, msg)
			continue
		default:
		}
		if linger == nil {
			return batch, true
		}
		select {
		case msg, ok := <-in:
			if !ok {
				return batch, false
			}
			batch = append(batch, msg)
		case <-linger:
			return batch, true
		case <-ctx.Done():
			return batch, true
		}
	}
	return batch, true
}

// handle runs the handler on a batch until it is settled. After ctx is done
// it still finishes the batch, bounded by StopTimeout, and naks it if it
// cannot.
func (l *Loop) handle(ctx context.Context, batch []jetstream.Msg) {
	work := context.WithoutCancel(ctx)
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 50 * time.Millisecond
	// Jitter spreads each wait by ±RandomizationFactor: cap the interval so
	// that no wait exceeds MaxBackoff.
	bo.MaxInterval = time.Duration(float64(l.opts.MaxBackoff) / (1 + bo.RandomizationFactor))
	stopBeat := l.keepInProgress(batch)
	defer stopBeat()
	var deadline time.Time
	for {
		if ctx.Err() != nil && deadline.IsZero() {
			deadline = time.Now().Add(l.opts.StopTimeout)
		}
		hctx, cancel := work, context.CancelFunc(func() {})
		if !deadline.IsZero() {
			hctx, cancel = context.WithDeadline(work, deadline)
		}
		err := l.h(hctx, batch)
		cancel()
		if err == nil {
			for _, m := range batch {
				_ = m.Ack()
			}
			l.ready.Store(true)
			return
		}
		if errors.Is(err, ErrRedeliverLater) {
			l.ready.Store(false) // until a batch goes through again
			l.opts.Logger.Warn("batch redelivered later", zap.Int("messages", len(batch)), zap.Error(err))
			for _, m := range batch {
				_ = m.NakWithDelay(l.opts.NakDelay)
			}
			return
		}
		l.ready.Store(false)
		wait := bo.NextBackOff()
		l.opts.Logger.Warn("batch failed; retrying", zap.Int("messages", len(batch)), zap.Duration("in", wait), zap.Error(err))
		if !deadline.IsZero() && time.Now().Add(wait).After(deadline) {
			for _, m := range batch {
				_ = m.Nak()
			}
			return
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			// Stop asked: one more try within StopTimeout.
		}
	}
}

// keepInProgress tells JetStream every AckWait/3 that the batch is being
// worked on, until the returned func is called.
func (l *Loop) keepInProgress(batch []jetstream.Msg) func() {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // owner: the handle call, which stops and waits for it
		defer wg.Done()
		t := time.NewTicker(AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				for _, m := range batch {
					_ = m.InProgress()
				}
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}
