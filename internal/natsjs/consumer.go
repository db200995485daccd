package natsjs

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
)

// ConsumerConfig is the projector's durable pull consumer. It has one
// priority group, pinned: the server delivers to one client at a time (the
// pinned one, the partition's writer), and moves the pin to another client
// that pulls with the group once the pinned one has not pulled for
// PinnedTTL. Every projector instance pulls; the others are hot standbys.
func ConsumerConfig(durable, prefix string) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:        durable,
		Description:    "buildstate projector",
		AckPolicy:      jetstream.AckExplicitPolicy,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		FilterSubject:  prefix + ".>",
		AckWait:        AckWait,
		MaxDeliver:     -1, // never give a message up: invalid ones are dead-lettered by the projector
		MaxAckPending:  20000,
		PriorityPolicy: jetstream.PriorityPolicyPinned,
		PriorityGroups: []string{PriorityGroup},
		PinnedTTL:      PinnedTTL,
	}
}

// PartitionConsumerConfig is the durable of partition k of a partitioned
// layout, <durable>-p<n>-<k>: ConsumerConfig filtered to the partition's
// stored subjects (events.Layout.Filter). The durable itself (ConsumerConfig)
// goes on reading what the transform leaves alone: the messages stored
// before the layout was switched, and strays.
func PartitionConsumerConfig(durable, prefix string, layout events.Layout, k int) jetstream.ConsumerConfig {
	c := ConsumerConfig(PartitionDurable(durable, layout, k), prefix)
	c.Description = fmt.Sprintf("buildstate projector, partition %d of %s", k, layout.Name())
	c.FilterSubject = layout.Filter(prefix, k)
	return c
}

// PartitionDurable names partition k's durable.
func PartitionDurable(durable string, layout events.Layout, k int) string {
	return fmt.Sprintf("%s-%s-%d", durable, layout.Name(), k)
}

// PriorityGroup is the priority group of the projector's consumer; the loop
// pulls with it.
const PriorityGroup = "buildstate"

// PinnedTTL is how long the pinned client may go without pulling before the
// server pins another: a standby takes over about this long after the
// writer dies or stops (docs/engine.md, spike c: 4.5 s at 5 s).
const PinnedTTL = 5 * time.Second

// AckWait is how long a delivered message may stay unacknowledged before
// JetStream delivers it again (after a projector crash, say). The loop keeps
// the messages it is working on in progress, so a slow batch is not redelivered.
const AckWait = 10 * time.Second

// EnsureConsumer creates the durable consumer or updates it to ConsumerConfig,
// keeping where it starts.
//
// A durable without the priority group (made by a release before the fence)
// cannot be given one: the server lets only PinnedTTL of a priority group
// change (ADR-42). It is replaced: deleted, and made again under the same
// name from the old one's ack floor + 1 (DeliverByStartSequence). Messages
// above the floor that the old one had acked out of order come again and are
// duplicates by event id; a crash between the delete and the create leaves no
// durable, and the next start makes one from the start of the stream, all of
// it duplicates: slower, nothing lost.
func EnsureConsumer(ctx context.Context, js jetstream.JetStream, stream, durable, prefix string, log *zap.Logger) (jetstream.Consumer, error) {
	return EnsureConsumerConfig(ctx, js, stream, ConsumerConfig(durable, prefix), log)
}

// EnsureConsumerConfig is EnsureConsumer for any of the projector's
// consumer configurations (ConsumerConfig, PartitionConsumerConfig).
func EnsureConsumerConfig(ctx context.Context, js jetstream.JetStream, stream string, want jetstream.ConsumerConfig, log *zap.Logger) (jetstream.Consumer, error) {
	if log == nil {
		log = zap.NewNop()
	}
	durable := want.Durable
	for attempt := 1; ; attempt++ {
		c, err := ensureConsumer(ctx, js, stream, want, log)
		if err == nil {
			return c, nil
		}
		// Another instance made or replaced it meanwhile: look again.
		if attempt < 3 && (errors.Is(err, jetstream.ErrConsumerExists) || errors.Is(err, jetstream.ErrConsumerNotFound)) {
			continue
		}
		return nil, fmt.Errorf("ensure consumer %s on %s: %w", durable, stream, err)
	}
}

