// Package projector assembles the projector service: Postgres pool and
// migrations, the BUILDS stream and durable consumer, the consume loop
// applying batches through the projection store, and the HTTP endpoints.
package projector

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fold"
	"github.com/buildstate/buildstate/internal/httpserve"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/redact"
	"github.com/buildstate/buildstate/internal/web"
)

// Config is everything the projector is told.
type Config struct {
	DatabaseURL string
	NATS        natsjs.Client
	Stream      string
	Prefix      string
	Durable     string
	Replicas    int    // stream replicas: 1 on a single server, 3 on a 3-node cluster
	HTTPAddr    string // "" serves no HTTP
	BatchSize   int
	Linger      time.Duration
	// Partitions is the stream's partition count (events.Layout; 0 or 1:
	// one partition, the stream as published). With n > 1 the instance
	// applies its share of the n partitions' durables, besides the durable
	// that reads what was stored before the layout was switched.
	Partitions int
	// Repartition lets a stream partitioned with another count switch to
	// Partitions (docs/engine.md §9): without it that is refused.
	Repartition bool
	// Memory bounds what the partitions' owner keeps between batches
	// (fold.Memory), for the instance: each of n partitions keeps 1/n of
	// it. Zero fields take fold.DefaultLimits.
	Memory fold.Limits
	// Stuck are the limits of the buildstate_builds_stuck gauge and of the
	// time-outs; StuckEvery is how often they are checked (default a minute).
	Stuck      projection.StuckLimits
	StuckEvery time.Duration
	// TimeOutStuck publishes a time-out completion for each stuck build
	// (PublishTimeOuts) at every check.
	TimeOutStuck bool
	Logger       *zap.Logger
	// Ready, if set, is called with the HTTP listener's address once the
	// projector is consuming (tests use it).
	Ready func(httpAddr string)
}

func (c *Config) defaults() {
	if c.Stream == "" {
		c.Stream = "BUILDS"
	}
	if c.Prefix == "" {
		c.Prefix = "builds"
	}
	if c.Durable == "" {
		c.Durable = "projector"
	}
	if c.BatchSize <= 0 {
		c.BatchSize = 1000
	}
	if c.Stuck == (projection.StuckLimits{}) {
		c.Stuck = projection.DefaultStuckLimits
	}
	if c.StuckEvery <= 0 {
		c.StuckEvery = DefaultStuckEvery
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
}

// OpenPool connects to Postgres and pings it.
func OpenPool(ctx context.Context, url string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", redact.Error(err))
	}
	projection.ConfigurePool(cfg)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", redact.Error(err))
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("postgres: ping: %w", redact.Error(err))
	}
	return pool, nil
}

// MigratePool applies the migrations to the live schema over one pooled connection.
func MigratePool(ctx context.Context, pool *pgxpool.Pool) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer conn.Release()
	if err := projection.Migrate(ctx, conn.Conn(), "public"); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	// The connection's search_path was changed; do not hand it out again.
	_ = conn.Conn().Close(ctx)
	return nil
}

// CheckPool returns nil if the live schema is at this binary's version, and
// says what to do if not (projection.SchemaError). It changes nothing: the
// commands other than run and migrate only read or replay.
func CheckPool(ctx context.Context, pool *pgxpool.Pool) error {
	return projection.CheckSchema(ctx, pool, projection.LiveSchema)
}

