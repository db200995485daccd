package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
)

// Backlog is a stream holding a published workload.
type Backlog struct {
	Stream   Stream
	Events   int // messages in the stream
	Distinct int // distinct event ids
	LastSeq  uint64
	Publish  time.Duration
	Workload []events.Event // the published events, in publish order
}

// PublishBacklog generates w, publishes it to a new stream as fast as the
// acks allow, and returns the stream.
func (e *Env) PublishBacklog(ctx context.Context, label string, w Workload) (Backlog, error) {
	evs := w.Generate()
	st, err := e.NewStream(ctx, label)
	if err != nil {
		return Backlog{}, err
	}
	msgs, err := Messages(evs, st.Prefix)
	if err != nil {
		return Backlog{}, err
	}
	sent, err := e.Publish(ctx, msgs, 0)
	if err != nil {
		return Backlog{}, err
	}
	ids := make(map[string]bool, len(evs))
	for _, ev := range evs {
		ids[ev.ID] = true
	}
	var last uint64
	for _, s := range sent.Seqs {
		last = max(last, s)
	}
	return Backlog{Stream: st, Events: len(msgs), Distinct: len(ids), LastSeq: last, Publish: sent.Took, Workload: evs}, nil
}

// ErrTimeout is a catch-up that did not finish within its timeout.
var ErrTimeout = errors.New("catch-up timed out")

// CatchupConfig is one catch-up run over a published backlog.
type CatchupConfig struct {
	Instances int // projector processes on one durable, default 1
	Batch     int
	Linger    time.Duration
	Timeout   time.Duration // default 10 min
	PGParams  string        // Postgres settings for the projectors (ProjectorConfig.PGParams)
	Env       []string      // extra environment for the projectors (KEY=VALUE)
}

// CatchupResult is what one catch-up run measured.
type CatchupResult struct {
	Instances    int
	Events       int
	Elapsed      time.Duration // from the first process start until every message is acked
	FirstAck     time.Duration // from the first process start until the first ack (start-up)
	Usage        []Usage       // per process, read just before SIGTERM
	Shares       []Share       // per process: what it applied, its partitions
	MachineCores float64       // busy CPU of the whole machine during the run, in cores
	BackendCPU   time.Duration // CPU of the Postgres backends serving the run's database
	ServerCPU    time.Duration // CPU of every postgres process (all databases, background work)
	ProjectorCPU time.Duration // CPU of the projector processes
	BenchCPU     time.Duration // CPU of this process: the embedded NATS server, mostly
	LoadBefore   float64       // 1-minute load average at the start
	Warnings     int           // warn/error log lines of the projectors
	FirstWarning string
	Rows         Counts
	DatabaseURL  string
	Batches      Batches // over all the processes (MeanSeconds: of the first)
	Activity     Activity
}

// Share is what one process of a run did.
type Share struct {
	Applied    int   // distinct events it applied (buildstate_events_applied_total)
	Partitions []int // the partitions it was given last (partitioned layouts)
	Acquired   int   // partition acquires (buildstate_partition_acquired_total)
	Fenced     int   // batches fenced (buildstate_fenced_total)
}

// EventsPerSec is the catch-up rate.
func (r CatchupResult) EventsPerSec() float64 { return float64(r.Events) / r.Elapsed.Seconds() }

// MaxPeakRSS is the largest VmHWM of the processes.
func (r CatchupResult) MaxPeakRSS() int64 {
	var m int64
	for _, u := range r.Usage {
		m = max(m, u.PeakRSS)
	}
	return m
}