func ensureConsumer(ctx context.Context, js jetstream.JetStream, stream string, want jetstream.ConsumerConfig, log *zap.Logger) (jetstream.Consumer, error) {
	c, err := js.Consumer(ctx, stream, want.Durable)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return js.CreateConsumer(ctx, stream, want)
	}
	if err != nil {
		return nil, err
	}
	info := c.CachedInfo()
	have := info.Config
	if have.PriorityPolicy == jetstream.PriorityPolicyPinned && slices.Contains(have.PriorityGroups, PriorityGroup) {
		want.DeliverPolicy, want.OptStartSeq = have.DeliverPolicy, have.OptStartSeq
		return js.UpdateConsumer(ctx, stream, want)
	}
	floor := info.AckFloor.Stream
	if err := js.DeleteConsumer(ctx, stream, want.Durable); err != nil {
		return nil, fmt.Errorf("delete the durable without a priority group: %w", err)
	}
	if floor > 0 {
		want.DeliverPolicy, want.OptStartSeq = jetstream.DeliverByStartSequencePolicy, floor+1
	}
	c, err = js.CreateConsumer(ctx, stream, want)
	if err != nil {
		return nil, err
	}
	log.Info("durable consumer replaced by one with the pinned priority group",
		zap.String("durable", want.Durable), zap.Uint64("old_ack_floor", floor), zap.Uint64("from_seq", floor+1),
		zap.Uint64("old_pending", info.NumPending), zap.Int("old_ack_pending", info.NumAckPending))
	return c, nil
}

// Handler applies a batch. nil: every message is acked. An error wrapping
// ErrRedeliverLater: every message is nak'ed with a delay; wrapping
// ErrGiveBack: nak'ed at once; a *GiveBack: its messages nak'ed at once, the
// others acked. Any other error is taken as transient: the same batch is
// retried with capped exponential backoff and jitter, the messages kept in
// progress, until it succeeds or the loop stops.
type Handler func(ctx context.Context, msgs []jetstream.Msg) error

// ErrRedeliverLater marks a handler error after which the batch should be
// redelivered later rather than retried at once.
var ErrRedeliverLater = errors.New("redeliver later")

// ErrGiveBack marks a handler error after which the batch is nak'ed at once,
// for whoever the server delivers to now (a fenced writer's batch: the
// pinned client gets it), and the loop goes on pulling; its readiness does
// not change.
var ErrGiveBack = errors.New("give the batch back")

// GiveBack is a handler's outcome that settles a batch in two parts: the
// messages at the indices Back are given back (nak'ed at once, as for
// ErrGiveBack: a partition the writer no longer holds), the others were
// applied and are acked.
type GiveBack struct {
	Back []int
	Err  error // why (for the log)
}

func (g *GiveBack) Error() string {
	return fmt.Sprintf("%d messages given back: %v", len(g.Back), g.Err)
}

func (g *GiveBack) Unwrap() error { return g.Err }

// Begin starts a batch and returns how to finish it (a Handler's first
// attempt, split in two): while a whole batch more is waiting (catching up),
// the loop begins it before it finishes this one, so that the handler works
// on the next batch while its store works on this one; otherwise (live) it
// finishes each batch before it takes the next. The finish's error means what a
// Handler's does; a transient one is retried with the Handler.
type Begin func(ctx context.Context, msgs []jetstream.Msg) (finish func(context.Context) error)