// Run is `projector run`: it fails fast on set-up, then consumes until ctx
// is done, finishes and acks the batch in hand, and returns nil.
func Run(ctx context.Context, cfg Config) error {
	cfg.defaults()
	log := cfg.Logger
	if err := cfg.Stuck.Check(); err != nil {
		return err
	}
	pool, err := OpenPool(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := MigratePool(ctx, pool); err != nil {
		return err
	}
	layout, err := events.LayoutOf(max(cfg.Partitions, 1))
	if err != nil {
		return err
	}
	nc, js, err := natsjs.ConnectJetStream(cfg.NATS, "buildstate-projector", log)
	if err != nil {
		return err
	}
	defer nc.Close()
	if cfg.Repartition {
		// The drain before the switch: a crash in between leaves it for
		// the next start.
		if have, _, err := natsjs.StreamLayout(ctx, js, cfg.Stream, cfg.Prefix); err == nil && have.Partitioned() && have != layout {
			if _, err := natsjs.EnsureDrain(ctx, js, cfg.Stream, cfg.Durable, cfg.Prefix, have, log); err != nil {
				return err
			}
		}
	}
	_, sw, err := natsjs.EnsureLayout(ctx, js, cfg.Stream, cfg.Prefix, cfg.Replicas, layout, cfg.Repartition, log)
	if err != nil {
		return err
	}
	// The durable reads the stream as published: all of it in layout p1;
	// in a partitioned layout, what was stored before the switch and strays.
	cons, err := natsjs.EnsureConsumer(ctx, js, cfg.Stream, cfg.Durable, cfg.Prefix, log)
	if err != nil {
		return err
	}
	// A repartition's drain, while it lasts, is the durable's second
	// consumer: its writer applies what the former layout's partitions left.
	drain, err := js.Consumer(ctx, cfg.Stream, natsjs.DrainDurable(cfg.Durable))
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		drain, err = nil, nil
	}
	if err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	if drain != nil && natsjs.DrainLayout(drain) == layout.Name() {
		// A repartition away from this layout has made its drain and not
		// switched the stream yet (or stopped before it did): not ours to
		// apply, nor to delete; the repartition's EnsureDrain finds it.
		log.Warn("repartition: a drain of the stream's own layout is waiting for its switch; left alone",
			zap.String("layout", layout.Name()))
		drain = nil
	}
	tel := NewTelemetry()
	store := projection.New(pool, projection.Options{Prefix: cfg.Prefix, Gate: true, Logger: log, Observer: tel, Memory: cfg.Memory})
	owner := InstanceID()
	p1, _ := events.LayoutOf(1)
	restW := NewWriter(store, tel, log, owner, cfg.Prefix, p1)
	restW.Want(0)
	rest := newLoop(cons, restW, cfg, !layout.Partitioned())
	if drain != nil {
		// No instance of the former layout commits from now on.
		from, err := events.ParseLayout(natsjs.DrainLayout(drain))
		if err != nil {
			return fmt.Errorf("drain: %w", err)
		}
		if err := store.RetireLayouts(ctx, layout.Name(), from); err != nil {
			return err
		}
	} else if sw != nil {
		// Switched into this layout (p4 → p1 → p4, say): rows a
		// repartition retired earlier are its own again.
		if err := store.RetireLayouts(ctx, layout.Name(), events.Layout{}); err != nil {
			return err
		}
	}
	// A writer that finds its layout retired stops the projector: it is an
	// instance still running a layout the stream has left.
	ctx, stopRetired := context.WithCancelCause(ctx)
	defer stopRetired(nil)
	restW.retired = stopRetired
	var ps *partitions
	var group *natsjs.Group
	ready := rest.Ready
	if layout.Partitioned() {
		w := NewWriter(store, tel, log, owner, cfg.Prefix, layout)
		w.retired = stopRetired
		ps = &partitions{layout: layout, cfg: cfg, js: js, log: log, w: w, loop: newLoop(nil, w, cfg, true)}
		for k := range layout.N() {
			c, err := natsjs.EnsureConsumerConfig(ctx, js, cfg.Stream, natsjs.PartitionConsumerConfig(cfg.Durable, cfg.Prefix, layout, k), log)
			if err != nil {
				return err
			}
			ps.cons = append(ps.cons, c)
		}
		if group, err = natsjs.JoinGroup(ctx, js, cfg.Durable, owner, log); err != nil {
			return err
		}
		defer func() {
			lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			defer cancel()
			group.Leave(lctx)
		}()
		ready = func() bool { return rest.Ready() && ps.loop.Ready() }
	}

	var wg sync.WaitGroup
	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	defer func() { stopBG(); wg.Wait() }()
	httpAddr := ""
	if cfg.HTTPAddr != "" {
		ln, err := net.Listen("tcp", cfg.HTTPAddr)
		if err != nil {
			return fmt.Errorf("http: listen %s: %w", cfg.HTTPAddr, err)
		}
		httpAddr = ln.Addr().String()
		pages := web.New(web.Options{Store: store, Stats: tel.Stats, Stuck: cfg.Stuck, Logger: log})
		srv := httpserve.New(routes(tel, ready, pool, nc, log, pages), log)
		wg.Add(2)
		go func() {
			defer wg.Done()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http", zap.Error(err))
			}
		}()
		go func() {
			defer wg.Done()
			<-bg.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
		}()
	}
	wg.Add(1)
	lagged := []jetstream.Consumer{cons}
	if ps != nil {
		lagged = append(lagged, ps.cons...)
	}
	go func() { defer wg.Done(); watchLag(bg, lagged, tel, log) }()
	var timeOuts *emitter.Publisher
	if cfg.TimeOutStuck {
		timeOuts = emitter.New(js, emitter.Options{Prefix: cfg.Prefix, Logger: log})
	}
	wg.Add(1)
	go func() { defer wg.Done(); watchStuck(bg, store, timeOuts, cfg.Stuck, cfg.StuckEvery, tel, log) }()

	log.Info("projector consuming", zap.String("stream", cfg.Stream), zap.String("durable", cfg.Durable), zap.String("instance", owner),
		zap.String("layout", layout.Name()), zap.String("http", httpAddr), zap.Int("batch", cfg.BatchSize), zap.Bool("time_out_stuck", cfg.TimeOutStuck))
	if cfg.Ready != nil {
		cfg.Ready(httpAddr)
	}
	finishDrain := func(ctx context.Context) error {
		return natsjs.DrainFinished(ctx, js, cfg.Stream, cfg.Durable, layout, log)
	}
	if err := runParts(ctx, rest, cons, drain, finishDrain, ps, group, log); err != nil {
		return err
	}
	if cause := context.Cause(ctx); errors.Is(cause, projection.ErrRetired) {
		return cause
	}
	// Acks are sent asynchronously: make sure they left before closing.
	if err := nc.FlushTimeout(5 * time.Second); err != nil {
		log.Warn("flush acks", zap.Error(err))
	}
	log.Info("projector stopped")
	return nil
}

