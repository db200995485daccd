package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/when"
)

// stuckFlags adds the stuck limits' flags to fs.
func stuckFlags(fs *flag.FlagSet, l *projection.StuckLimits) {
	fs.DurationVar(&l.QueuedFor, "queued-for", projection.DefaultStuckLimits.QueuedFor, "a build queued this long with no start is stuck")
	fs.DurationVar(&l.BuildingFor, "building-for", projection.DefaultStuckLimits.BuildingFor, "a build started this long ago with no completion is stuck")
}

// runStuck is `projector stuck`: it lists the stuck builds at now() and,
// with --time-out, ends each through the log with a time-out completion.
func runStuck(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer, now func() time.Time) error {
	fs, c := newFlags("stuck", getenv, stderr)
	var l projection.StuckLimits
	stuckFlags(fs, &l)
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	timeOut := fs.Bool("time-out", false, "publish a build.completed time-out (data.timed_out) for each build listed")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("stuck: unexpected arguments %q", fs.Args())
	}
	if err := l.Check(); err != nil {
		return fmt.Errorf("stuck: %w", err)
	}
	store, closeStore, err := openStore(ctx, c)
	if err != nil {
		return err
	}
	defer closeStore()
	at := now()
	stuck, err := store.Stuck(ctx, l, at)
	if err != nil {
		return err
	}
	var published map[string]projector.TimedOut
	if *timeOut && len(stuck) > 0 {
		log, err := c.logger(stderr)
		if err != nil {
			return err
		}
		nc, js, err := natsjs.ConnectJetStream(c.cfg.NATS, "buildstate-projector-stuck", log)
		if err != nil {
			return err
		}
		defer nc.Close()
		done, err := projector.PublishTimeOuts(ctx, emitter.New(js, emitter.Options{Prefix: c.cfg.Prefix, Logger: log}), l, stuck)
		published = map[string]projector.TimedOut{}
		for _, d := range done {
			published[d.Build.BuildID] = d
		}
		if err != nil {
			// Say what was published before the error: those are ended.
			_ = printStuck(stdout, stuck, published, *asJSON, *timeOut, at)
			return err
		}
	}
	return printStuck(stdout, stuck, published, *asJSON, *timeOut, at)
}

func printStuck(w io.Writer, stuck []projection.StuckBuild, published map[string]projector.TimedOut, asJSON, timeOut bool, now time.Time) error {
	if asJSON {
		enc := json.NewEncoder(w)
		for _, b := range stuck {
			o := struct {
				projection.StuckBuild
				AgeSeconds float64 `json:"age_seconds"`
				EventID    string  `json:"time_out_event_id,omitempty"`
				Seq        uint64  `json:"time_out_seq,omitempty"`
			}{StuckBuild: b, AgeSeconds: now.Sub(b.Since).Seconds()}
			if p, ok := published[b.BuildID]; ok {
				o.EventID, o.Seq = p.EventID, p.Seq
			}
			if err := enc.Encode(o); err != nil {
				return err
			}
		}
		return nil
	}
	if len(stuck) == 0 {
		_, err := fmt.Fprintln(w, "no stuck builds")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	head := "BUILD\tPROJECT\tSTATE\tSINCE\tFOR"
	if timeOut {
		head += "\tTIME-OUT EVENT\tSEQ"
	}
	fmt.Fprintln(tw, head)
	for _, b := range stuck {
		line := fmt.Sprintf("%s\t%s\t%s\t%s\t%s", b.BuildID, b.ProjectID, b.State, when.Format(b.Since, time.Local),
			now.Sub(b.Since).Truncate(time.Second))
		if timeOut {
			if p, ok := published[b.BuildID]; ok {
				line += fmt.Sprintf("\t%s\t%d", p.EventID, p.Seq)
			} else {
				line += "\t-\t-"
			}
		}
		fmt.Fprintln(tw, line)
	}
	return tw.Flush()
}
