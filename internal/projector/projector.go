// Package projector assembles the projector service: Postgres pool and
// migrations, the BUILDS stream and durable consumer, the consume loop
// applying batches through the projection store, and the HTTP endpoints.
package projector

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
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
	// one partition, the stream as published). With n > 1 the instance runs
	// a writer for each of the n partitions' durables, besides the durable
	// that reads what was stored before the layout was switched.
	Partitions int
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
	if _, _, err := natsjs.EnsureLayout(ctx, js, cfg.Stream, cfg.Prefix, cfg.Replicas, layout, log); err != nil {
		return err
	}
	// The durable reads the stream as published: all of it in layout p1;
	// in a partitioned layout, what was stored before the switch and strays.
	cons, err := natsjs.EnsureConsumer(ctx, js, cfg.Stream, cfg.Durable, cfg.Prefix, log)
	if err != nil {
		return err
	}
	tel := NewTelemetry()
	mem := cfg.Memory
	if layout.Partitioned() {
		mem = fold.Limits{Projects: cmp.Or(mem.Projects, fold.DefaultLimits.Projects) / layout.N(),
			IDs: cmp.Or(mem.IDs, fold.DefaultLimits.IDs) / layout.N()}
	}
	store := projection.New(pool, projection.Options{Prefix: cfg.Prefix, Gate: true, Logger: log, Observer: tel, Memory: mem})
	owner := InstanceID()
	rest := newPart(cons, NewWriter(store, tel, log, owner, projection.LayoutP1, 0), cfg, !layout.Partitioned(), 0, nil)
	var ps *partitions
	var group *natsjs.Group
	ready := rest.loop.Ready
	if layout.Partitioned() {
		// The writers share the pool: each has one batch in flight at a
		// time, so none holds a connection while it waits for another, and
		// as many are in flight as the pool has connections, so that a batch
		// is folded only when it can be written soon (each one in flight
		// holds its messages, fold and statements).
		slots := make(chan struct{}, max(int(pool.Config().MaxConns), 1))
		ps = &partitions{layout: layout, cfg: cfg, js: js, log: log, slots: slots, newWriter: func(k int) *Writer {
			return NewWriter(store, tel, log, owner, layout.Name(), k)
		}}
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
		ready = func() bool { return rest.loop.Ready() && ps.ready() }
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
	if err := runParts(ctx, rest, ps, group, log); err != nil {
		return err
	}
	// Acks are sent asynchronously: make sure they left before closing.
	if err := nc.FlushTimeout(5 * time.Second); err != nil {
		log.Warn("flush acks", zap.Error(err))
	}
	log.Info("projector stopped")
	return nil
}

// Writer adapts the projection store to the consume loop, as the writer of
// one partition: p1's (the durable), or one of a partitioned layout's (its
// partition's durable, given to this instance by the group: partitions.go).
// Every instance that pulls a durable pulls its pinned priority group and the
// server delivers to one of them;
// an instance that receives messages without holding the partition acquires
// it (projection.Store.Acquire: the epoch goes up, every earlier holder is
// fenced), so the pinned client becomes the writer. A batch fenced at commit
// (another instance acquired since: projection.ErrFenced) wrote nothing: it
// is given back unacked (natsjs.ErrGiveBack), the fence dropped, and the
// instance goes on pulling; it acquires again when messages reach it.
//
// Begin starts a batch (projection.Store.Begin: folded and sent, not
// committed) for the loop to finish after it has begun the next; Handle
// applies one at once (the loop's retries). Both are called by one loop, one
// batch at a time: the writer owns its fence.
type Writer struct {
	store     *projection.Store
	tel       *Telemetry
	log       *zap.Logger
	owner     string // names the instance in projector_partitions and the logs
	layout    string // the partition's row of projector_partitions
	partition int
	fence     *projection.Fence
	held      float64 // what this writer adds to tel.Remembered
}

// NewWriter returns the writer of layout's partition for the instance owner.
func NewWriter(store *projection.Store, tel *Telemetry, log *zap.Logger, owner, layout string, partition int) *Writer {
	return &Writer{store: store, tel: tel, log: log, owner: owner, layout: layout, partition: partition}
}

// remembered sets this writer's share of the memory gauge.
func (w *Writer) remembered(n float64) {
	w.tel.Remembered.Add(n - w.held)
	w.held = n
}

