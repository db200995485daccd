package bench

import (
	"context"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/natsjs"
)

// RawAck is how a raw consumer acknowledges what it fetched.
type RawAck int

const (
	// AckEach acks every message (AckExplicitPolicy): what the projector
	// does today, one ack publish a message.
	AckEach RawAck = iota
	// AckAll acks the last message of every batch (AckAllPolicy), which
	// acknowledges everything before it: one ack publish a batch.
	AckAll
)

func (a RawAck) String() string {
	if a == AckAll {
		return "ack all"
	}
	return "ack each"
}

// RawConfig is one raw measurement.
type RawConfig struct {
	Ack RawAck
	// Batch is the projector's --batch: the client pulls 2×Batch at a time
	// as the projector's loop does, and AckAll acks every Batch-th message
	// and the last. Default 1000.
	Batch int
}

// RawResult is what one raw fetch+ack of a backlog measured.
type RawResult struct {
	Ack        RawAck
	Messages   int
	Elapsed    time.Duration // from the consumer's creation until its ack floor is the last message
	CPU        time.Duration // this process's CPU over the run: the embedded NATS server and the raw client
	LoadBefore float64       // 1-minute load average at the start
}

// MsgsPerSec is the raw rate.
func (r RawResult) MsgsPerSec() float64 { return float64(r.Messages) / r.Elapsed.Seconds() }

// CPUPerMsg is the CPU (server and client) a message.
func (r RawResult) CPUPerMsg() time.Duration { return r.CPU / time.Duration(max(r.Messages, 1)) }

// Raw is the catch-up's ceiling on the NATS side: a new durable pull
// consumer over the backlog's stream, configured as the projector's
// (natsjs.ConsumerConfig; AckAllPolicy for AckAll), on a connection of its
// own, that fetches every message and only acks it. The clock runs from the
// consumer's creation until its ack floor is the backlog's last message,
// the finish line of a catch-up (Catchup).
func (e *Env) Raw(ctx context.Context, b Backlog, cfg RawConfig) (RawResult, error) {
	if cfg.Batch <= 0 {
		cfg.Batch = 1000
	}
	res := RawResult{Ack: cfg.Ack, Messages: b.Events, LoadBefore: LoadAverage()}
	nc, err := nats.Connect(e.NATSURL, nats.Name("buildstate bench raw"))
	if err != nil {
		return res, fmt.Errorf("raw: nats: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return res, fmt.Errorf("raw: jetstream: %w", err)
	}
	ccfg := natsjs.ConsumerConfig("bench-raw-"+randomSuffix(), b.Stream.Prefix)
	if b.Stream.Layout.Partitioned() {
		// One durable over the whole stream, unfiltered: the fastest read
		// of it (two filters, one a subject form, cost the server more).
		ccfg.FilterSubject = ""
	}
	every := 1
	if cfg.Ack == AckAll {
		ccfg.AckPolicy, every = jetstream.AckAllPolicy, cfg.Batch
	}
	cpu0, err := procCPU(os.Getpid())
	if err != nil {
		return res, fmt.Errorf("raw: %w", err)
	}
	start := time.Now()
	cons, err := js.CreateOrUpdateConsumer(ctx, b.Stream.Name, ccfg)
	if err != nil {
		return res, fmt.Errorf("raw: consumer on %s: %w", b.Stream.Name, err)
	}
	defer func() { _ = js.DeleteConsumer(context.WithoutCancel(ctx), b.Stream.Name, ccfg.Durable) }()
	if err := DrainAcking(ctx, cons, b.Events, every, jetstream.PullMaxMessages(2*cfg.Batch), jetstream.PullPriorityGroup(natsjs.PriorityGroup)); err != nil {
		return res, fmt.Errorf("raw %s: %w", cfg.Ack, err)
	}
	res.Elapsed = time.Since(start)
	cpu1, err := procCPU(os.Getpid())
	if err != nil {
		return res, fmt.Errorf("raw: %w", err)
	}
	res.CPU = cpu1 - cpu0
	return res, nil
}

// DrainAcking reads total messages of cons and acks every every-th one and
// the last (every 1: each one; with AckAllPolicy an ack covers the messages
// before it), then waits until the consumer's ack floor is the last message
// delivered and nothing is pending or awaiting its ack.
func DrainAcking(ctx context.Context, cons jetstream.Consumer, total, every int, opts ...jetstream.PullMessagesOpt) error {
	if every < 1 {
		every = 1
	}
	it, err := cons.Messages(opts...)
	if err != nil {
		return fmt.Errorf("pull: %w", err)
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop) // Next returns when ctx is done
	defer stop()
	for n := 1; n <= total; n++ {
		m, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("after %d of %d messages: %w", n-1, total, ctx.Err())
			}
			return fmt.Errorf("after %d of %d messages: %w", n-1, total, err)
		}
		if n%every == 0 || n == total {
			if err := m.Ack(); err != nil {
				return fmt.Errorf("ack: %w", err)
			}
		}
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return fmt.Errorf("consumer info: %w", err)
	}
	_, err = waitAcked(ctx, []jetstream.Consumer{cons}, info.Delivered.Stream, nil)
	return err
}

// RawSeries is the raw runs of one bench run.
type RawSeries []RawResult

// Median is the median rate of the runs that acked as ack (0: none).
func (s RawSeries) Median(ack RawAck) float64 {
	var rates []float64
	for _, r := range s {
		if r.Ack == ack {
			rates = append(rates, r.MsgsPerSec())
		}
	}
	if len(rates) == 0 {
		return 0
	}
	slices.Sort(rates)
	if n := len(rates); n%2 == 0 {
		return (rates[n/2-1] + rates[n/2]) / 2
	}
	return rates[len(rates)/2]
}
