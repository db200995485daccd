package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/fsm"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/replay"
	"github.com/buildstate/buildstate/internal/web"
	"github.com/buildstate/buildstate/internal/when"
)

// runRebuild is `projector rebuild`: replay the whole stream into a shadow
// schema and swap it in (replay.Rebuild).
func runRebuild(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs, c := newFlags("rebuild", getenv, stderr)
	dryRun := fs.Bool("dry-run", false, "build the shadow schema and leave it for inspection; do not swap")
	opts := replayFlags(fs, "replay a stream whose early messages were dropped (the result misses them)")
	r, closeAll, err := startReplay(ctx, fs, c, opts, args, getenv, stdout, stderr)
	if err != nil {
		return err
	}
	defer closeAll()
	res, err := replay.Rebuild(ctx, r.pool, r.log, replay.RebuildOptions{
		Options: r.opts,
		Store:   r.store,
		DryRun:  *dryRun,
	})
	if err != nil {
		return err
	}
	st := res.Replay
	fmt.Fprintf(stdout, "replayed %d messages (through seq %d) in %s, %.0f/s: %d applied, %d duplicates, %d dead letters\n",
		st.Messages, st.Through, st.Elapsed.Round(time.Millisecond), st.PerSecond(), st.Result.Applied, st.Result.Duplicates, st.Result.DeadLettered)
	if !res.History.Whole() {
		fmt.Fprintf(stdout, "warning: the stream's history is truncated (first seq %d): the rebuilt model misses the dropped events\n", res.History.First)
	}
	if *dryRun {
		fmt.Fprintf(stdout, "dry run: shadow schema %s left for inspection (not swapped); e.g. SET search_path TO %s\n", res.Shadow, res.Shadow)
		return nil
	}
	fmt.Fprintf(stdout, "caught up %d messages (through seq %d) and swapped %s in, in %s total\n",
		res.CatchUp.Messages, res.CatchUp.Through, res.Shadow, res.Elapsed.Round(time.Millisecond))
	return nil
}

// replayOpts are the replay flags that rebuild and verify share.
type replayOpts struct {
	batch                       *int
	allowTruncated, incremental *bool
}

func replayFlags(fs *flag.FlagSet, truncatedUsage string) replayOpts {
	return replayOpts{
		batch:          fs.Int("batch", replay.DefaultBatch, "messages per read of the stream (and per transaction with --incremental)"),
		allowTruncated: fs.Bool("allow-truncated", false, truncatedUsage),
		incremental:    fs.Bool("incremental", false, "replay through the live path's Apply, a transaction per batch, instead of in bulk (slower; for comparison)"),
	}
}

// collector sets the collector up for a bulk replay (not for an incremental
// one, which holds little) and returns what puts the old settings back.
func (o replayOpts) collector(getenv func(string) string) (restore func()) {
	if *o.incremental {
		return func() {}
	}
	return collectorDefaults(getenv, replayGCPercent, replayMemoryLimit)
}

// replayRun is what rebuild and verify share once their flags are parsed.
type replayRun struct {
	pool  *pgxpool.Pool
	log   replay.Log
	opts  replay.Options
	store projection.Options
}

// startReplay parses args, sets the collector up for the replay, and opens
// Postgres and the stream; closeAll undoes it all. Progress lines are human
// output: they go to stdout, and stderr has only log lines.
func startReplay(ctx context.Context, fs *flag.FlagSet, c *common, o replayOpts, args []string,
	getenv func(string) string, stdout, stderr io.Writer) (r replayRun, closeAll func(), err error) {
	if err := fs.Parse(args); err != nil {
		return r, nil, err
	}
	restore := o.collector(getenv)
	logger, err := c.logger(stderr)
	if err != nil {
		restore()
		return r, nil, err
	}
	pool, lg, closeReplay, err := openReplay(ctx, c, logger)
	if err != nil {
		_ = logger.Sync()
		restore()
		return r, nil, err
	}
	r = replayRun{pool: pool, log: lg, opts: o.options(stdout, logger),
		store: projection.Options{Prefix: c.cfg.Prefix, Logger: logger}}
	return r, func() {
		closeReplay()
		_ = logger.Sync()
		restore()
	}, nil
}

func (o replayOpts) options(progress io.Writer, log *zap.Logger) replay.Options {
	return replay.Options{Batch: *o.batch, AllowTruncated: *o.allowTruncated, Incremental: *o.incremental, Progress: progress, Logger: log}
}

// runVerify is `projector verify`: the live rows' checks, and a replay
// compared with the live model (replay.Verify). Any fault is an error.
func runVerify(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs, c := newFlags("verify", getenv, stderr)
	noRebuild := fs.Bool("no-rebuild", false, "only check the live rows; no replay")
	wait := fs.Duration("wait", 30*time.Second, "how long to wait for the projector to apply what is pending")
	opts := replayFlags(fs, "compare with a replay of a stream whose early messages were dropped")
	maxRows := fs.Int("max-diff", 20, "most faults and differing rows of each table to print")
	r, closeAll, err := startReplay(ctx, fs, c, opts, args, getenv, stdout, stderr)
	if err != nil {
		return err
	}
	defer closeAll()
	rep, err := replay.Verify(ctx, r.pool, r.log, replay.VerifyOptions{
		Options:   r.opts,
		Store:     r.store,
		Durable:   c.cfg.Durable,
		Wait:      *wait,
		NoRebuild: *noRebuild,
		MaxFaults: *maxRows,
	})
	if err != nil {
		return err
	}
	rep.Write(stdout)
	return rep.Err()
}