// Catchup runs cfg.Instances projectors on a fresh database and a new
// durable over the backlog, and measures until every message is acked.
func (e *Env) Catchup(ctx context.Context, b Backlog, cfg CatchupConfig) (CatchupResult, error) {
	if cfg.Instances < 1 {
		cfg.Instances = 1
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Minute
	}
	res := CatchupResult{Instances: cfg.Instances, Events: b.Events, LoadBefore: LoadAverage()}
	url, err := e.NewDatabase(ctx, "catchup")
	if err != nil {
		return res, err
	}
	res.DatabaseURL = url
	durable := "bench-" + randomSuffix()
	conses, err := e.durables(ctx, b.Stream, durable)
	defer func() {
		for _, c := range conses {
			_ = e.js.DeleteConsumer(context.WithoutCancel(ctx), b.Stream.Name, c.CachedInfo().Name)
		}
	}()
	if err != nil {
		return res, err
	}

	cpu0, err := SampleCPU()
	if err != nil {
		return res, err
	}
	actx, stopActivity := context.WithCancel(ctx)
	defer stopActivity()
	activity, err := SampleActivity(actx, url, 20*time.Millisecond)
	if err != nil {
		return res, err
	}
	srv0 := ServerCPU()
	self0, _ := procCPU(os.Getpid())
	var procs []*Process
	defer func() {
		for _, p := range procs {
			p.Kill()
		}
	}()
	for range cfg.Instances {
		p, err := e.StartProjector(ProjectorConfig{DatabaseURL: url, Stream: b.Stream, Durable: durable, Batch: cfg.Batch, Linger: cfg.Linger, PGParams: cfg.PGParams, Env: cfg.Env})
		if err != nil {
			return res, err
		}
		procs = append(procs, p)
	}
	start := procs[0].Started
	wctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	firstAck, err := waitAcked(wctx, conses, b.LastSeq, procs)
	if err != nil {
		if wctx.Err() != nil && ctx.Err() == nil {
			// Timed out: say how far it got.
			var acked uint64
			for _, c := range conses {
				if info, ierr := c.Info(ctx); ierr == nil {
					acked += info.Delivered.Stream - uint64(info.NumAckPending)
				}
			}
			err = fmt.Errorf("%w: after %s, about %d of %d messages acked (%.0f/s)", ErrTimeout, cfg.Timeout,
				acked, b.LastSeq, float64(acked)/time.Since(start).Seconds())
		}
		return res, err
	}
	res.Elapsed = time.Since(start)
	res.FirstAck = firstAck.Sub(start)
	cpu1, err := SampleCPU()
	if err != nil {
		return res, err
	}
	res.MachineCores = MachineCPU(cpu0, cpu1)
	stopActivity()
	res.Activity = <-activity
	res.ServerCPU = CPUDelta(srv0, ServerCPU())
	if self1, err := procCPU(os.Getpid()); err == nil {
		res.BenchCPU = self1 - self0
	}
	if pids, err := BackendPIDs(ctx, url); err == nil {
		res.BackendCPU = CPUOf(pids)
	}
	metrics := make([]map[string]float64, len(procs))
	for i, p := range procs { // all before any stops (a stop moves its partitions)
		var share Share
		if m, err := p.Metrics(); err == nil {
			metrics[i] = m
			share.Applied = int(m["buildstate_events_applied_total"])
			share.Fenced = int(m["buildstate_fenced_total"])
			share.Acquired = int(m["buildstate_partition_acquired_total"])
		}
		share.Partitions = p.Assigned()
		res.Shares = append(res.Shares, share)
	}
	for i, p := range procs {
		if m := metrics[i]; m != nil {
			bs := batchesOf(m)
			res.Batches.Count += bs.Count
			res.Batches.WriteRetries += bs.WriteRetries
			res.Batches.Redone += bs.Redone
			if i == 0 {
				res.Batches.MeanSeconds = bs.MeanSeconds
			}
		}
		u, err := p.Stop()
		if err != nil {
			return res, err
		}
		res.Usage = append(res.Usage, u)
		res.ProjectorCPU += u.CPU
		n, first := p.WarnLines()
		res.Warnings += n
		if res.FirstWarning == "" {
			res.FirstWarning = first
		}
	}
	procs = nil
	if res.Rows, err = CountRows(ctx, url); err != nil {
		return res, err
	}
	if res.Rows.Applied != b.Distinct || res.Rows.DeadLetters != 0 {
		return res, fmt.Errorf("catch-up: %d events applied, %d dead letters; want %d applied, 0 dead letters",
			res.Rows.Applied, res.Rows.DeadLetters, b.Distinct)
	}
	return res, nil
}

// durables makes the projector's durables on s before it starts, so that
// the run can watch them: the durable, and in a partitioned layout each
// partition's (natsjs.PartitionConsumerConfig).
func (e *Env) durables(ctx context.Context, s Stream, durable string) ([]jetstream.Consumer, error) {
	cfgs := []jetstream.ConsumerConfig{natsjs.ConsumerConfig(durable, s.Prefix)}
	for k := range s.Layout.N() {
		if s.Layout.Partitioned() {
			cfgs = append(cfgs, natsjs.PartitionConsumerConfig(durable, s.Prefix, s.Layout, k))
		}
	}
	var out []jetstream.Consumer
	for _, c := range cfgs {
		cons, err := natsjs.EnsureConsumerConfig(ctx, e.js, s.Name, c, nil)
		if err != nil {
			return out, err
		}
		out = append(out, cons)
	}
	return out, nil
}

// waitAcked polls the consumers until every message up to lastSeq is acked
// (nothing pending or awaiting its ack on any, and one's ack floor at
// lastSeq) and returns when the first ack was seen. It fails if a projector
// exits.
func waitAcked(ctx context.Context, conses []jetstream.Consumer, lastSeq uint64, procs []*Process) (time.Time, error) {
	var firstAck time.Time
	for {
		var info *jetstream.ConsumerInfo
		done, floor := true, uint64(0)
		var err error
		for _, cons := range conses {
			info, err = cons.Info(ctx)
			if err != nil {
				done = false
				break
			}
			floor = max(floor, info.AckFloor.Stream)
			done = done && info.NumPending == 0 && info.NumAckPending == 0
		}
		if err != nil && ctx.Err() != nil {
			return firstAck, fmt.Errorf("wait for acks: %w", ctx.Err())
		}
		if err == nil {
			if firstAck.IsZero() && floor > 0 {
				firstAck = time.Now()
			}
			if done && floor >= lastSeq {
				if firstAck.IsZero() {
					firstAck = time.Now()
				}
				return firstAck, nil
			}
		}
		for _, p := range procs {
			if done, perr := p.Exited(); done {
				return firstAck, fmt.Errorf("projector %d exited early: %v%s", p.PID(), perr, p.logTail())
			}
		}
		select {
		case <-ctx.Done():
			if info != nil {
				return firstAck, fmt.Errorf("wait for acks (ack floor %d of %d, %d pending, %d awaiting ack): %w",
					info.AckFloor.Stream, lastSeq, info.NumPending, info.NumAckPending, ctx.Err())
			}
			return firstAck, fmt.Errorf("wait for acks: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Counts are the row counts of a read model.
type Counts struct {
	Projects, Metrics, Applied, DeadLetters int
}

// CountRows counts the rows of the database at url.
func CountRows(ctx context.Context, url string) (Counts, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return Counts{}, fmt.Errorf("count rows: %w", err)
	}
	defer conn.Close(ctx)
	var c Counts
	err = conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM projects), (SELECT count(*) FROM project_build_metrics),
		(SELECT count(*) FROM projector_applied), (SELECT count(*) FROM projector_dead_letters)`).
		Scan(&c.Projects, &c.Metrics, &c.Applied, &c.DeadLetters)
	if err != nil {
		return Counts{}, fmt.Errorf("count rows: %w", err)
	}
	return c, nil
}