// Writer adapts the projection store to the consume loop, as the one writer
// of the partitions it holds: p1's (the durable's), or this instance's share
// of a partitioned layout (partitions.go: one loop over their durables, one
// fence, one transaction a batch for all of them: docs/engine.md §6).
// Every instance that pulls a durable pulls its pinned priority group and the
// server delivers to one of them; a writer that receives messages of a
// partition it wants (Want) without holding it acquires it
// (projection.Store.AcquireHolds: the epoch goes up, every earlier holder is
// fenced), so the pinned client becomes the writer. A batch's messages of a
// partition fenced at commit (another instance acquired it since:
// projection.FencedError) wrote nothing: they are given back unacked
// (natsjs.GiveBack), the rest of the batch applied without them, and the
// instance goes on pulling; it acquires again when messages reach it.
// Messages of a partition it no longer wants (Release: given to another
// instance) are given back.
//
// Begin starts a batch (projection.Store.Begin: folded and sent, not
// committed) for the loop to finish after it has begun the next; Handle
// applies one at once (the loop's retries). The loop calls them one batch at
// a time; Acquire and Release may come from another goroutine (the
// partitions' supervisor): a mutex orders them with the batches.
type Writer struct {
	store  *projection.Store
	tel    *Telemetry
	log    *zap.Logger
	owner  string // names the instance in projector_partitions and the logs
	prefix string
	layout events.Layout

	retired func(error) // called when an acquire finds the layout retired (nil: nothing)

	mu    sync.Mutex
	fence *projection.Fence
	want  map[int]bool
	owned float64 // what this writer adds to tel.Owned
	held  float64 // what this writer adds to tel.Remembered
}

