package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/buildstate/buildstate/internal/bench"
	"github.com/buildstate/buildstate/internal/workload"
)

const usage = `usage: bench <catchup|raw|live|scale|rss|profile|all> [flags]
  catchup  a backlog (default 200,000 events over 20,000 projects, shuffled, 5% duplicates):
           first the raw baseline on it (see raw), then applied by one projector process,
           then the seed's direct-update worker on the same workload in natural order;
           prints events/s, peak RSS, and the ratios to raw and to the seed's worker
  raw      the catch-up backlog fetched by a durable pull consumer that only acks, as the
           projector's consumer is configured: "ack each" (explicit, one ack a message, as
           the projector does today) and "ack all" (AckAll, one ack a --batch); msgs/s
  live     a projector caught up; events published at --rate for --duration; prints
           publish → visible-in-Postgres latency p50/p99/max for each --batch × --linger
  scale    the raw baseline, then the catch-up backlog with each count of --instances
           projector processes, each with its ratio to raw
  rss      a catch-up over --rss-projects projects (default 100,000), for peak RSS
  profile  the catch-up in this process: CPU profile (--cpuprofile), time per SQL statement,
           and with --explain FILE the EXPLAIN ANALYZE plans of a few batches
  all      catchup, live, scale
run 'bench COMMAND -h' for the flags`