// LoopOptions tune Loop.
type LoopOptions struct {
	// Begin, if set, starts each batch (see Begin); the Handler then only
	// retries.
	Begin       Begin
	BatchSize   int           // most messages per handler call, default 1000
	Buffer      int           // messages the client keeps pulled ahead (nats.go PullMaxMessages), default 2·BatchSize
	Linger      time.Duration // how long to wait to fill a batch once a message is in hand, default 0
	MaxBackoff  time.Duration // cap of the retry backoff, default 5s
	NakDelay    time.Duration // delay of ErrRedeliverLater redelivery, default 5s
	StopTimeout time.Duration // how long a stop waits for the batch in hand, default 10s
	Logger      *zap.Logger
}

// Loop consumes durable pull consumers in batches: one given to NewLoop,
// or any number attached and detached while it runs (a projector's
// partitions), whose messages it collects into the same batches.
type Loop struct {
	cons  jetstream.Consumer // attached by Run; nil for none
	h     Handler
	opts  LoopOptions
	ready atomic.Bool
	in    chan jetstream.Msg

	mu      sync.Mutex
	closed  bool // Run has stopped: Attach refuses
	its     map[*source]struct{}
	pullers sync.WaitGroup
	lost    context.CancelCauseFunc // Run's: a consumer went away under it
	lostErr error
}

// source is one attached consumer's pull.
type source struct {
	cons      jetstream.Consumer
	it        jetstream.MessagesContext
	transient bool // its deletion is not a loss (AttachTransient)
}

// NewLoop returns a loop over cons (nil: only what Attach adds) calling h.
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
	return &Loop{cons: cons, h: h, opts: opts, in: make(chan jetstream.Msg, opts.BatchSize), its: map[*source]struct{}{}}
}

// Ready reports whether the last batch went through (false while a batch is
// being retried after a failure).
func (l *Loop) Ready() bool { return l.ready.Load() }

// Attach starts pulling cons (with its priority group) into the loop's
// batches, buffer messages ahead (0: LoopOptions.Buffer). detach stops
// pulling it: what was pulled still reaches the handler (which gives back
// what it no longer wants), what was not stays with the server. It fails
// once Run has stopped.
func (l *Loop) Attach(cons jetstream.Consumer, buffer int) (detach func(), err error) {
	return l.attach(cons, buffer, false)
}

// AttachTransient is Attach for a consumer that may be deleted while
// attached (a repartition's drain, which the instance that finds it
// drained deletes): its deletion ends its pull, as a detach does, instead
// of stopping the loop.
func (l *Loop) AttachTransient(cons jetstream.Consumer, buffer int) (detach func(), err error) {
	return l.attach(cons, buffer, true)
}

func (l *Loop) attach(cons jetstream.Consumer, buffer int, transient bool) (detach func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, errors.New("loop stopped")
	}
	it, err := cons.Messages(
		jetstream.PullMaxMessages(cmp.Or(buffer, l.opts.Buffer, 2*l.opts.BatchSize)),
		jetstream.WithMessagesErrOnMissingHeartbeat(false),
		jetstream.PullPriorityGroup(PriorityGroup),
	)
	if err != nil {
		return nil, fmt.Errorf("pull messages: %w", err)
	}
	src := &source{cons: cons, it: it, transient: transient}
	l.its[src] = struct{}{}
	l.pullers.Add(1)
	go l.pull(src) // owner: Run, which waits for every puller when it stops
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		if _, ok := l.its[src]; ok {
			delete(l.its, src)
			src.it.Drain()
		}
	}, nil
}

// pull hands src's messages to the loop until its pull ends.
func (l *Loop) pull(src *source) {
	defer l.pullers.Done()
	for {
		msg, err := src.it.Next()
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
			return
		}
		if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
			l.mu.Lock()
			if _, attached := l.its[src]; !attached || src.transient {
				delete(l.its, src)
				l.mu.Unlock()
				return // detached, then deleted, or expected to go: not lost
			}
			if l.lostErr == nil {
				l.lostErr = fmt.Errorf("consumer %s: %w", consumerName(src.cons), err)
			}
			stop := l.lost
			l.mu.Unlock()
			if stop != nil {
				stop(err)
			}
			return
		}
		if err != nil {
			l.opts.Logger.Warn("pull", zap.Error(err))
			continue
		}
		l.in <- msg
	}
}

