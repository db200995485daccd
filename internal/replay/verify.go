package replay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
)

// ErrNotCaughtUp is returned by Verify when the live projector still has
// messages to apply after the wait.
var ErrNotCaughtUp = errors.New("the projector has not caught up")

// VerifyOptions tune Verify.
type VerifyOptions struct {
	Options
	Store     projection.Options // Prefix, Logger of the shadow's store
	Shadow    string             // schema, default VerifyShadow
	Durable   string             // the live projector's durable consumer
	Wait      time.Duration      // how long to wait for it to catch up, default 30s
	NoRebuild bool               // only the checks of the live rows
	MaxFaults int                // rows of each kind to report, default 20
}

// Report is what Verify found.
type Report struct {
	Faults     []projection.Fault // live rows breaking a rule (at most MaxFaults)
	Compared   bool               // a replay was compared with the live model
	Through    uint64             // the replay's last sequence: the projector's position when it had caught up
	Replay     Stats
	Diff       projection.Diff
	MovedTo    uint64 // the projector's position after the comparison, if it moved past Through
	StreamLast uint64 // the stream's last sequence after the comparison
}

// OK reports whether nothing is wrong.
func (r Report) OK() bool { return len(r.Faults) == 0 && r.Diff.Empty() }

// Stale reports whether the log grew while the comparison ran, so that a
// difference may come from the new events rather than from a fault.
func (r Report) Stale() bool {
	return r.Compared && (r.MovedTo > r.Through || r.StreamLast > r.Through)
}

// Verify checks the live read model: the rules its rows must keep (always),
// and, unless NoRebuild, that a replay of the stream into a fresh shadow
// schema equals it row by row. For the comparison to mean anything the live
// model must hold exactly the replayed events: Verify waits (up to Wait)
// until the durable consumer has nothing pending or unacknowledged, and
// replays up to its acknowledged position. The shadow is dropped afterwards.
//
// An error means Verify could not do its work; faults and differences are in
// the report (Report.OK).
func Verify(ctx context.Context, live *pgxpool.Pool, log Log, opts VerifyOptions) (Report, error) {
	opts.defaults()
	if opts.Shadow == "" {
		opts.Shadow = VerifyShadow
	}
	if opts.Wait <= 0 {
		opts.Wait = 30 * time.Second
	}
	if opts.MaxFaults <= 0 {
		opts.MaxFaults = 20
	}
	if opts.Store.Prefix == "" {
		opts.Store.Prefix = log.Prefix
	}
	var rep Report
	faults, err := projection.New(live, projection.Options{Prefix: log.Prefix}).Check(ctx, opts.MaxFaults)
	if err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
	rep.Faults = faults
	if opts.NoRebuild {
		return rep, nil
	}
	h, err := log.History(ctx)
	if err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
	if err := h.Check(opts.AllowTruncated); err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
	// The durable, and in a partitioned layout each partition's durable: the
	// live model has applied the log once every one is caught up.
	names := []string{opts.Durable}
	for k := range log.Layout.N() {
		if log.Layout.Partitioned() {
			names = append(names, natsjs.PartitionDurable(opts.Durable, log.Layout, k))
		}
	}
	var conses []jetstream.Consumer
	for _, name := range names {
		cons, err := log.JS.Consumer(ctx, log.Stream, name)
		if err != nil {
			return rep, fmt.Errorf("verify: durable consumer %q on %s: %w (has `projector run` consumed this stream with that --durable?)",
				name, log.Stream, err)
		}
		conses = append(conses, cons)
	}
	// Caught up all at once: a pass over every durable in which none moved
	// since the pass before (messages may arrive while one waits).
	var through uint64
	floors := make([]uint64, len(conses))
	for pass := 0; ; pass++ {
		moved := false
		for i, cons := range conses {
			at, err := caughtUp(ctx, cons, opts.Wait)
			if err != nil {
				return rep, fmt.Errorf("verify: %w", err)
			}
			moved = moved || at != floors[i]
			floors[i] = at
			through = max(through, at)
		}
		if len(conses) == 1 || (pass > 0 && !moved) {
			break
		}
	}
	rep.Through = through
	sh, err := projection.OpenShadow(ctx, live, opts.Shadow, opts.Store)
	if err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
	defer sh.Close()
	opts.Logger.Info("verify: replaying", zap.String("shadow", opts.Shadow), zap.Uint64("through", through))
	rep.Replay, err = fill(ctx, log, sh, through, opts.Options, "verify")
	if err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
	rep.Diff, err = sh.Diff(ctx, opts.MaxFaults)
	if err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
	rep.Compared = true
	if err := sh.Drop(ctx); err != nil {
		return rep, fmt.Errorf("verify: %w", err)
	}
	for _, cons := range conses {
		if info, err := cons.Info(ctx); err == nil {
			rep.MovedTo = max(rep.MovedTo, info.AckFloor.Stream)
		}
	}
	if h, err := log.History(ctx); err == nil {
		rep.StreamLast = h.Last
	}
	return rep, nil
}