type options struct {
	seed           int64
	events         int
	projects       int
	dupRate        float64
	batch          int
	partitions     int
	linger         time.Duration
	baselineEvents int
	rate           int
	duration       time.Duration
	liveBatches    []int
	liveLingers    []time.Duration
	instances      []int
	rssProjects    int
	rssEvents      int
	maxLoad        float64
	loadWait       time.Duration
	cpuProfile     string
	explain        string
	natsSync       string
	projectorSrc   string
	projectorRev   string
	pgParams       string
	noBaseline     bool
	noRaw          bool
	rawRuns        int
	timeout        time.Duration
	projectorEnv   string
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if len(args) < 2 || strings.HasPrefix(args[1], "-") {
		return errors.New(usage)
	}
	cmd := args[1]
	switch cmd {
	case "catchup", "raw", "live", "scale", "rss", "profile", "all":
	case "help":
		fmt.Fprintln(stdout, usage)
		return nil
	default:
		return fmt.Errorf("unknown command %q\n%s", cmd, usage)
	}
	fs := flag.NewFlagSet("bench "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.Int64Var(&o.seed, "seed", 1, "workload seed")
	fs.IntVar(&o.events, "events", 200000, "catch-up backlog: messages, duplicates included")
	fs.IntVar(&o.projects, "projects", 20000, "catch-up backlog: projects")
	fs.Float64Var(&o.dupRate, "dup-rate", 0.05, "catch-up backlog: exact duplicates, as a fraction of the distinct events")
	fs.IntVar(&o.batch, "batch", 1000, "catch-up and scale: projector --batch")
	fs.IntVar(&o.partitions, "partitions", 1, "the layout of the run's streams and projectors (projector --partitions; not profile)")
	fs.DurationVar(&o.linger, "linger", 0, "catch-up and scale: projector --linger")
	fs.IntVar(&o.baselineEvents, "baseline-events", 20000, "baseline: the first N events of the natural order (0: all)")
	fs.IntVar(&o.rate, "rate", 5000, "live: events per second")
	fs.DurationVar(&o.duration, "duration", 30*time.Second, "live: how long to publish")
	batches := fs.String("live-batch", "1000", "live: projector --batch values to try, comma-separated")
	lingers := fs.String("live-linger", "0", "live: projector --linger values to try, comma-separated")
	instances := fs.String("instances", "1,2,3", "scale: projector process counts")
	fs.IntVar(&o.rssProjects, "rss-projects", 100000, "rss: projects")
	fs.IntVar(&o.rssEvents, "rss-events", 0, "rss: messages (default 4 per project)")
	fs.Float64Var(&o.maxLoad, "max-load", 1.5, "before each measurement, wait for the 1-minute load average to drop to this (0: do not wait)")
	fs.DurationVar(&o.loadWait, "load-wait", 10*time.Minute, "longest wait for --max-load; then measure anyway and say so")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "profile: write a CPU profile of the in-process projector here")
	fs.StringVar(&o.explain, "explain", "", "profile: write EXPLAIN ANALYZE plans of a few batches here (a second, slower run)")
	fs.StringVar(&o.natsSync, "nats-sync", "default", "embedded NATS file store: default (nats-server's: fsync every 2 min) or always (devenv's: fsync every message before its ack)")
	fs.StringVar(&o.projectorSrc, "projector-src", "", "build the projector from this module directory (default: this module's working tree)")
	fs.StringVar(&o.projectorRev, "projector-rev", "", "build the projector from this git revision of this module (git archive), e.g. HEAD")
	fs.StringVar(&o.pgParams, "pg-params", "", "Postgres settings for the projector's sessions, appended to its DATABASE_URL (k=v&k=v), e.g. random_page_cost=1.1 (the projector itself sets plan_cache_mode and jit)")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Minute, "catchup, scale, rss: give a projector run up to this long, then report how far it got")
	fs.StringVar(&o.projectorEnv, "projector-env", "", "extra environment for the projector processes, comma-separated KEY=VALUE (e.g. GOGC=400)")
	fs.BoolVar(&o.noBaseline, "no-baseline", false, "catchup: skip the baseline")
	fs.BoolVar(&o.noRaw, "no-raw", false, "catchup, scale: skip the raw baseline")
	fs.IntVar(&o.rawRuns, "raw-runs", 0, "raw measurements of each ack mode, alternating (0: 3 for raw, 1 beside catchup and scale); ratios use the median")
	if err := fs.Parse(args[2:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	var err error
	if o.liveBatches, err = ints(*batches); err != nil {
		return fmt.Errorf("--live-batch: %w", err)
	}
	if o.instances, err = ints(*instances); err != nil {
		return fmt.Errorf("--instances: %w", err)
	}
	for _, s := range strings.Split(*lingers, ",") {
		if s == "0" {
			s = "0s"
		}
		d, err := time.ParseDuration(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("--live-linger: %w", err)
		}
		o.liveLingers = append(o.liveLingers, d)
	}

	if o.rawRuns < 0 {
		return fmt.Errorf("--raw-runs %d: want 0 or more", o.rawRuns)
	}
	if o.rawRuns == 0 {
		o.rawRuns = 1
		if cmd == "raw" {
			o.rawRuns = 3
		}
	}
	if o.natsSync != "default" && o.natsSync != "always" {
		return fmt.Errorf("--nats-sync %q: want default or always", o.natsSync)
	}
	fmt.Fprintf(stdout, "machine: %d CPUs (%s), Go %s, %s; load average %.2f\n", runtime.NumCPU(), cpuModel(), runtime.Version(), memTotal(), bench.LoadAverage())
	natsOnly := cmd == "raw"
	if natsOnly {
		fmt.Fprintf(stdout, "services: embedded NATS JetStream (file store, sync %s)\n", o.natsSync)
	} else {
		fmt.Fprintf(stdout, "services: embedded NATS JetStream (file store, sync %s), PostgreSQL (fresh database per run)\n", o.natsSync)
	}
	env, err := bench.Setup(ctx, bench.Options{Getenv: getenv, Log: stderr, NATSSyncAlways: o.natsSync == "always",
		ModuleDir: o.projectorSrc, Revision: o.projectorRev, NATSOnly: natsOnly})
	if err != nil {
		return err
	}
	defer env.Close()
	env.Partitions = o.partitions
	if o.partitions > 1 {
		if cmd == "profile" {
			return errors.New("--partitions: profile runs one in-process writer of layout p1")
		}
		fmt.Fprintf(stdout, "layout: p%d (the stream's subject transform is set before each backlog is published)\n", o.partitions)
	}
	if natsOnly {
		fmt.Fprintf(stdout, "module: %s\n", env.Source)
	} else {
		fmt.Fprintf(stdout, "projector: built from %s\n", env.Source)
	}
	if o.pgParams != "" {
		fmt.Fprintf(stdout, "projector Postgres settings: %s\n", o.pgParams)
	}
	b := &bencher{ctx: ctx, env: env, o: o, out: stdout}
	switch cmd {
	case "catchup":
		return b.catchup()
	case "raw":
		bl, err := b.catchupBacklog()
		if err != nil {
			return err
		}
		_, err = b.raw(bl)
		return err
	case "live":
		return b.live()
	case "scale":
		return b.scale(nil)
	case "rss":
		return b.rss()
	case "profile":
		return b.profile()
	}
	// all
	bl, err := b.catchupBacklog()
	if err != nil {
		return err
	}
	if err := b.catchupOn(bl); err != nil {
		return err
	}
	if err := b.live(); err != nil {
		return err
	}
	return b.scale(&bl)
}

type bencher struct {
	ctx context.Context
	env *bench.Env
	o   options
	out io.Writer
}

func (b *bencher) printf(format string, args ...any) { fmt.Fprintf(b.out, format, args...) }

// quiet waits for the machine's load to drop to --max-load and prints the
// load the measurement starts under.
func (b *bencher) quiet(what string) {
	deadline := time.Now().Add(b.o.loadWait)
	load := bench.LoadAverage()
	if b.o.maxLoad > 0 && load > b.o.maxLoad {
		b.printf("  (waiting for load average %.2f to drop to %.2f before %s)\n", load, b.o.maxLoad, what)
		for load > b.o.maxLoad && time.Now().Before(deadline) && b.ctx.Err() == nil {
			select {
			case <-b.ctx.Done():
			case <-time.After(5 * time.Second):
			}
			load = bench.LoadAverage()
		}
		if load > b.o.maxLoad {
			b.printf("  WARNING: load average still %.2f after %s: %s measured on a busy machine\n", load, b.o.loadWait, what)
		}
	}
}

func (b *bencher) workload() bench.Workload {
	return bench.Workload{Seed: b.o.seed, Events: b.o.events, Projects: b.o.projects, DupRate: b.o.dupRate}
}

func (b *bencher) catchupBacklog() (bench.Backlog, error) {
	w := b.workload()
	b.printf("\n== catch-up: %d events over %d projects, shuffled, %.0f%% duplicates (seed %d)\n", w.Events, w.Projects, 100*w.DupRate, w.Seed)
	bl, err := b.env.PublishBacklog(b.ctx, "catchup", w)
	if err != nil {
		return bl, err
	}
	b.printf("  published %d messages (%d distinct events) in %.1f s (%.0f/s)\n",
		bl.Events, bl.Distinct, bl.Publish.Seconds(), float64(bl.Events)/bl.Publish.Seconds())
	return bl, nil
}

func (b *bencher) catchup() error {
	bl, err := b.catchupBacklog()
	if err != nil {
		return err
	}
	return b.catchupOn(bl)
}

func (b *bencher) catchupOn(bl bench.Backlog) error {
	var raw bench.RawSeries
	if !b.o.noRaw {
		var err error
		if raw, err = b.raw(bl); err != nil {
			return err
		}
	}
	b.quiet("the catch-up")
	r, err := b.env.Catchup(b.ctx, bl, bench.CatchupConfig{Batch: b.o.batch, Linger: b.o.linger, PGParams: b.o.pgParams, Timeout: b.o.timeout, Env: b.o.env()})
	rate := 0.0
	switch {
	case errors.Is(err, bench.ErrTimeout):
		b.printf("  projector ×1: DID NOT FINISH: %v\n", err)
	case err != nil:
		return err
	default:
		b.printCatchup("projector", r)
		rate = r.EventsPerSec()
		b.printVsRaw(r, raw)
	}
	if b.o.noBaseline {
		return nil
	}

	evs := workload.Natural(b.workload().Generate())
	subset := ""
	if b.o.baselineEvents > 0 && b.o.baselineEvents < len(evs) {
		subset = fmt.Sprintf(" (a subset: the first %d of the %d distinct events in natural order; the whole would take minutes)", b.o.baselineEvents, len(evs))
		evs = evs[:b.o.baselineEvents]
	}
	b.printf("  baseline, the seed's worker: one connection, each event as direct statements in natural order, no duplicates%s\n", subset)
	b.quiet("the baseline")
	load := bench.LoadAverage()
	base, _, err := b.env.Baseline(b.ctx, evs)
	if err != nil {
		return err
	}
	b.printf("  baseline: %d events in %.2f s: %.0f events/s; %d constraint errors (23514/23503, retries included), %d statements given up, %.1f s of it in retry backoff (load before: %.2f)\n",
		base.Events, base.Elapsed.Seconds(), base.EventsPerSec(), base.ConstraintErrors, base.GaveUp, base.Slept.Seconds(), load)
	if d := base.Elapsed - base.Slept; d > 0 {
		b.printf("  baseline without its backoff sleeps: %.0f events/s\n", float64(base.Events)/d.Seconds())
	}
	if rate > 0 {
		b.printf("  RATIO projector/baseline: %.1fx (%.0f vs %.0f events/s; target ≥ 20x)\n", rate/base.EventsPerSec(), rate, base.EventsPerSec())
		if len(raw) > 0 {
			each, all := raw.Median(bench.AckEach), raw.Median(bench.AckAll)
			b.printf("  SUMMARY (per second): raw ack each %.0f, raw ack all %.0f, projector %.0f, seed worker %.0f; projector/raw ack each %.3fx, projector/raw ack all %.3fx (target ≥ 0.25x), projector/seed %.1fx (target ≥ 20x)\n",
				each, all, rate, base.EventsPerSec(), rate/each, rate/all, rate/base.EventsPerSec())
		}
	}
	return nil
}

// raw measures the raw baseline on the backlog: --raw-runs runs of each
// ack mode, alternating, each printed.
func (b *bencher) raw(bl bench.Backlog) (bench.RawSeries, error) {
	b.printf("  raw baseline: a durable pull consumer that only acks (the projector's consumer configuration, pulls of %d), in this process beside the NATS server\n", 2*b.o.batch)
	b.quiet("the raw baseline")
	var s bench.RawSeries
	for run := range b.o.rawRuns {
		for _, ack := range []bench.RawAck{bench.AckEach, bench.AckAll} {
			r, err := b.env.Raw(b.ctx, bl, bench.RawConfig{Ack: ack, Batch: b.o.batch})
			if err != nil {
				return s, err
			}
			every := "every message"
			if ack == bench.AckAll {
				every = fmt.Sprintf("every %dth and the last", b.o.batch)
			}
			b.printf("  raw %-8s (run %d, acks %s): %d msgs in %.2f s: %.0f msgs/s; %.1f µs CPU a message (NATS server + client); load before %.2f\n",
				ack, run+1, every, r.Messages, r.Elapsed.Seconds(), r.MsgsPerSec(), us(r.CPUPerMsg()), r.LoadBefore)
			s = append(s, r)
		}
	}
	if b.o.rawRuns > 1 {
		b.printf("  raw medians: ack each %.0f msgs/s, ack all %.0f msgs/s\n", s.Median(bench.AckEach), s.Median(bench.AckAll))
	}
	return s, nil
}

// printVsRaw prints a catch-up's ratios to the raw baseline of the same run.
func (b *bencher) printVsRaw(r bench.CatchupResult, raw bench.RawSeries) {
	if len(raw) == 0 {
		return
	}
	rate, each, all := r.EventsPerSec(), raw.Median(bench.AckEach), raw.Median(bench.AckAll)
	b.printf("  RATIO projector ×%d/raw: %.3fx of ack each (%.0f vs %.0f msgs/s), %.3fx of ack all (%.0f vs %.0f msgs/s); target ≥ 0.25x\n",
		r.Instances, rate/each, rate, each, rate/all, rate, all)
	n := time.Duration(max(r.Events, 1))
	b.printf("    CPU a message: projector %.1f µs + Postgres backends %.1f µs + NATS (bench process) %.1f µs; raw (NATS server + client): ack each %.1f µs, ack all %.1f µs\n",
		us(r.ProjectorCPU/n), us(r.BackendCPU/n), us(r.BenchCPU/n), us(meanCPU(raw, bench.AckEach)), us(meanCPU(raw, bench.AckAll)))
}

// meanCPU is the mean CPU a message of the raw runs that acked as ack.
func meanCPU(s bench.RawSeries, ack bench.RawAck) time.Duration {
	var cpu time.Duration
	var n int
	for _, r := range s {
		if r.Ack == ack {
			cpu, n = cpu+r.CPU, n+r.Messages
		}
	}
	return cpu / time.Duration(max(n, 1))
}

func (b *bencher) printCatchup(label string, r bench.CatchupResult) {
	b.printf("  %s ×%d: %d events in %.2f s: %.0f events/s (start-up to first ack %.2f s; from the first ack %.0f events/s)\n",
		label, r.Instances, r.Events, r.Elapsed.Seconds(), r.EventsPerSec(), r.FirstAck.Seconds(),
		float64(r.Events)/(r.Elapsed-r.FirstAck).Seconds())
	for i, u := range r.Usage {
		share := ""
		if i < len(r.Shares) {
			s := r.Shares[i]
			share = fmt.Sprintf("; applied %d events (%.0f/s over the run)", s.Applied, float64(s.Applied)/r.Elapsed.Seconds())
			if s.Partitions != nil {
				share += fmt.Sprintf(", partitions %v (%d acquires, %d batches fenced)", s.Partitions, s.Acquired, s.Fenced)
			}
		}
		b.printf("    projector %d: peak RSS %s, CPU %.1f s%s\n", i+1, bench.MiB(u.PeakRSS), u.CPU.Seconds(), share)
	}
	secs := r.Elapsed.Seconds()
	b.printf("    CPU during the run (cores): machine %.2f of %d; projectors %.2f, Postgres backends of this database %.2f, all postgres processes %.2f, bench (NATS) %.2f; load before %.2f\n",
		r.MachineCores, runtime.NumCPU(), r.ProjectorCPU.Seconds()/secs, r.BackendCPU.Seconds()/secs, r.ServerCPU.Seconds()/secs, r.BenchCPU.Seconds()/secs, r.LoadBefore)
	b.printf("    rows: %d projects, %d metrics, %d applied ids, %d dead letters; %d warning log lines\n",
		r.Rows.Projects, r.Rows.Metrics, r.Rows.Applied, r.Rows.DeadLetters, r.Warnings)
	if len(r.Activity) > 0 {
		b.printf("    Postgres backends of this database, sampled every 20 ms when not idle: %s\n", strings.Join(r.Activity.Top(), ", "))
	}
	if r.Batches.Count > 0 {
		b.printf("    %d batches (%.0f messages each on average), %.1f ms to apply one (first process); %d write retries; %d folded again\n",
			r.Batches.Count, float64(r.Events)/float64(r.Batches.Count), 1000*r.Batches.MeanSeconds, r.Batches.WriteRetries, r.Batches.Redone)
	}
	if r.FirstWarning != "" {
		b.printf("    first warning: %s\n", r.FirstWarning)
	}
}

func (b *bencher) live() error {
	b.printf("\n== live: %d events/s for %s, publish → visible (projector_applied row committed; 2 ms poll)\n", b.o.rate, b.o.duration)
	for _, batch := range b.o.liveBatches {
		for _, linger := range b.o.liveLingers {
			b.quiet("the live run")
			r, err := b.env.Live(b.ctx, bench.LiveConfig{Rate: b.o.rate, Duration: b.o.duration, Seed: b.o.seed + 1, Batch: batch, Linger: linger, PGParams: b.o.pgParams, Env: b.o.env()})
			if err != nil {
				return err
			}
			b.printf("  --batch %d --linger %s: p50 %s p90 %s p99 %s max %s over %d events (published at %.0f/s)\n",
				batch, linger, ms(r.Latency.P50), ms(r.Latency.P90), ms(r.Latency.P99), ms(r.Latency.Max), r.Latency.N, r.PublishRate)
			if r.Missing > 0 {
				b.printf("    FELL BEHIND: %d of %d events not visible two minutes after the last publish (left out of the percentiles)\n", r.Missing, r.Published)
			}
			secs := b.o.duration.Seconds()
			b.printf("    JetStream publish ack p50 %s p99 %s; projector RSS %s (peak %s), CPU %.2f cores; Postgres backends %.2f cores; machine %.2f cores; load before %.2f; %d warnings\n",
				ms(r.StoreAck.P50), ms(r.StoreAck.P99), bench.MiB(r.Usage.RSS), bench.MiB(r.Usage.PeakRSS),
				r.Usage.CPU.Seconds()/secs, r.BackendCPU.Seconds()/secs, r.Machine, r.LoadBefore, r.Warnings)
			if r.Batches.Count > 0 {
				b.printf("    %d batches, %.0f events per batch on average, %.1f ms to apply one; %d write retries; %d folded again\n", r.Batches.Count,
					float64(r.Latency.N)/float64(r.Batches.Count), 1000*r.Batches.MeanSeconds, r.Batches.WriteRetries, r.Batches.Redone)
			}
		}
	}
	return nil
}

func (b *bencher) scale(bl *bench.Backlog) error {
	if bl == nil {
		x, err := b.catchupBacklog()
		if err != nil {
			return err
		}
		bl = &x
	} else {
		b.printf("\n== scale: the catch-up backlog with %v projector processes on one durable\n", b.o.instances)
	}
	var raw bench.RawSeries
	if !b.o.noRaw {
		var err error
		if raw, err = b.raw(*bl); err != nil {
			return err
		}
	}
	var first float64
	for _, n := range b.o.instances {
		b.quiet(fmt.Sprintf("the %d-instance run", n))
		r, err := b.env.Catchup(b.ctx, *bl, bench.CatchupConfig{Instances: n, Batch: b.o.batch, Linger: b.o.linger, PGParams: b.o.pgParams, Timeout: b.o.timeout, Env: b.o.env()})
		if errors.Is(err, bench.ErrTimeout) {
			b.printf("  projector ×%d: DID NOT FINISH: %v\n", n, err)
			continue
		}
		if err != nil {
			return err
		}
		b.printCatchup("projector", r)
		b.printVsRaw(r, raw)
		if first == 0 {
			first = r.EventsPerSec()
		} else {
			b.printf("    speed-up over the first: %.2fx\n", r.EventsPerSec()/first)
		}
	}
	return nil
}

func (b *bencher) rss() error {
	n := b.o.rssEvents
	if n <= 0 {
		n = 4 * b.o.rssProjects
	}
	w := bench.Workload{Seed: b.o.seed, Events: n, Projects: b.o.rssProjects, DupRate: b.o.dupRate}
	b.printf("\n== rss: %d events over %d projects, shuffled, %.0f%% duplicates\n", n, w.Projects, 100*w.DupRate)
	bl, err := b.env.PublishBacklog(b.ctx, "rss", w)
	if err != nil {
		return err
	}
	b.printf("  published %d messages in %.1f s\n", bl.Events, bl.Publish.Seconds())
	b.quiet("the rss run")
	r, err := b.env.Catchup(b.ctx, bl, bench.CatchupConfig{Batch: b.o.batch, Linger: b.o.linger, PGParams: b.o.pgParams, Timeout: b.o.timeout, Env: b.o.env()})
	if err != nil {
		return err
	}
	b.printCatchup("projector", r)
	return nil
}

func (b *bencher) profile() error {
	bl, err := b.catchupBacklog()
	if err != nil {
		return err
	}
	b.quiet("the profile")
	r, err := b.env.Profile(b.ctx, bl, bench.ProfileConfig{Batch: b.o.batch, Linger: b.o.linger, CPUProfile: b.o.cpuProfile, PGParams: b.o.pgParams})
	if err != nil {
		return err
	}
	b.printf("  in-process: %d events in %.2f s: %.0f events/s, %d pgx batches (load before %.2f)\n",
		r.Events, r.Elapsed.Seconds(), float64(r.Events)/r.Elapsed.Seconds(), r.Batches, bench.LoadAverage())
	var total time.Duration
	for _, s := range r.Statements {
		total += s.Total
	}
	b.printf("  time per statement (client side: request of the result → its end), %.2f s in all:\n", total.Seconds())
	for _, s := range r.Statements {
		b.printf("    %6.2f s %5.1f%% %6d× %7.2f ms  %s\n", s.Total.Seconds(), 100*s.Total.Seconds()/r.Elapsed.Seconds(), s.Count,
			float64(s.Total.Microseconds())/1000/float64(s.Count), s.Name)
	}
	if b.o.cpuProfile != "" {
		b.printf("  CPU profile: %s (go tool pprof -top %s)\n", b.o.cpuProfile, b.o.cpuProfile)
	}
	if b.o.explain != "" {
		f, err := os.Create(b.o.explain)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := b.env.Profile(b.ctx, bl, bench.ProfileConfig{Batch: b.o.batch, Linger: b.o.linger, Explain: f, ExplainBatches: 2, PGParams: b.o.pgParams,
			ExplainAfter: bl.Events / max(b.o.batch, 1) * 4 / 5}); err != nil {
			return err
		}
		b.printf("  EXPLAIN ANALYZE plans of 2 transactions, 80%% into the run: %s\n", b.o.explain)
	}
	return nil
}

func (o options) env() []string {
	if o.projectorEnv == "" {
		return nil
	}
	return strings.Split(o.projectorEnv, ",")
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }

func ms(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000) }

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q: want positive integers", s)
		}
		out = append(out, n)
	}
	return out, nil
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func memTotal() string {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return ""
	}
	l, _, _ := strings.Cut(string(b), "\n")
	return strings.Join(strings.Fields(l), " ")
}