// NewWriter returns a writer of layout's partitions for the instance owner,
// wanting none yet (Want, Acquire).
func NewWriter(store *projection.Store, tel *Telemetry, log *zap.Logger, owner, prefix string, layout events.Layout) *Writer {
	f, err := store.NewFence(layout.Name())
	if err != nil {
		panic(err) // a Layout's name always parses
	}
	return &Writer{store: store, tel: tel, log: log, owner: owner, prefix: prefix, layout: layout, fence: f, want: map[int]bool{}}
}

// Want makes the writer acquire partitions ks when their messages reach it.
func (w *Writer) Want(ks ...int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, k := range ks {
		w.want[k] = true
	}
}

// Acquire wants partitions ks and acquires those it does not hold, in one
// transaction (batches wait for it).
func (w *Writer) Acquire(ctx context.Context, ks ...int) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, k := range ks {
		w.want[k] = true
	}
	return w.acquire(ctx, ks)
}

func (w *Writer) acquire(ctx context.Context, ks []int) error {
	var missing []int
	for _, k := range ks {
		if !w.fence.Holds(k) {
			missing = append(missing, k)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	a, err := w.store.AcquireHolds(ctx, w.layout.Name(), w.owner, missing...)
	if err != nil {
		if errors.Is(err, projection.ErrRetired) && w.retired != nil {
			w.log.Error("this layout was retired by a repartition: stopping", zap.String("layout", w.layout.Name()), zap.Error(err))
			w.retired(err)
		}
		return err
	}
	w.took(a, "partition acquired")
	return nil
}

// took gives the fence what an acquire took, counts and logs it (as what).
func (w *Writer) took(a projection.Acquired, what string) {
	w.fence.Add(a)
	w.tel.Acquired.Add(float64(len(a.Holds)))
	for _, h := range a.Holds {
		w.log.Info(what, zap.String("layout", a.Layout), zap.Int("partition", h.Partition),
			zap.Int64("epoch", h.Epoch), zap.Uint64("applied_seq", h.AppliedSeq), zap.String("owner", w.owner))
	}
	w.counted()
}

// reacquireOwn takes back at once those of the fenced partitions ks that
// are still wanted and whose rows still name this instance (a rebuild's
// swap raised their epochs: projection.Store.ReacquireOwn), so that the
// batch is applied again in order; it returns the others, lost.
func (w *Writer) reacquireOwn(ctx context.Context, ks []int) (lost []int) {
	var mine []int
	for _, k := range ks {
		if w.want[k] && !w.fence.Holds(k) {
			mine = append(mine, k)
		} else if !w.fence.Holds(k) {
			lost = append(lost, k)
		}
	}
	if len(mine) == 0 {
		return lost
	}
	a, err := w.store.ReacquireOwn(ctx, w.layout.Name(), w.owner, mine...)
	if err != nil {
		w.log.Warn("take back fenced partitions", zap.Ints("partitions", mine), zap.Error(err))
		return append(lost, mine...)
	}
	w.took(a, "partition taken back after a fence (a rebuild's swap raised its epoch)")
	for _, k := range mine {
		if !w.fence.Holds(k) {
			lost = append(lost, k)
		}
	}
	return lost
}

// Release stops wanting partitions ks and drops the writer's hold on them
// (their loop stopped pulling them); their messages still in hand are given
// back.
func (w *Writer) Release(ks ...int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, k := range ks {
		delete(w.want, k)
	}
	w.fence.Release(ks...)
	w.counted()
}

// counted sets this writer's share of the owned and memory gauges.
func (w *Writer) counted() {
	owned, held := float64(w.fence.Count()), float64(w.fence.Remembered())
	w.tel.Owned.Add(owned - w.owned)
	w.tel.Remembered.Add(held - w.held)
	w.owned, w.held = owned, held
}

// split is a batch sorted by partition: mine (indices of the messages of
// held partitions), back (the others, given back), part (each message's
// partition; -1 for a stray of a partitioned layout).
type split struct {
	msgs []jetstream.Msg
	part []int
	mine []int
	back []int
}

// split sorts msgs, acquiring the wanted partitions it names that the
// writer does not hold.
func (w *Writer) split(ctx context.Context, msgs []jetstream.Msg) (*split, error) {
	s := &split{msgs: msgs, part: make([]int, len(msgs))}
	var acquire []int
	for i, m := range msgs {
		k, ok := w.layout.SubjectPartition(w.prefix, m.Subject())
		if !ok {
			k = -1
		}
		s.part[i] = k
		if ok && w.want[k] && !w.fence.Holds(k) && !slices.Contains(acquire, k) {
			acquire = append(acquire, k)
		}
	}
	if len(acquire) > 0 {
		if err := w.acquire(ctx, acquire); err != nil {
			return nil, err // transient: the loop retries the batch
		}
	}
	for i, k := range s.part {
		if k >= 0 && w.fence.Holds(k) {
			s.mine = append(s.mine, i)
		} else {
			s.back = append(s.back, i)
		}
	}
	return s, nil
}

// messages are the store's messages of mine.
func (s *split) messages() []projection.Message {
	batch := make([]projection.Message, len(s.mine))
	for j, i := range s.mine {
		m := s.msgs[i]
		pm := projection.Message{Subject: m.Subject(), Data: m.Data()}
		if md, err := m.Metadata(); err == nil {
			pm.Seq, pm.StoredAt = md.Sequence.Stream, md.Timestamp
		}
		batch[j] = pm
	}
	return batch
}

// lose moves the messages of partitions ks from mine to back.
func (s *split) lose(ks []int) {
	mine := s.mine[:0]
	for _, i := range s.mine {
		if slices.Contains(ks, s.part[i]) {
			s.back = append(s.back, i)
		} else {
			mine = append(mine, i)
		}
	}
	s.mine = mine
}

// Handle applies msgs under the writer's fence (natsjs.Handler).
func (w *Writer) Handle(ctx context.Context, msgs []jetstream.Msg) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	s, err := w.split(ctx, msgs)
	if err != nil {
		return err
	}
	return w.apply(ctx, s, time.Now(), nil)
}

// Begin starts msgs under the writer's fence (natsjs.Begin).
func (w *Writer) Begin(ctx context.Context, msgs []jetstream.Msg) func(context.Context) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	start := time.Now()
	s, err := w.split(ctx, msgs)
	if err != nil {
		return func(context.Context) error { return err } // transient: the loop retries the batch
	}
	if len(s.mine) == 0 {
		return func(ctx context.Context) error {
			w.mu.Lock()
			defer w.mu.Unlock()
			return w.apply(ctx, s, start, nil)
		}
	}
	p := w.store.Begin(ctx, w.fence, s.messages())
	return func(ctx context.Context) error {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.apply(ctx, s, start, p.Finish)
	}
}

