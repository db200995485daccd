package bench

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// LiveConfig is one live-latency run.
type LiveConfig struct {
	Rate     int           // events per second, default 5000
	Duration time.Duration // default 30 s
	Projects int           // default Rate*Duration/10 (about 10 events per project)
	Seed     int64
	Batch    int
	Linger   time.Duration
	Poll     time.Duration // visibility poll interval, default 2 ms
	PGParams string        // Postgres settings for the projector (ProjectorConfig.PGParams)
	Env      []string      // extra environment for the projector (KEY=VALUE)
}

// LiveResult is what one live run measured.
type LiveResult struct {
	Config      LiveConfig
	Published   int
	PublishRate float64 // achieved, events/s
	Latency     Percentiles
	StoreAck    Percentiles // publish → JetStream ack (stored, fsynced)
	Usage       Usage
	Machine     float64 // busy cores during the publishing
	LoadBefore  float64
	Warnings    int
	Missing     int           // events not visible two minutes after the last publish (the projector fell behind)
	BackendCPU  time.Duration // of the Postgres backends serving the run's database
	Batches     Batches
}

// Percentiles of a latency distribution.
type Percentiles struct {
	P50, P90, P99, Max time.Duration
	N                  int
}

func percentiles(ds []time.Duration) Percentiles {
	if len(ds) == 0 {
		return Percentiles{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return Percentiles{P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: s[len(s)-1], N: len(s)}
}

// Live starts a projector on an empty stream, waits until it is pulling,
// publishes at a steady rate and measures, for every event, the time from
// its publish to its projector_applied row being visible (committed) in
// Postgres. The bench database gets an index on projector_applied
// (stream_seq), and a poller reads the rows past the last contiguous
// sequence seen every cfg.Poll: an event's visible time is the start of the
// first poll that returns it, so it is late by at most one poll interval
// plus one poll's duration.
func (e *Env) Live(ctx context.Context, cfg LiveConfig) (LiveResult, error) {
	if cfg.Rate <= 0 {
		cfg.Rate = 5000
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 30 * time.Second
	}
	n := int(float64(cfg.Rate) * cfg.Duration.Seconds())
	if cfg.Projects <= 0 {
		cfg.Projects = max(1, n/10)
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 2 * time.Millisecond
	}
	res := LiveResult{Config: cfg, LoadBefore: LoadAverage()}
	st, err := e.NewStream(ctx, "live")
	if err != nil {
		return res, err
	}
	defer func() { _ = e.js.DeleteStream(context.WithoutCancel(ctx), st.Name) }()
	url, err := e.NewDatabase(ctx, "live")
	if err != nil {
		return res, err
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return res, fmt.Errorf("live: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, `CREATE INDEX projector_applied_seq_bench ON projector_applied (stream_seq)`); err != nil {
		return res, fmt.Errorf("live: index: %w", err)
	}
	msgs, err := Messages(Workload{Seed: cfg.Seed, Events: n, Projects: cfg.Projects}.Generate(), st.Prefix)
	if err != nil {
		return res, err
	}
	durable := "bench-live"
	conses, err := e.durables(ctx, st, durable)
	if err != nil {
		return res, err
	}
	p, err := e.StartProjector(ProjectorConfig{DatabaseURL: url, Stream: st, Durable: durable, Batch: cfg.Batch, Linger: cfg.Linger, PGParams: cfg.PGParams, Env: cfg.Env})
	if err != nil {
		return res, err
	}
	defer p.Kill()
	// Caught up (on nothing) and pulling: a pull request is waiting on
	// every durable (in a partitioned layout, once the partitions are
	// assigned).
	for {
		waiting := 0
		for _, cons := range conses {
			if info, err := cons.Info(ctx); err == nil && info.NumWaiting > 0 {
				waiting++
			}
		}
		if waiting == len(conses) {
			break
		}
		if done, perr := p.Exited(); done {
			return res, fmt.Errorf("projector exited early: %v%s", perr, p.logTail())
		}
		if time.Since(p.Started) > time.Minute {
			return res, fmt.Errorf("projector is not pulling after a minute%s", p.logTail())
		}
		time.Sleep(10 * time.Millisecond)
	}

	// The poller: seq → when first seen.
	pctx, stopPoll := context.WithCancel(ctx)
	defer stopPoll()
	seen := make(map[uint64]time.Time, n)
	pollDone := make(chan error, 1)
	go func() { // owner: Live, which reads pollDone
		var low uint64 // every seq ≤ low has been seen
		var seq int64
		for {
			at := time.Now()
			rows, _ := conn.Query(pctx, `SELECT stream_seq FROM projector_applied WHERE stream_seq > $1`, int64(low))
			_, err := pgx.ForEachRow(rows, []any{&seq}, func() error {
				if _, ok := seen[uint64(seq)]; !ok {
					seen[uint64(seq)] = at
				}
				return nil
			})
			if pctx.Err() != nil {
				pollDone <- nil
				return
			}
			if err != nil {
				pollDone <- fmt.Errorf("poll: %w", err)
				return
			}
			for {
				if _, ok := seen[low+1]; !ok {
					break
				}
				low++
			}
			if low >= uint64(n) {
				pollDone <- nil
				return
			}
			time.Sleep(max(0, cfg.Poll-time.Since(at)))
		}
	}()

	cpu0, err := SampleCPU()
	if err != nil {
		return res, err
	}
	sent, err := e.Publish(ctx, msgs, cfg.Rate)
	if err != nil {
		return res, err
	}
	cpu1, _ := SampleCPU()
	res.Machine = MachineCPU(cpu0, cpu1)
	res.Published = len(msgs)
	res.PublishRate = float64(len(msgs)) / sent.Times[len(msgs)-1].Sub(sent.Times[0]).Seconds()
	select {
	case err := <-pollDone:
		if err != nil {
			return res, err
		}
	case <-time.After(2 * time.Minute):
		stopPoll()
		if err := <-pollDone; err != nil {
			return res, err
		}
	}
	// Percentiles over the events that became visible; Missing counts the
	// others (their latency is over two minutes).
	lat := make([]time.Duration, 0, n)
	acks := make([]time.Duration, 0, n)
	for i, s := range sent.Seqs {
		acks = append(acks, sent.Acked[i].Sub(sent.Times[i]))
		v, ok := seen[s]
		if !ok {
			res.Missing++
			continue
		}
		lat = append(lat, v.Sub(sent.Times[i]))
	}
	res.Latency, res.StoreAck = percentiles(lat), percentiles(acks)
	if pids, err := BackendPIDs(ctx, url); err == nil {
		res.BackendCPU = CPUOf(pids)
	}
	res.Batches, _ = p.Batches()
	u, err := p.Stop()
	if err != nil {
		return res, err
	}
	res.Usage = u
	res.Warnings, _ = p.WarnLines()
	return res, nil
}
