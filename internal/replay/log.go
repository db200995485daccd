package replay

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
)

// ErrTruncated is returned when the stream no longer holds its whole
// history: a replay would miss events and build a different read model.
var ErrTruncated = errors.New("stream history is truncated")

// DefaultBatch is how many messages a replay applies per transaction.
const DefaultBatch = 5000

// Log is the stream a replay reads.
type Log struct {
	JS     jetstream.JetStream
	Stream string
	Prefix string
	// Layout is the stream's (natsjs.StreamLayout): a partitioned stream
	// holds its messages under two subject forms, both read. Zero: p1.
	// Former are the partitioned layouts it had before (a repartition),
	// whose stored forms are read too.
	Layout events.Layout
	Former []events.Layout
}

// History is the extent of the stream.
type History struct {
	Stream  string
	First   uint64 // first sequence still stored (0 or Last+1 when empty)
	Last    uint64 // last sequence ever stored
	Msgs    uint64 // messages stored
	Deleted int    // sequences missing between First and Last
	// Limits describes the stream's retention limits that may drop messages
	// ("" when it keeps everything).
	Limits string
}

// History reads the stream's state.
func (l Log) History(ctx context.Context) (History, error) {
	s, err := l.JS.Stream(ctx, l.Stream)
	if err != nil {
		return History{}, fmt.Errorf("stream %s: %w", l.Stream, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return History{}, fmt.Errorf("stream %s: info: %w", l.Stream, err)
	}
	h := History{
		Stream: l.Stream, First: info.State.FirstSeq, Last: info.State.LastSeq,
		Msgs: info.State.Msgs, Deleted: info.State.NumDeleted,
	}
	c := info.Config
	var limits []string
	if c.MaxMsgs > 0 {
		limits = append(limits, fmt.Sprintf("max_msgs %d", c.MaxMsgs))
	}
	if c.MaxBytes > 0 {
		limits = append(limits, fmt.Sprintf("max_bytes %d", c.MaxBytes))
	}
	if c.MaxAge > 0 {
		limits = append(limits, fmt.Sprintf("max_age %s", c.MaxAge))
	}
	if c.MaxMsgsPerSubject > 0 {
		limits = append(limits, fmt.Sprintf("max_msgs_per_subject %d", c.MaxMsgsPerSubject))
	}
	if c.Retention != jetstream.LimitsPolicy {
		limits = append(limits, "retention "+c.Retention.String())
	}
	for i, l := range limits {
		if i > 0 {
			h.Limits += ", "
		}
		h.Limits += l
	}
	return h, nil
}

// Whole reports whether every message ever stored is still there.
func (h History) Whole() bool {
	return h.Last == 0 || (h.First == 1 && h.Deleted == 0)
}

// Check returns an error wrapping ErrTruncated when the history is not whole
// and allowTruncated is false.
func (h History) Check(allowTruncated bool) error {
	if h.Whole() || allowTruncated {
		return nil
	}
	why := fmt.Sprintf("first sequence is %d, last %d, %d deleted in between", h.First, h.Last, h.Deleted)
	if h.Limits != "" {
		why += "; the stream has limits that drop messages: " + h.Limits
	}
	return fmt.Errorf("stream %s: %w (%s): a replay would miss the dropped events and build a different "+
		"read model. Keep the log whole (no max_msgs, max_bytes or max_age, deny delete: see the README, "+
		"\"Durability and retention\"), or pass --allow-truncated to replay what is left",
		h.Stream, ErrTruncated, why)
}

// Span selects the messages a read delivers: sequences in (From, To] under
// Filter, stopping before the first message stored after Until.
type Span struct {
	Filter  string    // subject filter; default: every message of the log (Layout.Subjects)
	Filters []string  // more filters, read with Filter
	From    uint64    // deliver sequences after From
	To      uint64    // up to and including To
	Until   time.Time // zero: no bound by time
	Batch   int       // most messages per call of fn; default DefaultBatch
}

// Read delivers the messages of span to fn in batches, in stream order,
// through an ordered consumer that is deleted afterwards. The next batch is
// read while fn works on the current one. An error from fn stops the read
// and is returned as is.
func (l Log) Read(ctx context.Context, span Span, fn func([]projection.Message) error) error {
	if span.To <= span.From {
		return nil
	}
	filters := span.Filters
	if span.Filter != "" {
		filters = append([]string{span.Filter}, filters...)
	}
	if len(filters) == 0 {
		filters = l.Layout.Subjects(l.Prefix, l.Former...)
	}
	if span.Batch <= 0 {
		span.Batch = DefaultBatch
	}
	cons, err := l.JS.OrderedConsumer(ctx, l.Stream, jetstream.OrderedConsumerConfig{
		FilterSubjects:    filters,
		DeliverPolicy:     jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:       span.From + 1,
		InactiveThreshold: time.Minute,
	})
	if err != nil {
		return fmt.Errorf("read %s: ordered consumer: %w", l.Stream, err)
	}
	defer func() {
		// Best effort: the server removes an idle ordered consumer anyway.
		if info := cons.CachedInfo(); info != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			defer cancel()
			_ = l.JS.DeleteConsumer(dctx, l.Stream, info.Name)
		}
	}()
	if info := cons.CachedInfo(); info != nil && info.NumPending == 0 {
		return nil // nothing under the filter after From
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(2 * span.Batch))
	if err != nil {
		return fmt.Errorf("read %s: %w", l.Stream, err)
	}
	defer it.Stop()

	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	batches := make(chan []projection.Message, 1)
	var readErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // owner: Read, which waits for it below
		defer wg.Done()
		defer close(batches)
		readErr = l.pull(rctx, it, span, batches)
	}()
	var fnErr error
	for b := range batches {
		if fnErr == nil {
			if fnErr = fn(b); fnErr != nil {
				cancel()
				it.Stop()
			}
		}
	}
	wg.Wait()
	if fnErr != nil {
		return fnErr
	}
	if readErr != nil {
		return fmt.Errorf("read %s: %w", l.Stream, readErr)
	}
	return nil
}

// pull reads span from it into batches until the span ends.
func (l Log) pull(ctx context.Context, it jetstream.MessagesContext, span Span, out chan<- []projection.Message) error {
	batch := make([]projection.Message, 0, span.Batch)
	send := func() bool {
		if len(batch) == 0 {
			return true
		}
		select {
		case out <- batch:
			batch = make([]projection.Message, 0, span.Batch)
			return true
		case <-ctx.Done():
			return false
		}
	}
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return ctx.Err()
			}
			return err
		}
		md, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("metadata: %w", err)
		}
		seq := md.Sequence.Stream
		if seq > span.To || (!span.Until.IsZero() && md.Timestamp.After(span.Until)) {
			send()
			return nil
		}
		batch = append(batch, projection.Message{Seq: seq, Subject: msg.Subject(), Data: msg.Data(), StoredAt: md.Timestamp})
		if seq == span.To || md.NumPending == 0 {
			send()
			return nil
		}
		if len(batch) == span.Batch && !send() {
			return ctx.Err()
		}
	}
}