// apply applies the messages of s the writer holds (first, if not nil, is
// its first attempt: a begun batch's finish), without those of partitions
// found fenced, and turns the outcome into the loop's: fenced or foreign
// messages are given back, retries exhausted redeliver the batch later.
func (w *Writer) apply(ctx context.Context, s *split, start time.Time, first func(context.Context) (projection.Result, error)) error {
	defer w.counted()
	for {
		// A partition lost or released since the batch was split (a batch
		// begun before the one that found it fenced): its messages go back.
		var gone []int
		for _, i := range s.mine {
			if k := s.part[i]; !w.fence.Holds(k) && !slices.Contains(gone, k) {
				gone = append(gone, k)
			}
		}
		if len(gone) > 0 && first == nil { // a begun batch's finish finds them itself (FencedError)
			s.lose(gone)
		}
		if len(s.mine) == 0 {
			break
		}
		var res projection.Result
		var err error
		if first != nil {
			res, err = first(ctx)
			first = nil
		} else {
			res, err = w.store.Apply(ctx, w.fence, s.messages())
		}
		var fe *projection.FencedError
		if errors.As(err, &fe) {
			w.tel.Fenced.Inc()
			lost := w.reacquireOwn(ctx, fe.Partitions)
			if len(lost) > 0 {
				w.log.Warn("partitions fenced: another instance acquired them; their messages given back unacked",
					zap.String("layout", fe.Layout), zap.Ints("partitions", lost), zap.String("owner", w.owner))
			}
			s.lose(lost)
			continue
		}
		if err != nil {
			if errors.Is(err, projection.ErrRetriesExhausted) {
				return fmt.Errorf("%w: %w", natsjs.ErrRedeliverLater, err)
			}
			if len(s.back) > 0 {
				// Partitions were lost on the way: a retry of the whole batch
				// would acquire them again for stale messages. All of it goes
				// back; what comes again is applied or a duplicate.
				return fmt.Errorf("%w: %w", natsjs.ErrGiveBack, err)
			}
			return err
		}
		w.tel.Batches.Observe(time.Since(start).Seconds())
		w.tel.Applied.Add(float64(res.Applied))
		w.tel.Duplicates.Add(float64(res.Duplicates))
		w.tel.DeadLettered.Add(float64(res.DeadLettered))
		w.tel.Redone.Add(float64(res.Redone))
		if res.DeadLettered > 0 {
			w.log.Warn("dead-lettered messages", zap.Int("count", res.DeadLettered))
		}
		break
	}
	if len(s.back) > 0 {
		return &natsjs.GiveBack{Back: s.back, Err: errNotHeld}
	}
	return nil
}