// Run consumes until ctx is done. On stop it stops pulling, finishes and
// acks the batch in hand (bounded by StopTimeout), naks what was pulled but
// not handled so that another projector takes it at once, and returns nil.
// If a consumer is deleted under it, it does the same and returns an error.
func (l *Loop) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	l.mu.Lock()
	l.lost = cancel
	if l.lostErr != nil {
		cancel(l.lostErr) // lost before Run began
	}
	l.mu.Unlock()
	if l.cons != nil {
		if _, err := l.Attach(l.cons, 0); err != nil {
			return err
		}
	}
	l.ready.Store(true)
	in := l.in
	var held *begun // begun, not finished (LoopOptions.Begin)
	for {
		var batch []jetstream.Msg
		if held != nil {
			if ctx.Err() != nil {
				break // stop: only the batch in hand is finished (below)
			}
			// Overlap only while behind (a whole batch is waiting): else
			// the batch in hand is finished first, and its rows are
			// visible a batch sooner.
			if len(in) < l.opts.BatchSize {
				l.settle(ctx, held)
				held = nil
				continue
			}
			batch = l.fill(in, nil)
		} else {
			batch = l.collect(ctx, in)
		}
		if len(batch) > 0 {
			if l.opts.Begin == nil {
				l.handle(ctx, batch, l.keepInProgress(batch), nil)
			} else {
				next := l.begin(ctx, batch)
				if held != nil {
					l.settle(ctx, held)
				}
				held = next
			}
		}
		if ctx.Err() != nil {
			break
		}
	}
	if held != nil {
		l.settle(ctx, held)
	}
	l.mu.Lock()
	l.closed = true
	for src := range l.its {
		src.it.Drain()
	}
	clear(l.its)
	lost := l.lostErr
	l.mu.Unlock()
	// Pulled but not handled: give them back now.
	done := make(chan struct{})
	go func() { l.pullers.Wait(); close(done) }()
	for {
		select {
		case msg := <-in:
			_ = msg.Nak()
			continue
		case <-done:
		}
		break
	}
	for len(in) > 0 {
		_ = (<-in).Nak()
	}
	if lost != nil {
		// Not a stop: whoever supervises the projector restarts it, and
		// the start creates the consumer again.
		return lost
	}
	return nil
}

func consumerName(c jetstream.Consumer) string {
	if info := c.CachedInfo(); info != nil {
		return info.Name
	}
	return "?"
}

// begun is a batch the loop began (LoopOptions.Begin) and has not settled.
type begun struct {
	batch    []jetstream.Msg
	stopBeat func()
	finish   func(context.Context) error
}

func (l *Loop) begin(ctx context.Context, batch []jetstream.Msg) *begun {
	b := &begun{batch: batch, stopBeat: l.keepInProgress(batch)}
	b.finish = l.opts.Begin(context.WithoutCancel(ctx), batch)
	return b
}

func (l *Loop) settle(ctx context.Context, b *begun) { l.handle(ctx, b.batch, b.stopBeat, b.finish) }

// fill appends to batch what is ready in in, up to BatchSize, without
// waiting.
func (l *Loop) fill(in <-chan jetstream.Msg, batch []jetstream.Msg) []jetstream.Msg {
	for len(batch) < l.opts.BatchSize {
		select {
		case msg := <-in:
			batch = append(batch, msg)
		default:
			return batch
		}
	}
	return batch
}