// Handle applies msgs under the writer's fence (natsjs.Handler).
func (w *Writer) Handle(ctx context.Context, msgs []jetstream.Msg) error {
	f, err := w.acquired(ctx)
	if err != nil {
		return err
	}
	start := time.Now()
	res, err := w.store.Apply(ctx, f, messagesOf(msgs))
	return w.settled(f, len(msgs), start, res, err)
}

// Begin starts msgs under the writer's fence (natsjs.Begin).
func (w *Writer) Begin(ctx context.Context, msgs []jetstream.Msg) func(context.Context) error {
	start := time.Now()
	f, err := w.acquired(ctx)
	if err != nil {
		return func(context.Context) error { return err } // transient: the loop retries the batch
	}
	p := w.store.Begin(ctx, f, messagesOf(msgs))
	return func(ctx context.Context) error {
		res, err := p.Finish(ctx)
		return w.settled(f, len(msgs), start, res, err)
	}
}

func messagesOf(msgs []jetstream.Msg) []projection.Message {
	batch := make([]projection.Message, len(msgs))
	for i, m := range msgs {
		pm := projection.Message{Subject: m.Subject(), Data: m.Data()}
		if md, err := m.Metadata(); err == nil {
			pm.Seq, pm.StoredAt = md.Sequence.Stream, md.Timestamp
		}
		batch[i] = pm
	}
	return batch
}

// acquired returns the writer's fence, acquiring the partition if it holds none.
func (w *Writer) acquired(ctx context.Context) (*projection.Fence, error) {
	if w.fence != nil {
		return w.fence, nil
	}
	f, err := w.store.Acquire(ctx, w.layout, w.partition, w.owner)
	if err != nil {
		return nil, err
	}
	w.fence = &f
	w.tel.Acquired.Inc()
	w.tel.Owned.Inc()
	w.log.Info("partition acquired", zap.String("layout", f.Layout), zap.Int("partition", f.Partition),
		zap.Int64("epoch", f.Epoch), zap.Uint64("applied_seq", f.AppliedSeq), zap.String("owner", w.owner))
	return w.fence, nil
}

// release drops the writer's fence, if it holds one (its partition's loop
// has stopped).
func (w *Writer) release() {
	if w.fence != nil {
		w.tel.Owned.Dec()
		w.fence = nil
	}
	w.remembered(0)
}

// settled counts what a batch applied under f did, and turns its error into
// the loop's: fenced (the fence is dropped, if it is still the writer's)
// gives the batch back, retries exhausted redeliver it later.
func (w *Writer) settled(f *projection.Fence, n int, start time.Time, res projection.Result, err error) error {
	if errors.Is(err, projection.ErrFenced) {
		w.tel.Fenced.Inc()
		if w.fence == f {
			w.tel.Owned.Dec()
			w.log.Warn("partition fenced: another instance acquired it; batch given back unacked",
				zap.String("layout", f.Layout), zap.Int("partition", f.Partition),
				zap.Int64("epoch", f.Epoch), zap.Int("messages", n), zap.String("owner", w.owner))
			w.fence = nil
			w.remembered(0)
		}
		return fmt.Errorf("%w: %w", natsjs.ErrGiveBack, err)
	}
	if err != nil {
		if errors.Is(err, projection.ErrRetriesExhausted) {
			return fmt.Errorf("%w: %w", natsjs.ErrRedeliverLater, err)
		}
		return err
	}
	w.tel.Batches.Observe(time.Since(start).Seconds())
	w.tel.Applied.Add(float64(res.Applied))
	w.tel.Duplicates.Add(float64(res.Duplicates))
	w.tel.DeadLettered.Add(float64(res.DeadLettered))
	w.tel.Redone.Add(float64(res.Redone))
	w.remembered(float64(f.Remembered()))
	if res.DeadLettered > 0 {
		w.log.Warn("dead-lettered messages", zap.Int("count", res.DeadLettered))
	}
	return nil
}

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

// part is one consumer and the loop that applies it with its writer.
type part struct {
	cons jetstream.Consumer
	loop *natsjs.Loop
}

func newPart(cons jetstream.Consumer, w *Writer, cfg Config, overlap bool, buffer int, slots chan struct{}) *part {
	opts := natsjs.LoopOptions{BatchSize: cfg.BatchSize, Linger: cfg.Linger, Logger: cfg.Logger, Buffer: buffer, Slots: slots}
	if overlap {
		opts.Begin = w.Begin
	}
	return &part{cons: cons, loop: natsjs.NewLoop(cons, w.Handle, opts)}
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