// errNotHeld is why a writer gives messages back: their partition is not
// (or no longer) its own.
var errNotHeld = errors.New("partition not held by this instance")

// InstanceID names this instance: host, process id and a random suffix (a
// restarted process with the same pid is another instance).
func InstanceID() string {
	host, err := os.Hostname()
	if err != nil {
		host = "unknown"
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(b[:]))
}

func watchLag(ctx context.Context, conses []jetstream.Consumer, tel *Telemetry, log *zap.Logger) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		var lag uint64
		failed := false
		for _, c := range conses {
			info, err := c.Info(ctx)
			if err != nil {
				failed = true
				if ctx.Err() == nil {
					log.Debug("consumer info", zap.Error(err))
				}
				continue
			}
			lag += info.NumPending + uint64(info.NumAckPending)
		}
		tel.sample(time.Now())
		if !failed {
			tel.Lag.Set(float64(lag))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// newLoop is a loop over cons (nil: the partitions attach theirs) applying
// with w; overlap begins a batch before the one in hand is finished
// (natsjs.LoopOptions.Begin).
func newLoop(cons jetstream.Consumer, w *Writer, cfg Config, overlap bool) *natsjs.Loop {
	opts := natsjs.LoopOptions{BatchSize: cfg.BatchSize, Linger: cfg.Linger, Logger: cfg.Logger}
	if overlap {
		opts.Begin = w.Begin
	}
	return natsjs.NewLoop(cons, w.Handle, opts)
}

// routes serves the probes and metrics. /readyz names what is not ready but
// not why in detail: a Postgres error holds its user, host and port, so it
// goes to the log only.
func routes(tel *Telemetry, consuming func() bool, pool *pgxpool.Pool, nc *nats.Conn, log *zap.Logger, pages *web.Handler) http.Handler {
	mux := http.NewServeMux()
	if pages != nil {
		pages.Register(mux)
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), time.Second)
		defer cancel()
		var problems []string
		if !nc.IsConnected() {
			problems = append(problems, "nats: not connected")
		}
		if err := pool.Ping(ctx); err != nil {
			log.Warn("readyz: postgres ping", zap.Error(redact.Error(err)))
			problems = append(problems, "postgres: unreachable")
		}
		if !consuming() {
			problems = append(problems, "consumer: retrying a batch")
		}
		if len(problems) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			for _, p := range problems {
				fmt.Fprintln(w, p)
			}
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(tel.Registry, promhttp.HandlerOpts{}))
	return mux
}