// collect blocks for one message, then takes what is ready up to BatchSize
// (waiting at most Linger for more). It returns early when ctx is done.
func (l *Loop) collect(ctx context.Context, in <-chan jetstream.Msg) []jetstream.Msg {
	var batch []jetstream.Msg
	select {
	case <-ctx.Done():
		return nil
	case msg := <-in:
		batch = append(batch, msg)
	}
	var linger <-chan time.Time
	if l.opts.Linger > 0 {
		t := time.NewTimer(l.opts.Linger)
		defer t.Stop()
		linger = t.C
	}
	var behind <-chan time.Time // set once the consumer is seen to be behind
	for {
		batch = l.fill(in, batch)
		if len(batch) >= l.opts.BatchSize {
			return batch
		}
		// Behind (a backlog: the server holds at least the rest of a batch
		// for this consumer): wait for it, up to BacklogLinger, rather than
		// apply a small batch; at live rates nothing is held back.
		if behind == nil && pendingAfter(batch[len(batch)-1]) >= uint64(l.opts.BatchSize-len(batch)) {
			t := time.NewTimer(BacklogLinger)
			defer t.Stop()
			behind = t.C
		}
		if linger == nil && behind == nil {
			return batch
		}
		select {
		case msg := <-in:
			batch = append(batch, msg)
		case <-linger:
			return batch
		case <-behind:
			return batch
		case <-ctx.Done():
			return batch
		}
	}
}

// BacklogLinger bounds how long a loop behind its consumer waits to fill a
// batch: pulls arrive in pieces (nats.go asks for more once half its buffer
// is used), and without it a loop that never waits for the pool (several
// partitions' loops on a few connections, or few partitions an instance)
// applied batches of a hundred messages where a thousand were waiting
// (docs/performance.md: 833, 272 and 132 messages a batch with 1, 2 and 3
// instances, and the CPU an event rose with it).
const BacklogLinger = 20 * time.Millisecond

// pendingAfter is how many messages the server held for the consumer after
// m (0 if m carries no metadata).
func pendingAfter(m jetstream.Msg) uint64 {
	md, err := m.Metadata()
	if err != nil {
		return 0
	}
	return md.NumPending
}

