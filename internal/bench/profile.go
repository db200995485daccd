package bench

import (
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"regexp"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
)

// ProfileConfig is an in-process catch-up: the projector's own pieces
// (projection.Store, natsjs.Loop, projector.Writer) in this process, so
// that a CPU profile and a per-statement timing can be taken.
type ProfileConfig struct {
	Batch      int
	Linger     time.Duration
	CPUProfile string // write a pprof CPU profile here ("" none)
	// Explain, if set, receives the EXPLAIN ANALYZE plan of every statement of
	// ExplainBatches batches taken mid-run, from auto_explain (loaded in the
	// projector's sessions, with its output sent to the client as notices).
	// Plans are taken on a separate run: auto_explain's timing slows it.
	Explain        io.Writer
	ExplainBatches int
	ExplainAfter   int    // transactions to let pass first (default 20)
	PGParams       string // Postgres settings for the pool (ProjectorConfig.PGParams)
}

// ProfileResult is an in-process catch-up's figures.
type ProfileResult struct {
	Events     int
	Elapsed    time.Duration
	Statements []StatementTime // by total time, largest first
	Batches    int
}

// StatementTime is the time spent on one statement over a run, measured
// in the client from the request of its result to its end (server time
// plus the network, plus the scan of its rows).
type StatementTime struct {
	Name  string
	Count int
	Total time.Duration
}

// Profile runs the apply path in this process over the backlog.
func (e *Env) Profile(ctx context.Context, b Backlog, cfg ProfileConfig) (ProfileResult, error) {
	res := ProfileResult{Events: b.Events}
	url, err := e.NewDatabase(ctx, "profile")
	if err != nil {
		return res, err
	}
	pcfg, err := pgxpool.ParseConfig(withParams(url, cfg.PGParams))
	if err != nil {
		return res, err
	}
	fromURL := maps.Clone(pcfg.ConnConfig.RuntimeParams)
	projection.ConfigurePool(pcfg) // as the projector does
	for k, v := range fromURL {
		if strings.Contains(cfg.PGParams, k+"=") { // --pg-params wins
			pcfg.ConnConfig.RuntimeParams[k] = v
		}
	}
	tr := &stmtTracer{times: map[string]*StatementTime{}}
	pcfg.ConnConfig.Tracer = tr
	var explain *explainer
	if cfg.Explain != nil {
		skip := cfg.ExplainAfter
		if skip <= 0 {
			skip = 20
		}
		explain = &explainer{w: cfg.Explain, want: max(cfg.ExplainBatches, 1), skip: skip}
		pcfg.ConnConfig.OnNotice = explain.notice
		pcfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
			_, err := c.Exec(ctx, `LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;
				SET auto_explain.log_analyze = on; SET auto_explain.log_buffers = on;
				SET auto_explain.log_nested_statements = on; SET auto_explain.log_level = notice`)
			return err
		}
		tr.onBatch = explain.batch
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return res, err
	}
	defer pool.Close()
	// The projector's side runs under the pprof label role=projector, its
	// NATS connection included (its goroutines inherit the label), so that
	// the profile tells it from the embedded NATS server in this process:
	// go tool pprof -tagfocus role=projector.
	labels := pprof.Labels("role", "projector")
	var nc *nats.Conn
	pprof.Do(ctx, labels, func(context.Context) { nc, err = nats.Connect(e.NATSURL, nats.Name("bench profile")) })
	if err != nil {
		return res, fmt.Errorf("profile: nats: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return res, fmt.Errorf("profile: jetstream: %w", err)
	}
	durable := "bench-" + randomSuffix()
	cons, err := natsjs.EnsureConsumer(ctx, js, b.Stream.Name, durable, b.Stream.Prefix, nil)
	if err != nil {
		return res, err
	}
	defer func() { _ = e.js.DeleteConsumer(context.WithoutCancel(ctx), b.Stream.Name, durable) }()
	store := projection.New(pool, projection.Options{Prefix: b.Stream.Prefix, Gate: true, Logger: zap.NewNop()})
	w := projector.NewWriter(store, projector.NewTelemetry(), zap.NewNop(), "bench-profile", b.Stream.Prefix, events.Layout{})
	w.Want(0)
	loop := natsjs.NewLoop(cons, w.Handle, natsjs.LoopOptions{BatchSize: cfg.Batch, Linger: cfg.Linger, Begin: w.Begin})

	if cfg.CPUProfile != "" {
		f, err := os.Create(cfg.CPUProfile)
		if err != nil {
			return res, err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return res, err
		}
		defer pprof.StopCPUProfile()
	}
	lctx, stop := context.WithCancel(ctx)
	defer stop()
	loopDone := make(chan error, 1)
	start := time.Now()
	go pprof.Do(lctx, labels, func(lctx context.Context) { loopDone <- loop.Run(lctx) }) // owner: Profile, which waits for loopDone
	_, werr := waitAcked(ctx, []jetstream.Consumer{cons}, b.LastSeq, nil)
	res.Elapsed = time.Since(start)
	stop()
	if err := <-loopDone; err != nil && werr == nil {
		werr = err
	}
	if werr != nil {
		return res, werr
	}
	res.Statements, res.Batches = tr.results()
	return res, nil
}