// caughtUp waits until cons has nothing pending or awaiting an ack and
// returns its acknowledged stream position.
func caughtUp(ctx context.Context, cons jetstream.Consumer, wait time.Duration) (uint64, error) {
	deadline := time.Now().Add(wait)
	for {
		info, err := cons.Info(ctx)
		if err != nil {
			return 0, fmt.Errorf("consumer info: %w", err)
		}
		if info.NumPending == 0 && info.NumAckPending == 0 {
			return info.AckFloor.Stream, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%w within %s: %d messages pending, %d awaiting ack on %s (run with a longer --wait, "+
				"or --no-rebuild for the row checks only)", ErrNotCaughtUp, wait, info.NumPending, info.NumAckPending, info.Name)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Write prints the report: faults, then the diff as "- live" and "+ replay"
// lines, then a summary line.
func (r Report) Write(w io.Writer) {
	for _, f := range r.Faults {
		fmt.Fprintf(w, "fault  %-40s %s: %s\n", f.Check, f.Key, f.Detail)
	}
	for _, d := range r.Diff.Rows {
		sign, side := "-", "live  "
		if d.Side == projection.SideShadow {
			sign, side = "+", "replay"
		}
		fmt.Fprintf(w, "%s %s %s\n", sign, side, diffText(d))
	}
	shown := len(r.Diff.Rows)
	if total := r.Diff.Projects + r.Diff.Metrics; total > shown {
		fmt.Fprintf(w, "... %d more differing rows not shown\n", total-shown)
	}
	switch {
	case !r.Compared:
		fmt.Fprintf(w, "verify: %d faults in the live rows (no replay compared)\n", len(r.Faults))
	default:
		fmt.Fprintf(w, "verify: %d faults; replay of %d messages (through seq %d) vs live: %d projects rows and %d metrics rows differ\n",
			len(r.Faults), r.Replay.Messages, r.Through, r.Diff.Projects, r.Diff.Metrics)
	}
}

// Err is nil for a clean report, else an error that says what was found and,
// when the log grew meanwhile, that the result may be stale.
func (r Report) Err() error {
	if r.OK() {
		return nil
	}
	var parts []string
	if n := len(r.Faults); n > 0 {
		parts = append(parts, fmt.Sprintf("%d live rows break the read model's rules", n))
	}
	if !r.Diff.Empty() {
		parts = append(parts, fmt.Sprintf("the live model differs from a replay of the stream through seq %d (%d projects rows, %d metrics rows)",
			r.Through, r.Diff.Projects, r.Diff.Metrics))
	}
	msg := "verify: " + strings.Join(parts, "; ")
	if r.Stale() {
		msg += fmt.Sprintf("; the log grew during the verify (projector now at seq %d, stream at %d): the result may be stale, run verify again when it is quiet",
			r.MovedTo, r.StreamLast)
	}
	return errors.New(msg)
}

func diffText(d projection.DiffRow) string {
	if p := d.Project; p != nil {
		return fmt.Sprintf("projects %s %s current=%s started=%s completed=%s framework=%s",
			p.ProjectID, p.BuildStatus, str(p.CurrentBuildID), ts(p.LastBuildStarted), ts(p.LastBuildCompleted), str(p.Framework))
	}
	m := d.Metrics
	return fmt.Sprintf("metrics %s project=%s %s queued=%s started=%s completed=%s duration_ms=%s framework=%s node=%s pm=%s attempt=%s error=%s",
		m.BuildID, m.ProjectID, m.Status, ts(m.QueuedAt), m.StartedAt.UTC().Format(time.RFC3339Nano), ts(m.CompletedAt),
		num(m.DurationMS), str(m.Framework), str(m.NodeVersion), str(m.PackageManager), num(m.Attempt), quoted(m.Error))
}

func str(s *string) string {
	if s == nil {
		return "NULL"
	}
	return *s
}

func quoted(s *string) string {
	if s == nil {
		return "NULL"
	}
	return strconv.Quote(*s)
}

func num(n *int64) string {
	if n == nil {
		return "NULL"
	}
	return strconv.FormatInt(*n, 10)
}

func ts(t *time.Time) string {
	if t == nil {
		return "NULL"
	}
	return t.UTC().Format(time.RFC3339Nano)
}