// handle runs the handler on a batch until it is settled (its first attempt
// is first, if not nil: a begun batch's finish). After ctx is done it still
// finishes the batch, bounded by StopTimeout, and naks it if it cannot.
// stopBeat ends the batch's keepInProgress.
func (l *Loop) handle(ctx context.Context, batch []jetstream.Msg, stopBeat func(), first func(context.Context) error) {
	work := context.WithoutCancel(ctx)
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 50 * time.Millisecond
	// Jitter spreads each wait by ±RandomizationFactor: cap the interval so
	// that no wait exceeds MaxBackoff.
	bo.MaxInterval = time.Duration(float64(l.opts.MaxBackoff) / (1 + bo.RandomizationFactor))
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
		var err error
		if first != nil {
			err, first = first(hctx), nil
		} else {
			err = l.h(hctx, batch)
		}
		cancel()
		if err == nil {
			for _, m := range batch {
				_ = m.Ack()
			}
			l.ready.Store(true)
			return
		}
		var gb *GiveBack
		if errors.As(err, &gb) {
			back := make(map[int]bool, len(gb.Back))
			for _, i := range gb.Back {
				back[i] = true
			}
			for i, m := range batch {
				if back[i] {
					_ = m.Nak()
				} else {
					_ = m.Ack()
				}
			}
			l.ready.Store(true)
			return
		}
		if errors.Is(err, ErrGiveBack) {
			for _, m := range batch {
				_ = m.Nak()
			}
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

// DrainDurable names the durable that applies what a repartitioned stream
// stored under its former layout (EnsureDrain).
func DrainDurable(durable string) string { return durable + "-drain" }

// EnsureDrain makes (or finds) the drain of a repartition from layout from:
// a durable like ConsumerConfig, filtered to from's stored form, starting
// after the lowest ack floor of from's partition durables (what no
// partition's writer acknowledged; above it, what some did comes again and is
// a duplicate by event id). The projector makes it before it switches the
// stream, so that a crash in between leaves it to be found at the next start.
// A drain of another layout still there is an error: one repartition at a
// time.
func EnsureDrain(ctx context.Context, js jetstream.JetStream, stream, durable, prefix string, from events.Layout, log *zap.Logger) (jetstream.Consumer, error) {
	if log == nil {
		log = zap.NewNop()
	}
	want := ConsumerConfig(DrainDurable(durable), prefix)
	want.Description = fmt.Sprintf("buildstate projector, drain of layout %s", from.Name())
	want.FilterSubject = ""
	want.FilterSubjects = []string{from.Name() + ".*." + prefix + ".*.*"}
	if c, err := js.Consumer(ctx, stream, want.Durable); err == nil {
		if have := c.CachedInfo().Config.FilterSubjects; !slices.Equal(have, want.FilterSubjects) {
			return nil, fmt.Errorf("%w: the drain of an earlier repartition (%s, filter %v) has not finished: "+
				"run the projectors with the stream's layout until it is gone, then repartition", ErrLayout, want.Durable, have)
		}
		return c, nil
	} else if !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil, fmt.Errorf("drain: %w", err)
	}
	start := uint64(math.MaxUint64)
	for k := range from.N() {
		c, err := js.Consumer(ctx, stream, PartitionDurable(durable, from, k))
		if err != nil {
			start = 1 // a partition without its durable: from the start
			break
		}
		start = min(start, c.CachedInfo().AckFloor.Stream+1)
	}
	if start > 1 {
		want.DeliverPolicy, want.OptStartSeq = jetstream.DeliverByStartSequencePolicy, start
	}
	c, err := js.CreateConsumer(ctx, stream, want)
	if err != nil {
		return nil, fmt.Errorf("drain: %w", err)
	}
	log.Info("repartition: drain of the former layout made", zap.String("durable", want.Durable),
		zap.String("layout", from.Name()), zap.Uint64("from_seq", max(start, 1)))
	return c, nil
}

// DrainLayout is the layout whose stored form the drain cons reads ("" if
// it is not a drain).
func DrainLayout(cons jetstream.Consumer) string {
	info := cons.CachedInfo()
	if info == nil || len(info.Config.FilterSubjects) != 1 {
		return ""
	}
	name, _, _ := strings.Cut(info.Config.FilterSubjects[0], ".")
	return name
}

// partitionDurableOf says whether name is one of durable's partition
// durables (PartitionDurable: <durable>-p<n>-<k>), and of which layout.
func partitionDurableOf(durable, name string) (layout string, ok bool) {
	rest, ok := strings.CutPrefix(name, durable+"-p")
	if !ok {
		return "", false
	}
	n, k, ok := strings.Cut(rest, "-")
	_, err1 := strconv.Atoi(n)
	_, err2 := strconv.Atoi(k)
	if !ok || err1 != nil || err2 != nil {
		return "", false
	}
	return "p" + n, true
}

// DrainFinished deletes, once a repartition's drain has applied everything,
// the drain and every partition durable of durable's that is not of layout
// keep.
func DrainFinished(ctx context.Context, js jetstream.JetStream, stream, durable string, keep events.Layout, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return fmt.Errorf("drain finished: %w", err)
	}
	names := s.ConsumerNames(ctx)
	var gone []string
	for name := range names.Name() {
		if l, ok := partitionDurableOf(durable, name); ok && l != keep.Name() {
			gone = append(gone, name)
		}
	}
	if err := names.Err(); err != nil {
		return fmt.Errorf("drain finished: %w", err)
	}
	// The drain last: a crash before it leaves it, and the next start
	// finishes this again.
	gone = append(gone, DrainDurable(durable))
	for _, name := range gone {
		if err := js.DeleteConsumer(ctx, stream, name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			return fmt.Errorf("drain finished: delete %s: %w", name, err)
		}
	}
	log.Info("repartition: drain finished; the former layout's durables deleted", zap.Strings("deleted", gone))
	return nil
}
