// Package demo is the README's first command: with nothing configured it
// starts an embedded NATS JetStream server, finds or starts a Postgres, runs
// the projector, publishes a few projects' builds out of order and
// duplicated (plus one malformed message), and prints the read model.
package demo

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/devenv"
	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/web"
	"github.com/buildstate/buildstate/internal/when"
)

// Options of a demo run.
type Options struct {
	Getenv   func(string) string
	Stdout   io.Writer
	Log      *zap.Logger
	Database string // database to (re)create for the demo
	Keep     bool   // leave the demo database in place
}

// Run runs the demo.
func Run(ctx context.Context, o Options) error {
	out := o.Stdout
	logf := func(format string, args ...any) { fmt.Fprintf(out, "· "+format+"\n", args...) }

	pg, err := devenv.FindPostgres(ctx, o.Getenv, logf)
	if err != nil {
		return err
	}
	defer pg.Close()
	if err := devenv.DropDatabase(ctx, pg.URL, o.Database); err != nil {
		return fmt.Errorf("drop old demo database: %w", err)
	}
	dbURL, err := devenv.CreateDatabase(ctx, pg.URL, o.Database)
	if err != nil {
		return err
	}
	if !o.Keep && pg.Source != devenv.SourceThrowaway {
		defer func() { _ = devenv.DropDatabase(context.WithoutCancel(ctx), pg.URL, o.Database) }()
	}
	logf("Postgres (%s): database %s", pg.Source, o.Database)

	dir, err := os.MkdirTemp("", "buildstate-demo-nats-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	srv, err := devenv.StartNATS(dir, -1)
	if err != nil {
		return err
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	logf("embedded NATS JetStream at %s", srv.ClientURL())

	nc, js, err := natsjs.ConnectJetStream(natsjs.Client{URL: srv.ClientURL()}, "buildstate-demo", o.Log)
	if err != nil {
		return err
	}
	defer nc.Close()
	stream, err := natsjs.EnsureStream(ctx, js, "BUILDS", "builds", 1)
	if err != nil {
		return err
	}

	pub := emitter.New(js, emitter.Options{})
	evs := history(time.Now().Add(-time.Hour).UTC().Truncate(time.Second))
	rng := rand.New(rand.NewPCG(7, 26))
	order := append([]events.Event(nil), evs...)
	rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	// A quarter of the events again: the emitter's retry-safe dedupe (same
	// Nats-Msg-Id) would drop them inside JetStream's window, so these copies
	// are sent without it and reach the projector, which ignores them by id.
	for _, ev := range order[:len(order)/4] {
		body, _ := ev.Marshal()
		if _, err := js.Publish(ctx, events.Subject("builds", ev.ProjectID, ev.Kind()), body); err != nil {
			return fmt.Errorf("publish duplicate: %w", err)
		}
	}
	for _, ev := range order {
		if _, err := pub.Publish(ctx, ev); err != nil {
			return err
		}
	}
	if _, err := js.Publish(ctx, "builds.web-shop.started", []byte(`{"spec_version":1,"id":"oops"`)); err != nil {
		return fmt.Errorf("publish malformed: %w", err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		return err
	}
	total := info.State.Msgs
	logf("published %d events shuffled, %d duplicate copies and 1 malformed message: %d messages in stream BUILDS",
		len(order), len(order)/4, total)

	pctx, stopProjector := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- projector.Run(pctx, projector.Config{DatabaseURL: dbURL, NATS: natsjs.Client{URL: srv.ClientURL()}, Logger: o.Log})
	}()
	if err := waitCaughtUp(ctx, js, done); err != nil {
		stopProjector()
		<-done
		return err
	}
	stopProjector()
	if err := <-done; err != nil {
		return err
	}
	logf("projector caught up and stopped")
	return printModel(ctx, out, dbURL, o.Keep && pg.Source != devenv.SourceThrowaway)
}

// history is three projects' builds; web-shop's second build is newer but its
// metrics come late, so its current build stays on the first until they do.
func history(t0 time.Time) []events.Event {
	s := func(v string) *string { return &v }
	n := func(v int64) *int64 { return &v }
	var evs []events.Event
	add := func(k events.Kind, p, b string, at time.Duration, d events.Data) {
		evs = append(evs, events.New(k, p, b, t0.Add(at), d))
	}
	m := events.Data{Framework: s("nextjs"), NodeVersion: s("22.11"), PackageManager: s("pnpm"), Attempt: n(1)}
	add(events.KindQueued, "web-shop", "ws-1", 0, events.Data{})
	add(events.KindStarted, "web-shop", "ws-1", 5*time.Second, events.Data{Framework: s("nextjs")})
	add(events.KindMetricsRecorded, "web-shop", "ws-1", 6*time.Second, m)
	add(events.KindCompleted, "web-shop", "ws-1", 95*time.Second, events.Data{Outcome: events.OutcomeSucceeded, DurationMS: n(90000)})
	add(events.KindQueued, "web-shop", "ws-2", 10*time.Minute, events.Data{})
	add(events.KindStarted, "web-shop", "ws-2", 10*time.Minute+3*time.Second, events.Data{Framework: s("nextjs")})

	add(events.KindQueued, "docs", "dc-1", 2*time.Minute, events.Data{})
	add(events.KindStarted, "docs", "dc-1", 2*time.Minute+time.Second, events.Data{Framework: s("astro")})
	add(events.KindMetricsRecorded, "docs", "dc-1", 2*time.Minute+2*time.Second, events.Data{Framework: s("astro"), NodeVersion: s("20.18"), PackageManager: s("npm")})
	add(events.KindCompleted, "docs", "dc-1", 3*time.Minute, events.Data{Outcome: events.OutcomeFailed, DurationMS: n(58000), Error: s("type error in src/pages/index.astro")})

	// api: the completion's clock ran 2 s behind the start (producer skew).
	add(events.KindStarted, "api", "api-7", 20*time.Minute, events.Data{Framework: s("remix")})
	add(events.KindMetricsRecorded, "api", "api-7", 20*time.Minute+time.Second, events.Data{Framework: s("remix"), NodeVersion: s("22.11"), PackageManager: s("yarn"), Attempt: n(2)})
	add(events.KindCompleted, "api", "api-7", 20*time.Minute-2*time.Second, events.Data{Outcome: events.OutcomeCanceled})
	return evs
}

func waitCaughtUp(ctx context.Context, js jetstream.JetStream, done <-chan error) error {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-done:
			return fmt.Errorf("projector stopped early: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		c, err := js.Consumer(ctx, "BUILDS", "projector")
		if err != nil {
			continue
		}
		info, err := c.Info(ctx)
		if err == nil && info.NumPending == 0 && info.NumAckPending == 0 {
			return nil
		}
	}
	return fmt.Errorf("projector did not catch up within 60s")
}

func printModel(ctx context.Context, w io.Writer, dbURL string, kept bool) error {
	pool, err := projector.OpenPool(ctx, dbURL)
	if err != nil {
		return err
	}
	defer pool.Close()
	store := projection.New(pool, projection.Options{})
	rows, err := store.Projects(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintln(w, "\nprojects:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PROJECT\tSTATUS\tCURRENT BUILD\tLAST STARTED\tLAST COMPLETED\tFRAMEWORK")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.ProjectID, r.BuildStatus, dash(r.CurrentBuildID),
			clock(r.LastBuildStarted), clock(r.LastBuildCompleted), dash(r.Framework))
	}
	tw.Flush()
	// What can surprise in these rows, in words (as `projector status` says it).
	for _, r := range rows {
		newest, err := store.NewestBuild(ctx, r.ProjectID)
		if err != nil {
			return err
		}
		for _, n := range web.Explain(r, newest) {
			fmt.Fprintf(w, "  %s: %s\n", r.ProjectID, n)
		}
	}
	ms, err := store.Metrics(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintln(w, "\nproject_build_metrics:")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "BUILD\tPROJECT\tSTATUS\tSTARTED\tCOMPLETED\tFRAMEWORK\tNODE\tPM\tERROR")
	for _, m := range ms {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.BuildID, m.ProjectID, m.Status,
			clock(&m.StartedAt), clock(m.CompletedAt), dash(m.Framework), dash(m.NodeVersion), dash(m.PackageManager), dash(m.Error))
	}
	tw.Flush()
	dls, err := store.DeadLetters(ctx, projection.DeadLetterFilter{})
	if err != nil {
		return err
	}
	fmt.Fprintln(w, "\ndead letters:")
	for _, d := range dls {
		fmt.Fprintf(w, "  seq %d  %s  %s: %s\n", d.StreamSeq, d.Subject, d.Reason, d.Detail)
	}
	var checks struct{ timing, fk int }
	if err := pool.QueryRow(ctx, `SELECT
		(SELECT count(*) FROM projects WHERE last_build_completed < last_build_started),
		(SELECT count(*) FROM projects p WHERE current_build_id IS NOT NULL
		   AND NOT EXISTS (SELECT 1 FROM project_build_metrics m WHERE m.build_id = p.current_build_id))`).
		Scan(&checks.timing, &checks.fk); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nseed constraint check: %d timing violations, %d dangling current builds\n", checks.timing, checks.fk)
	if kept {
		fmt.Fprintf(w, "demo database: %s\n", redact(dbURL))
	}
	return nil
}

func dash(s *string) string {
	if s == nil {
		return "-"
	}
	return *s
}

func clock(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return when.Format(*t, time.Local)
}

func redact(url string) string {
	if i := strings.Index(url, "@"); i > 0 {
		if j := strings.Index(url, "://"); j > 0 && j < i {
			return url[:j+3] + "…" + url[i:]
		}
	}
	return url
}