var spaces = regexp.MustCompile(`\s+`)

// stmtName shortens a statement to its first words.
func stmtName(sql string) string {
	s := strings.TrimSpace(spaces.ReplaceAllString(sql, " "))
	if len(s) > 90 {
		s = s[:90] + "…"
	}
	return s
}

// stmtTracer times statements, in batches (from the request of each result
// to its end) and alone (begin, commit and the follow-up reads).
type stmtTracer struct {
	mu      sync.Mutex
	times   map[string]*StatementTime
	batches int
	onBatch func()
}

type traceStart struct{}

func (t *stmtTracer) add(name string, d time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.times[name]
	if st == nil {
		st = &StatementTime{Name: name}
		t.times[name] = st
	}
	st.Count++
	st.Total += d
}

func (t *stmtTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	return context.WithValue(ctx, traceStart{}, [2]any{time.Now(), d.SQL})
}

func (t *stmtTracer) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryEndData) {
	v, ok := ctx.Value(traceStart{}).([2]any)
	if !ok {
		return
	}
	t.add(stmtName(v[1].(string)), time.Since(v[0].(time.Time)))
}

func (t *stmtTracer) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	t.mu.Lock()
	t.batches++
	t.mu.Unlock()
	if t.onBatch != nil {
		t.onBatch()
	}
	return context.WithValue(ctx, traceStart{}, [2]any{time.Now(), "(batch: send and wait for the first result)"})
}

func (t *stmtTracer) TraceBatchQuery(_ context.Context, _ *pgx.Conn, d pgx.TraceBatchQueryData) {
	t.add(stmtName(d.SQL), time.Since(d.ReadStartTime))
}

func (t *stmtTracer) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

func (t *stmtTracer) results() ([]StatementTime, int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]StatementTime, 0, len(t.times))
	for _, st := range t.times {
		out = append(out, *st)
	}
	slices.SortFunc(out, func(a, b StatementTime) int { return int(b.Total - a.Total) })
	return out, t.batches
}

// explainer turns auto_explain on for a few batches mid-run and writes
// the plans it sends as notices.
type explainer struct {
	mu         sync.Mutex
	w          io.Writer
	skip, want int
	n          int
}

func (x *explainer) batch() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.n++
}

func (x *explainer) notice(_ *pgconn.PgConn, n *pgconn.Notice) {
	x.mu.Lock()
	defer x.mu.Unlock()
	// Two pgx batches (reads, writes) per transaction.
	if x.n > 2*x.skip && x.n <= 2*(x.skip+x.want) {
		fmt.Fprintf(x.w, "-- batch %d\n%s\n\n", x.n, n.Message)
	}
}
