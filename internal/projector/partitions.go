package projector

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
)

// partitions runs this instance's share of a partitioned layout: the group
// (natsjs.Group: the instances of one durable, in a KV bucket) says which
// instances are live, natsjs.Assign which partitions are this one's. A
// partition given to this instance gets a writer and a loop over its
// durable: the writer acquires the partition's fence at once (from then on
// the previous owner commits nothing) and unpins the durable, so that the
// server delivers to this instance without waiting for the old pin to
// lapse. A partition taken away has its loop stopped: the batch in hand is
// finished and acked, the rest given back.
type partitions struct {
	layout    events.Layout
	cons      []jetstream.Consumer // by partition
	newWriter func(k int) *Writer
	cfg       Config
	js        jetstream.JetStream
	log       *zap.Logger
	slots     chan struct{} // the partitions' loops take turns (natsjs.LoopOptions.Slots)

	mu      sync.Mutex
	running map[int]*running
}

type running struct {
	p      *part
	w      *Writer
	cancel context.CancelFunc
	done   chan struct{}
}

// ready: every running partition's loop is.
func (ps *partitions) ready() bool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for _, r := range ps.running {
		if !r.p.loop.Ready() {
			return false
		}
	}
	return true
}

// owned lists the partitions running here.
func (ps *partitions) owned() []int {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	out := make([]int, 0, len(ps.running))
	for k := range ps.running {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// run follows the group until ctx ends or a partition's loop fails, then
// stops every partition it runs.
func (ps *partitions) run(ctx context.Context, group *natsjs.Group) error {
	ps.running = map[int]*running{}
	errc := make(chan error, 1)
	defer func() { ps.stop(ps.owned()) }()
	// Instances started together see each other's first put at once (the
	// watch is live): the first assignment waits firstAssignment after the
	// join, so that of instances started within it the first does not take
	// every partition only to hand most of them over.
	settled := time.After(time.Until(group.Joined().Add(firstAssignment)))
	var pending []string
	for pending == nil {
		select {
		case <-ctx.Done():
			return nil
		case pending = <-group.Members():
		}
	}
	for {
		var members []string
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case m := <-group.Members():
			if settled != nil {
				pending = m
				continue
			}
			members = m
		case <-settled:
			settled, members = nil, pending
		}
		ps.assign(ctx, group.Self(), members, errc)
	}
}

// firstAssignment is how long after joining an instance takes its first
// partitions (a single instance's start-up pays it once).
const firstAssignment = 500 * time.Millisecond

// assign runs the partitions members give self, and stops the others.
func (ps *partitions) assign(ctx context.Context, self string, members []string, errc chan<- error) {
	want := natsjs.Assign(ps.layout.N(), members, self)
	var gone []int
	for _, k := range ps.owned() {
		if !slices.Contains(want, k) {
			gone = append(gone, k)
		}
	}
	ps.stop(gone)
	for _, k := range want {
		ps.mu.Lock()
		_, on := ps.running[k]
		ps.mu.Unlock()
		if !on {
			ps.start(ctx, k, len(want), errc)
		}
	}
	ps.log.Info("partitions assigned", zap.String("layout", ps.layout.Name()), zap.Int("members", len(members)),
		zap.Ints("partitions", want), zap.Ints("given_up", gone))
}

// start runs partition k, one of the share this instance was given.
func (ps *partitions) start(ctx context.Context, k, share int, errc chan<- error) {
	kctx, cancel := context.WithCancel(ctx)
	w := ps.newWriter(k)
	r := &running{p: newPart(ps.cons[k], w, ps.cfg, false, partitionBuffer(ps.cfg.BatchSize, share), ps.slots),
		w: w, cancel: cancel, done: make(chan struct{})}
	ps.mu.Lock()
	ps.running[k] = r
	ps.mu.Unlock()
	go func() { // owner: stop, which waits for done
		defer close(r.done)
		defer w.release()
		if _, err := w.acquired(kctx); err == nil {
			uctx, ucancel := context.WithTimeout(kctx, 2*time.Second)
			if err := natsjs.Unpin(uctx, ps.js, ps.cfg.Stream, ps.cons[k].CachedInfo().Name); err != nil {
				ps.log.Debug("unpin", zap.Int("partition", k), zap.Error(err)) // nothing pinned yet, say
			}
			ucancel()
		} else if kctx.Err() == nil {
			ps.log.Warn("acquire on assignment; the first batch tries again", zap.Int("partition", k), zap.Error(err))
		}
		if err := r.p.loop.Run(kctx); err != nil && kctx.Err() == nil {
			select {
			case errc <- err:
			default:
			}
		}
	}()
}

// stop stops the partitions' loops, at once, and waits for them.
func (ps *partitions) stop(ks []int) {
	ps.mu.Lock()
	var rs []*running
	for _, k := range ks {
		if r := ps.running[k]; r != nil {
			r.cancel()
			rs = append(rs, r)
			delete(ps.running, k)
		}
	}
	ps.mu.Unlock()
	for _, r := range rs {
		<-r.done
	}
}

// partitionBuffer is how many messages each of the n partitions an
// instance was given keeps pulled ahead in the client, besides the batch it
// collects: the instance's 2·batch shared out, but at least 250. Measured
// (docs/performance.md): with 16 partitions on one instance 2·batch each
// gave 410 MiB peak RSS at 100,000 projects, a share 351 MiB at the same
// rate; a collect bounded as well, 248 MiB at half the rate. With fewer
// partitions an instance (several instances), a share of 250 bounded the
// batches to ~300 messages.
func partitionBuffer(batch, n int) int {
	return max(2*batch/n, 250)
}

// drainPoll is how often the partitions' start waits on the durable.
const drainPoll = 250 * time.Millisecond

// runParts runs the durable's loop and, once the durable has nothing
// pending or unacknowledged, this instance's share of the partitions (ps;
// nil in layout p1), until ctx ends: a project's messages stored before the
// layout was switched are applied before any of its partition's, so its
// partition's writer is its only writer from then on (after the switch the
// durable gets strays only, which write no project's rows). It returns the
// first loop's error.
func runParts(ctx context.Context, rest *part, ps *partitions, group *natsjs.Group, log *zap.Logger) error {
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return rest.loop.Run(gctx) })
	if ps != nil {
		g.Go(func() error {
			for {
				info, err := rest.cons.Info(gctx)
				if err == nil && info.NumPending == 0 && info.NumAckPending == 0 {
					break
				}
				select {
				case <-gctx.Done():
					return nil
				case <-time.After(drainPoll):
				}
			}
			log.Info("partitions starting: the durable has applied what was stored before the layout", zap.Int("partitions", ps.layout.N()))
			return ps.run(gctx, group)
		})
	}
	return g.Wait()
}
