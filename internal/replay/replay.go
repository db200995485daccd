package replay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/projection"
)

// Shadow schema names of the two commands.
const (
	RebuildShadow = "buildstate_shadow"
	VerifyShadow  = "buildstate_verify"
)

// Options tune a replay.
type Options struct {
	Batch          int           // messages per read (and per transaction of an incremental replay), default DefaultBatch
	Incremental    bool          // replay through the store's Apply, batch by batch, instead of Load
	AllowTruncated bool          // replay a stream whose history is not whole
	Progress       io.Writer     // progress lines go here (nil: none)
	ProgressEvery  time.Duration // default 1s
	Logger         *zap.Logger   // default no-op
}

func (o *Options) defaults() {
	if o.Batch <= 0 {
		o.Batch = DefaultBatch
	}
	if o.ProgressEvery <= 0 {
		o.ProgressEvery = time.Second
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
}

// Stats is what a replay did.
type Stats struct {
	Messages int // messages read and applied
	Result   projection.Result
	Through  uint64        // the last sequence asked for
	Elapsed  time.Duration // wall time
}

// PerSecond is the replay's rate in messages per second.
func (s Stats) PerSecond() float64 {
	if s.Elapsed <= 0 {
		return 0
	}
	return float64(s.Messages) / s.Elapsed.Seconds()
}

// Into replays the messages of the log in (from, to] into the shadow, one
// transaction per batch of opts.Batch messages, in stream order: the same
// Apply as the live projector, so the same rules, with big batches. The next
// batch is read from the stream while the current one is applied, and the
// shadow's planner statistics are refreshed each time the count of applied
// messages doubles (projection.Shadow.Analyze).
func Into(ctx context.Context, log Log, sh *projection.Shadow, from, to uint64, opts Options, label string) (Stats, error) {
	opts.defaults()
	start := time.Now()
	st := Stats{Through: to}
	p := newProgress(opts.Progress, opts.ProgressEvery, label, int(to-min(from, to)))
	store := sh.Store()
	nextAnalyze := 2 * opts.Batch // statistics refreshed each time the applied count doubles
	err := log.Read(ctx, Span{From: from, To: to, Batch: opts.Batch}, func(msgs []projection.Message) error {
		if st.Messages >= nextAnalyze {
			if err := sh.Analyze(ctx); err != nil {
				return err
			}
			nextAnalyze = 2 * st.Messages
		}
		res, err := store.Apply(ctx, nil, msgs)
		if err != nil {
			return fmt.Errorf("apply sequences %d-%d: %w", msgs[0].Seq, msgs[len(msgs)-1].Seq, err)
		}
		st.Messages += len(msgs)
		st.Result.Applied += res.Applied
		st.Result.Duplicates += res.Duplicates
		st.Result.DeadLettered += res.DeadLettered
		p.add(len(msgs))
		return nil
	})
	st.Elapsed = time.Since(start)
	if err != nil {
		return st, fmt.Errorf("%s: %w", label, err)
	}
	p.finish()
	return st, nil
}

// Load replays the messages of the log up to sequence to into the fresh,
// empty shadow sh as bulk work (projection.Loader): it reads the stream in
// batches of opts.Batch, decodes each batch on every core and folds it in
// memory with the store's rules (Fold) while the next batch is read; the
// applied marks stream into projector_applied meanwhile; then every other
// table is written with COPY. No message costs a round trip to Postgres.
// The fold holds the log's read model and one digest per event id: memory
// grows with the log (about 300 bytes an event).
func Load(ctx context.Context, log Log, sh *projection.Shadow, to uint64, opts Options, label string) (Stats, error) {
	opts.defaults()
	start := time.Now()
	st := Stats{Through: to}
	ld, err := sh.BeginLoad(ctx)
	if err != nil {
		return st, fmt.Errorf("%s: %w", label, err)
	}
	// Three stages run at once: the read's callback decodes a batch (on
	// every core) while the fold stage folds the previous one in and sends
	// its applied marks to their COPY. done closes when that COPY returns,
	// so that a failed COPY never leaves a stage blocked.
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	marks := make(chan []projection.Applied, 4)
	spare := make(chan []projection.Applied, 8) // batches of marks copied, for reuse
	done := make(chan struct{})
	var copyErr error
	go func() { // owner: Load, which waits on done below
		defer close(done)
		copyErr = ld.Applied(cctx, func(yield func([]projection.Applied) bool) {
			for batch := range marks {
				if !yield(batch) {
					return
				}
				select {
				case spare <- batch[:0]:
				default:
				}
			}
		})
	}()

	f := NewFold(log.Prefix)
	var pending []projection.Applied
	f.Applied = func(a projection.Applied) { pending = append(pending, a) }
	p := newProgress(opts.Progress, opts.ProgressEvery, label+": read", int(to))
	decodedc := make(chan Decoded, 1)
	folded := make(chan Decoded, 2) // batches folded in, for reuse
	failed := make(chan struct{})   // closed when the fold stage stops early
	var foldErr error
	foldDone := make(chan struct{})
	go func() { // owner: Load, which waits on foldDone below
		defer close(foldDone)
		for b := range decodedc {
			if foldErr != nil {
				continue // drain
			}
			select {
			case pending = <-spare:
			default:
				pending = make([]projection.Applied, 0, b.Len())
			}
			if foldErr = f.AddDecoded(b); foldErr == nil && len(pending) > 0 {
				select {
				case marks <- pending:
				case <-done:
					foldErr = fmt.Errorf("copy event ids: %w", copyErr)
				}
			}
			if foldErr != nil {
				close(failed)
				continue
			}
			st.Messages += b.Len()
			p.add(b.Len())
			select {
			case folded <- b:
			default:
			}
		}
	}()
	err = log.Read(ctx, Span{To: to, Batch: opts.Batch}, func(msgs []projection.Message) error {
		var reuse Decoded
		select {
		case reuse = <-folded:
		default:
		}
		select {
		case decodedc <- f.Decode(msgs, reuse):
			return nil
		case <-failed:
			return errFoldStopped
		}
	})
	close(decodedc)
	<-foldDone
	if errors.Is(err, errFoldStopped) || (err == nil && foldErr != nil) {
		err = foldErr
	}
	if err != nil {
		cancel()
		close(marks)
		<-done
		st.Elapsed = time.Since(start)
		return st, fmt.Errorf("%s: %w", label, err)
	}
	p.finish()
	c := f.Counts()
	st.Result = projection.Result{Applied: c.Applied, Duplicates: c.Duplicates, DeadLettered: c.Refused}
	// Every mark is sent: their COPY, or the key built after it, goes on
	// while the other tables are written.
	close(marks)
	f.Seal()
	written := time.Now()
	select {
	case <-done: // the marks' COPY is over already: if it failed, stop here
		err = copyErr
	default:
	}
	if err == nil {
		err = ld.Finish(ctx, f.Bulk())
	}
	if err != nil {
		cancel()
	}
	<-done
	if err == nil {
		err = copyErr
	}
	if err == nil {
		err = ld.Complete(ctx)
	}
	st.Elapsed = time.Since(start)
	if err != nil {
		return st, fmt.Errorf("%s: %w", label, err)
	}
	rows := ld.Stats()
	if opts.Progress != nil {
		fmt.Fprintf(opts.Progress, "%s: wrote %d projects, %d metrics rows, %d facts, %d event ids, %d dead letters; the rest in %s\n",
			label, rows["projects"], rows["project_build_metrics"], rows["projector_facts"], rows["projector_applied"],
			rows["projector_dead_letters"], time.Since(written).Round(100*time.Millisecond))
	}
	return st, nil
}

// errFoldStopped stops a read whose fold stage failed (Load).
var errFoldStopped = errors.New("fold stopped")

// fill replays (0, to] into the fresh shadow sh: Load, or Into when
// opts.Incremental.
func fill(ctx context.Context, log Log, sh *projection.Shadow, to uint64, opts Options, label string) (Stats, error) {
	if opts.Incremental {
		return Into(ctx, log, sh, 0, to, opts, label)
	}
	return Load(ctx, log, sh, to, opts, label)
}

// RebuildOptions tune Rebuild.
type RebuildOptions struct {
	Options
	Store  projection.Options // Prefix, Logger, Observer of the shadow's store
	Shadow string             // schema, default RebuildShadow
	DryRun bool               // build the shadow and leave it, no swap
}

// RebuildResult is what Rebuild did.
type RebuildResult struct {
	Shadow  string
	History History // the stream when the rebuild started
	Replay  Stats   // the replay of the history
	CatchUp Stats   // the messages stored meanwhile, applied under the gate
	Swapped bool
	Elapsed time.Duration
}

// Rebuild replays the whole stream into a fresh shadow schema and, unless
// opts.DryRun, swaps it in for the live read model (projection.Shadow.Swap
// explains why readers never see a half-built model and why a projector
// running meanwhile neither skips nor repeats an event). It refuses a stream
// whose history is not whole unless opts.AllowTruncated.
//
// Phase 1 replays up to the stream's last sequence at the start (Load, or
// Into with opts.Incremental), without blocking the live projector. Phase 2 takes the rebuild gate exclusive (the
// live projector pauses between batches), replays what was stored in the
// meantime, and swaps, in one transaction.
func Rebuild(ctx context.Context, live *pgxpool.Pool, log Log, opts RebuildOptions) (RebuildResult, error) {
	opts.defaults()
	if opts.Shadow == "" {
		opts.Shadow = RebuildShadow
	}
	if opts.Store.Prefix == "" {
		opts.Store.Prefix = log.Prefix
	}
	start := time.Now()
	res := RebuildResult{Shadow: opts.Shadow}
	h, err := log.History(ctx)
	if err != nil {
		return res, fmt.Errorf("rebuild: %w", err)
	}
	res.History = h
	if err := h.Check(opts.AllowTruncated); err != nil {
		return res, fmt.Errorf("rebuild: %w", err)
	}
	sh, err := projection.OpenShadow(ctx, live, opts.Shadow, opts.Store)
	if err != nil {
		return res, fmt.Errorf("rebuild: %w", err)
	}
	defer sh.Close()
	opts.Logger.Info("rebuild: replaying", zap.String("shadow", opts.Shadow), zap.Uint64("through", h.Last))
	res.Replay, err = fill(ctx, log, sh, h.Last, opts.Options, "rebuild")
	if err != nil {
		return res, fmt.Errorf("rebuild: %w", err)
	}
	// Fresh statistics for the shadow, and so for the live tables after the
	// swap (a bulk load takes each table's as it finishes it).
	if opts.Incremental {
		if err := sh.Analyze(ctx); err != nil {
			return res, fmt.Errorf("rebuild: %w", err)
		}
	}
	if opts.DryRun {
		res.Elapsed = time.Since(start)
		return res, nil
	}
	err = sh.Swap(ctx, func(ctx context.Context) error {
		now, err := log.History(ctx)
		if err != nil {
			return err
		}
		catch := opts.Options
		catch.Progress = nil
		res.CatchUp, err = Into(ctx, log, sh, h.Last, now.Last, catch, "catch-up")
		return err
	})
	if err != nil {
		return res, fmt.Errorf("rebuild: %w", err)
	}
	res.Swapped = true
	res.Elapsed = time.Since(start)
	opts.Logger.Info("rebuild: swapped", zap.Uint64("through", res.CatchUp.Through), zap.Duration("elapsed", res.Elapsed))
	return res, nil
}
