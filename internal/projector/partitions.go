package projector

import (
	"context"
	"errors"
	"maps"
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
// instances are live, natsjs.Assign which partitions are this one's. One
// writer and one loop apply them all (docs/engine.md §6): a partition given
// to this instance is acquired by the writer (from then on the previous
// owner commits nothing), its durable unpinned (so that the server delivers
// to this instance without waiting for the old pin to lapse) and attached to
// the loop; a partition taken away is detached (the batch in hand is
// finished and acked, what was pulled of it given back) and released.
type partitions struct {
	layout events.Layout
	cons   []jetstream.Consumer // by partition
	w      *Writer
	loop   *natsjs.Loop
	cfg    Config
	js     jetstream.JetStream
	log    *zap.Logger

	mu      sync.Mutex
	running map[int]func() // partition -> its detach
}

// owned lists the partitions running here.
func (ps *partitions) owned() []int {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return slices.Sorted(maps.Keys(ps.running))
}

// run runs the loop and follows the group until ctx ends or the loop fails.
func (ps *partitions) run(ctx context.Context, group *natsjs.Group) error {
	ps.running = map[int]func(){}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return ps.loop.Run(gctx) })
	g.Go(func() error { ps.follow(gctx, group); return nil })
	return g.Wait()
}

// follow assigns the partitions as the group changes, until ctx ends.
func (ps *partitions) follow(ctx context.Context, group *natsjs.Group) {
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
			return
		case pending = <-group.Members():
		}
	}
	for {
		var members []string
		select {
		case <-ctx.Done():
			return
		case m := <-group.Members():
			if settled != nil {
				pending = m
				continue
			}
			members = m
		case <-settled:
			settled, members = nil, pending
		}
		ps.assign(ctx, group.Self(), members)
	}
}

// firstAssignment is how long after joining an instance takes its first
// partitions (a single instance's start-up pays it once).
const firstAssignment = 500 * time.Millisecond

// assign runs the partitions members give self, and stops the others.
func (ps *partitions) assign(ctx context.Context, self string, members []string) {
	want := natsjs.Assign(ps.layout.N(), members, self)
	var gone, fresh []int
	for _, k := range ps.owned() {
		if !slices.Contains(want, k) {
			gone = append(gone, k)
		}
	}
	ps.stop(gone)
	ps.mu.Lock()
	for _, k := range want {
		if ps.running[k] == nil {
			fresh = append(fresh, k)
		}
	}
	ps.mu.Unlock()
	ps.start(ctx, fresh, len(want))
	ps.log.Info("partitions assigned", zap.String("layout", ps.layout.Name()), zap.Int("members", len(members)),
		zap.Ints("partitions", want), zap.Ints("given_up", gone))
}

// start runs partitions ks, of the share this instance was given: acquired
// (one transaction), unpinned, attached to the loop.
func (ps *partitions) start(ctx context.Context, ks []int, share int) {
	if len(ks) == 0 {
		return
	}
	if err := ps.w.Acquire(ctx, ks...); err == nil {
		for _, k := range ks {
			uctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			if err := natsjs.Unpin(uctx, ps.js, ps.cfg.Stream, ps.cons[k].CachedInfo().Name); err != nil {
				ps.log.Debug("unpin", zap.Int("partition", k), zap.Error(err)) // nothing pinned yet, say
			}
			cancel()
		}
	} else if ctx.Err() == nil {
		// Wanted all the same: the writer acquires when their messages come.
		ps.log.Warn("acquire on assignment; the first batch tries again", zap.Ints("partitions", ks), zap.Error(err))
	}
	for _, k := range ks {
		detach, err := ps.loop.Attach(ps.cons[k], partitionBuffer(ps.cfg.BatchSize, share))
		if err != nil {
			return // the loop stopped
		}
		ps.mu.Lock()
		ps.running[k] = detach
		ps.mu.Unlock()
	}
}

// stop stops pulling partitions ks and releases them.
func (ps *partitions) stop(ks []int) {
	if len(ks) == 0 {
		return
	}
	ps.mu.Lock()
	for _, k := range ks {
		if detach := ps.running[k]; detach != nil {
			detach()
			delete(ps.running, k)
		}
	}
	ps.mu.Unlock()
	ps.w.Release(ks...)
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

// runParts runs the durable's loop (with a repartition's drain attached, if
// drain is not nil) and, once the durable and the drain have nothing pending
// or unacknowledged, this instance's share of the partitions (ps; nil in
// layout p1), until ctx ends: a project's messages stored before the layout
// was switched are applied before any of its partition's, so its partition's
// writer is its only writer from then on (after the switch the durable gets
// strays only, which write no project's rows). A drain that has applied
// everything is deleted, with the former layout's durables (finishDrain).
// It returns the first loop's error.
func runParts(ctx context.Context, rest *natsjs.Loop, restCons, drain jetstream.Consumer, finishDrain func(context.Context) error, ps *partitions, group *natsjs.Group, log *zap.Logger) error {
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return rest.Run(gctx) })
	if drain == nil && ps == nil {
		return g.Wait()
	}
	detachDrain := func() {}
	if drain != nil {
		var err error
		if detachDrain, err = rest.AttachTransient(drain, 0); err != nil {
			g.Go(func() error { return err }) // stops the durable's loop too
			return g.Wait()
		}
	}
	// empty waits until c has nothing pending or unacknowledged (a drain
	// deleted by another instance that found it so is empty).
	empty := func(c jetstream.Consumer) bool {
		for {
			info, err := c.Info(gctx)
			if err == nil && info.NumPending == 0 && info.NumAckPending == 0 || c == drain && errors.Is(err, jetstream.ErrConsumerNotFound) {
				return true
			}
			select {
			case <-gctx.Done():
				return false
			case <-time.After(drainPoll):
			}
		}
	}
	g.Go(func() error {
		if !empty(restCons) || drain != nil && !empty(drain) {
			return nil
		}
		if drain != nil {
			// What it pulled is settled before the partitions start: the
			// drain's writer and theirs do not overlap on a project.
			detachDrain()
			if !empty(drain) {
				return nil
			}
			if err := finishDrain(gctx); err != nil {
				return err
			}
		}
		if ps == nil {
			return nil
		}
		log.Info("partitions starting: the durable has applied what was stored before the layout", zap.Int("partitions", ps.layout.N()))
		return ps.run(gctx, group)
	})
	return g.Wait()
}