// openReplay opens the live pool, checks its schema, and connects to the stream.
func openReplay(ctx context.Context, c *common, log *zap.Logger) (*pgxpool.Pool, replay.Log, func(), error) {
	pool, err := projector.OpenPool(ctx, c.cfg.DatabaseURL)
	if err != nil {
		return nil, replay.Log{}, nil, err
	}
	if err := projector.CheckPool(ctx, pool); err != nil {
		pool.Close()
		return nil, replay.Log{}, nil, err
	}
	lg, nc, err := openLog(c, log)
	if err != nil {
		pool.Close()
		return nil, replay.Log{}, nil, err
	}
	return pool, lg, func() { nc.Close(); pool.Close() }, nil
}

func openLog(c *common, log *zap.Logger) (replay.Log, *nats.Conn, error) {
	nc, js, err := natsjs.ConnectJetStream(c.cfg.NATS, "buildstate-projector-replay", log)
	if err != nil {
		return replay.Log{}, nil, err
	}
	lg := replay.Log{JS: js, Stream: c.cfg.Stream, Prefix: c.cfg.Prefix}
	// A stream not there yet is read as p1; the command's own read says so.
	if layout, former, err := natsjs.StreamLayout(context.Background(), js, c.cfg.Stream, c.cfg.Prefix); err == nil {
		lg.Layout, lg.Former = layout, former
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		nc.Close()
		return replay.Log{}, nil, err
	}
	return lg, nc, nil
}

// runStatusAt is `projector status PROJECT_ID --at T | --seq N`: the
// project as it was at that point of the log, from its own events only
// (replay.ProjectAt), printed like the live status.
func runStatusAt(ctx context.Context, c *common, projectID, at string, seq uint64, asJSON bool, stdout io.Writer) error {
	var point replay.At
	switch {
	case at != "" && seq != 0:
		return errors.New("status: give --at or --seq, not both")
	case at != "":
		t, err := time.Parse(time.RFC3339Nano, at)
		if err != nil {
			return fmt.Errorf("status: --at %q is not RFC 3339 (e.g. 2026-11-26T20:00:00Z)", at)
		}
		point.Time = t
	default:
		point.Seq = seq
	}
	lg, nc, err := openLog(c, zap.NewNop())
	if err != nil {
		return err
	}
	defer nc.Close()
	pv, err := replay.ProjectAt(ctx, lg, projectID, point)
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	where := fmt.Sprintf("seq %d", pv.Through)
	if !point.Time.IsZero() {
		where = when.Format(point.Time, time.Local)
	}
	if pv.View.Row == nil {
		return fmt.Errorf("status: project %q has no visible build at %s", projectID, where)
	}
	row, builds := statusRows(pv)
	var warning string
	if !pv.History.Whole() {
		warning = fmt.Sprintf("the stream's history is truncated (first seq %d): this view may miss dropped events", pv.History.First)
	}
	if asJSON {
		type asOf struct {
			Seq       uint64     `json:"seq,omitempty"`
			At        *time.Time `json:"at,omitempty"`
			LastEvent uint64     `json:"last_event_seq"`
		}
		a := asOf{LastEvent: pv.Last.Seq}
		if point.Time.IsZero() {
			a.Seq = pv.Through
		} else {
			a.At = &point.Time
		}
		return json.NewEncoder(stdout).Encode(struct {
			Project projection.ProjectRow   `json:"project"`
			Builds  []projection.MetricsRow `json:"recent_builds"`
			AsOf    asOf                    `json:"as_of"`
			Warning string                  `json:"warning,omitempty"`
		}{row, builds, a, warning})
	}
	fmt.Fprintf(stdout, "as of %s (replayed; the project's last event is seq %d)\n", where, pv.Last.Seq)
	if warning != "" {
		fmt.Fprintln(stdout, "warning: "+warning)
	}
	// The newest build is not known to a replay of one project's view.
	printStatus(stdout, row, web.Explain(row, ""), builds)
	return nil
}

// statusRows turns a folded view into the rows the live status prints:
// updated_at is when the log stored the project's last event, and the
// builds are the ten newest by started_at, as RecentBuilds orders them.
func statusRows(pv replay.ProjectView) (projection.ProjectRow, []projection.MetricsRow) {
	r := pv.View.Row
	row := projection.ProjectRow{
		ProjectID: r.ProjectID, BuildStatus: string(r.Status), CurrentBuildID: r.CurrentBuildID,
		LastBuildStarted: r.LastBuildStarted, LastBuildCompleted: r.LastBuildCompleted, Framework: r.Framework,
		UpdatedAt: pv.Last.StoredAt,
	}
	builds := make([]projection.MetricsRow, 0, len(pv.View.Metrics))
	for _, m := range pv.View.Metrics {
		builds = append(builds, metricsRow(m))
	}
	sort.Slice(builds, func(i, j int) bool {
		if !builds[i].StartedAt.Equal(builds[j].StartedAt) {
			return builds[i].StartedAt.After(builds[j].StartedAt)
		}
		return builds[i].BuildID > builds[j].BuildID
	})
	if len(builds) > 10 {
		builds = builds[:10]
	}
	return row, builds
}

func metricsRow(m fsm.MetricsRow) projection.MetricsRow {
	return projection.MetricsRow{
		BuildID: m.BuildID, ProjectID: m.ProjectID, Status: m.Status, StartedAt: m.StartedAt,
		CompletedAt: m.CompletedAt, DurationMS: m.DurationMS, Framework: m.Framework, NodeVersion: m.NodeVersion,
		PackageManager: m.PackageManager, Attempt: m.Attempt, Error: m.Error, QueuedAt: m.QueuedAt,
	}
}
