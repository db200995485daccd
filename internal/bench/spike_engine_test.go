package bench

// The measured spike behind docs/engine.md (issue 10): what the NATS server
// does with a partitioning subject transform, how fast a durable pull
// consumer can fetch and ack a backlog, and how a pinned priority group
// fails over. Opt-in (BENCH_SPIKE=1): it publishes a 205,000-message
// backlog and takes about a minute. The functional findings are asserted;
// the figures are printed, never asserted.

import (
	"context"
	"fmt"
	"hash/fnv"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/testenv"
)

func spikeServer(t *testing.T) (*nats.Conn, jetstream.JetStream, string) {
	t.Helper()
	if os.Getenv("BENCH_SPIKE") == "" {
		t.Skip("BENCH_SPIKE=1 runs the engine spike")
	}
	srv, err := startNATS(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		t.Fatal(err)
	}
	return nc, js, srv.ClientURL()
}

// partitionOf is the server's partition(n, token): FNV-1a 32 of the token, mod n.
func partitionOf(project string, n uint32) int {
	h := fnv.New32a()
	h.Write([]byte(project))
	return int(h.Sum32() % n)
}

func publishAll(t *testing.T, js jetstream.JetStream, msgs []*nats.Msg) time.Duration {
	t.Helper()
	start := time.Now()
	for _, m := range msgs {
		if _, err := js.PublishMsgAsync(m, jetstream.WithStallWait(time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(2 * time.Minute):
		t.Fatal("publish: acks did not come back")
	}
	return time.Since(start)
}

// (a) A partitioning transform added to an existing stream.
func TestSpikeTransform(t *testing.T) {
	// pending: what the partition's consumer holds after a publish straight
	// to a subject of its filter. With the prefix first, such a publish is
	// stored as it is and lands in the partition.
	for _, tc := range []struct {
		name, dest, filter string
		pending            uint64
	}{
		{"prefix-first", "builds.{{partition(16,1)}}.{{wildcard(1)}}.{{wildcard(2)}}", "builds.%d.*.*", 2},
		{"partition-first", "{{partition(16,1)}}.builds.{{wildcard(1)}}.{{wildcard(2)}}", "%d.builds.*.*", 1},
		{"layout-first", "p16.{{partition(16,1)}}.builds.{{wildcard(1)}}.{{wildcard(2)}}", "p16.%d.builds.*.*", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, js, _ := spikeServer(t)
			ctx := context.Background()
			cfg := natsjs.StreamConfig("BUILDS", "builds", 1, events.Layout{})
			if _, err := js.CreateStream(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			if _, err := js.Publish(ctx, "builds.p-1.queued", []byte("before")); err != nil {
				t.Fatal(err)
			}
			cfg.SubjectTransform = &jetstream.SubjectTransformConfig{Source: "builds.*.*", Destination: tc.dest}
			if _, err := js.UpdateStream(ctx, cfg); err != nil {
				t.Fatalf("update stream with transform %q: %v", tc.dest, err)
			}
			ack, err := js.Publish(ctx, "builds.p-1.started", []byte("after"), jetstream.WithMsgID("id-1"))
			if err != nil {
				t.Fatalf("publish after transform: %v", err)
			}
			dup, err := js.Publish(ctx, "builds.p-1.started", []byte("after"), jetstream.WithMsgID("id-1"))
			if err != nil || !dup.Duplicate {
				t.Fatalf("republish with the same Nats-Msg-Id: %+v, %v; want a duplicate", dup, err)
			}
			if _, err := js.Publish(ctx, "builds.p-1", []byte("two tokens")); err != nil {
				t.Fatalf("publish of a 2-token subject: %v", err)
			}
			s, _ := js.Stream(ctx, "BUILDS")
			want := map[uint64]string{
				1: "builds.p-1.queued", // stored before the transform: unchanged
				ack.Sequence: strings.Replace(strings.Replace(tc.dest, "{{partition(16,1)}}", strconv.Itoa(partitionOf("p-1", 16)), 1),
					"{{wildcard(1)}}.{{wildcard(2)}}", "p-1.started", 1),
				3: "builds.p-1", // does not match builds.*.*: stored as published
			}
			for seq, subj := range want {
				m, err := s.GetMsg(ctx, seq)
				if err != nil {
					t.Fatal(err)
				}
				if m.Subject != subj {
					t.Errorf("seq %d stored as %q; want %q", seq, m.Subject, subj)
				}
				t.Logf("seq %d stored as %q", seq, m.Subject)
			}
			if _, err := js.Publish(ctx, strings.ReplaceAll(fmt.Sprintf(tc.filter, 5), "*", "x"), []byte("into the partitions' namespace")); err != nil {
				t.Logf("publish straight to %q: %v", fmt.Sprintf(tc.filter, 5), err)
			} else {
				t.Logf("publish straight to %q: stored", fmt.Sprintf(tc.filter, 5))
			}
			p := partitionOf("p-1", 16)
			c, err := js.CreateOrUpdateConsumer(ctx, "BUILDS", jetstream.ConsumerConfig{
				Durable: "part", FilterSubjects: []string{fmt.Sprintf(tc.filter, p)}, AckPolicy: jetstream.AckAllPolicy,
			})
			if err != nil {
				t.Fatalf("partition consumer with filter %q: %v", fmt.Sprintf(tc.filter, p), err)
			}
			info, _ := c.Info(ctx)
			if info.NumPending != tc.pending {
				t.Errorf("partition consumer pending %d; want %d", info.NumPending, tc.pending)
			}
			// The upgrade's leftovers: an untransformed old message and a stray.
			rest, err := js.CreateOrUpdateConsumer(ctx, "BUILDS", jetstream.ConsumerConfig{
				Durable: "rest", FilterSubject: "builds.>", AckPolicy: jetstream.AckAllPolicy,
			})
			if err != nil {
				t.Fatal(err)
			}
			ri, _ := rest.Info(ctx)
			t.Logf("consumer on builds.> sees %d messages", ri.NumPending)
		})
	}
}

func spikeBacklog(t *testing.T, js jetstream.JetStream, transform bool) {
	t.Helper()
	ctx := context.Background()
	cfg := natsjs.StreamConfig("BUILDS", "builds", 1, events.Layout{})
	if transform {
		cfg.SubjectTransform = &jetstream.SubjectTransformConfig{Source: "builds.*.*",
			Destination: "{{partition(16,1)}}.builds.{{wildcard(1)}}.{{wildcard(2)}}"}
	}
	if _, err := js.CreateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	evs := Workload{Seed: 1, Events: 205000, Projects: 20000, DupRate: 0.05}.Generate()
	msgs, err := Messages(evs, "builds")
	if err != nil {
		t.Fatal(err)
	}
	took := publishAll(t, js, msgs)
	t.Logf("published %d messages in %s (%.0f/s)", len(msgs), took.Round(time.Millisecond), float64(len(msgs))/took.Seconds())
}

// cpuNow is the CPU time this process (the embedded server and the
// client) has used so far: under a shared load it says more than a rate.
func cpuNow() time.Duration {
	d, _ := procCPU(os.Getpid())
	return d
}

func perMsg(cpu time.Duration, n uint64) string {
	return fmt.Sprintf("%.1f µs CPU/msg", float64(cpu.Microseconds())/float64(n))
}

// drain is DrainAcking (the bench's raw baseline) with the spike's pull
// size, and returns the rate.
func drain(t *testing.T, cons jetstream.Consumer, total uint64, every int) float64 {
	t.Helper()
	start := time.Now()
	if err := DrainAcking(context.Background(), cons, int(total), every, jetstream.PullMaxMessages(2000)); err != nil {
		t.Fatal(err)
	}
	return float64(total) / time.Since(start).Seconds()
}

// (b) Raw fetch+ack of the backlog: one durable, ack each vs ack all. This
// is the bench's raw baseline (Env.Raw, `go run ./cmd/bench raw`).
func TestSpikeRawAck(t *testing.T) {
	if os.Getenv("BENCH_SPIKE") == "" {
		t.Skip("BENCH_SPIKE=1 runs the engine spike")
	}
	ctx := context.Background()
	env, err := Setup(ctx, Options{NATSOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(env.Close)
	bl, err := env.PublishBacklog(ctx, "spike", Workload{Seed: 1, Events: 205000, Projects: 20000, DupRate: 0.05})
	if err != nil {
		t.Fatal(err)
	}
	for run := range 3 {
		for _, ack := range []RawAck{AckEach, AckAll} {
			r, err := env.Raw(ctx, bl, RawConfig{Ack: ack, Batch: 1000})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("run %d %-8s %7.0f msgs/s, %s", run+1, ack, r.MsgsPerSec(), perMsg(r.CPU, uint64(r.Messages)))
		}
	}
}

// (b') The same backlog in 16 partitions: 16 consumers, drained one after
// another and all at once, acking all.
func TestSpikePartitionedAck(t *testing.T) {
	_, js, _ := spikeServer(t)
	spikeBacklog(t, js, true)
	ctx := context.Background()
	s, _ := js.Stream(ctx, "BUILDS")
	for run := range 3 {
		for _, mode := range []struct {
			name  string
			ack   jetstream.AckPolicy
			every int
		}{{"explicit, ack each", jetstream.AckExplicitPolicy, 1}, {"ack all, every 1000th", jetstream.AckAllPolicy, 1000}} {
			name := fmt.Sprintf("whole%d%d", run, mode.every)
			c, err := js.CreateOrUpdateConsumer(ctx, "BUILDS", jetstream.ConsumerConfig{
				Durable: name, AckPolicy: mode.ack, AckWait: 10 * time.Second, MaxAckPending: 20000, MaxDeliver: -1,
			})
			if err != nil {
				t.Fatal(err)
			}
			c0 := cpuNow()
			rate := drain(t, c, 205000, mode.every)
			t.Logf("run %d: one durable, whole stream, %-22s %7.0f msgs/s, %s", run+1, mode.name, rate, perMsg(cpuNow()-c0, 205000))
			_ = s.DeleteConsumer(ctx, name)
		}
		cons := make([]jetstream.Consumer, 16)
		pending := make([]uint64, 16)
		for p := range 16 {
			c, err := js.CreateOrUpdateConsumer(ctx, "BUILDS", jetstream.ConsumerConfig{
				Durable: fmt.Sprintf("r%d-p%d", run, p), FilterSubject: fmt.Sprintf("%d.builds.*.*", p),
				AckPolicy: jetstream.AckAllPolicy, AckWait: 10 * time.Second, MaxAckPending: 20000, MaxDeliver: -1,
				PriorityGroups: []string{"engine"}, PriorityPolicy: jetstream.PriorityPolicyPinned, PinnedTTL: 5 * time.Second,
			})
			if err != nil {
				t.Fatal(err)
			}
			info, _ := c.Info(ctx)
			cons[p], pending[p] = c, info.NumPending
		}
		start, c0 := time.Now(), cpuNow()
		done := make(chan float64, 16)
		for p := range 16 {
			go func() { done <- drainPinned(t, cons[p], pending[p]) }()
		}
		var total uint64
		for p := range 16 {
			<-done
			total += pending[p]
		}
		el, cpu := time.Since(start), cpuNow()-c0
		t.Logf("run %d: 16 pinned partition consumers at once, ack all: %d msgs in %s = %.0f msgs/s, %s (partition sizes %v)",
			run+1, total, el.Round(time.Millisecond), float64(total)/el.Seconds(), perMsg(cpu, total), pending)
		for p := range 16 {
			_ = s.DeleteConsumer(ctx, fmt.Sprintf("r%d-p%d", run, p))
		}
		// One partition alone: what a partition consumer costs the server
		// when it is the only one reading (it skips the other 15/16).
		one, err := js.CreateOrUpdateConsumer(ctx, "BUILDS", jetstream.ConsumerConfig{
			Durable: fmt.Sprintf("one%d", run), FilterSubject: "3.builds.*.*",
			AckPolicy: jetstream.AckAllPolicy, MaxAckPending: 20000, MaxDeliver: -1,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("run %d: partition 3 alone, ack all: %.0f msgs/s", run+1, drain(t, one, pending[3], 1000))
		_ = s.DeleteConsumer(ctx, fmt.Sprintf("one%d", run))
	}
}

func drainPinned(t *testing.T, cons jetstream.Consumer, total uint64) float64 {
	start := time.Now()
	if err := DrainAcking(context.Background(), cons, int(total), 1000,
		jetstream.PullMaxMessages(1000), jetstream.PullPriorityGroup("engine")); err != nil {
		t.Error(err)
		return 0
	}
	return float64(total) / time.Since(start).Seconds()
}

// (c) Failover of a pinned priority group: the pinned client's connection
// dies (as on SIGKILL), or it stops pulling (as on SIGSTOP), or the new
// owner unpins at once.
func TestSpikePinnedFailover(t *testing.T) {
	_, js, url := spikeServer(t)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, natsjs.StreamConfig("BUILDS", "builds", 1, events.Layout{})); err != nil {
		t.Fatal(err)
	}
	for _, ttl := range []time.Duration{2 * time.Second, 5 * time.Second} {
		if os.Getenv("BENCH_SPIKE_TTL") != "" && os.Getenv("BENCH_SPIKE_TTL") != ttl.String() {
			continue
		}
		for _, how := range []string{"close connection", "close connection mid-batch", "stop pulling", "stop pulling + unpin"} {
			for run := range 2 {
				name := fmt.Sprintf("f%d-%d-%d", int(ttl.Seconds()), len(how), run)
				_, err := js.CreateOrUpdateConsumer(ctx, "BUILDS", jetstream.ConsumerConfig{
					Durable: name, FilterSubject: "builds.>", AckPolicy: jetstream.AckAllPolicy,
					AckWait: 6 * time.Second, DeliverPolicy: jetstream.DeliverNewPolicy,
					PriorityGroups: []string{"engine"}, PriorityPolicy: jetstream.PriorityPolicyPinned, PinnedTTL: ttl,
				})
				if err != nil {
					t.Fatal(err)
				}
				gap, stale := failover(t, js, url, name, how)
				t.Logf("PinnedTTL %s, %-21s run %d: first message to the standby %s after; old owner got %d after resuming",
					ttl, how, run+1, gap.Round(10*time.Millisecond), stale)
				_ = js.DeleteConsumer(ctx, "BUILDS", name)
			}
		}
	}
}

type pinClient struct {
	nc    *nats.Conn
	cons  jetstream.Consumer
	got   atomic.Int64
	first atomic.Int64 // unix nanos of the first message after arm
	armed atomic.Bool
	pull  atomic.Bool
	noAck atomic.Bool
	stop  chan struct{}
	done  chan struct{}
}

func newPinClient(t *testing.T, url, name string) *pinClient {
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	cons, err := js.Consumer(context.Background(), "BUILDS", name)
	if err != nil {
		t.Fatal(err)
	}
	c := &pinClient{nc: nc, cons: cons, stop: make(chan struct{}), done: make(chan struct{})}
	c.pull.Store(true)
	go func() { // owner: the failover call, which closes stop and waits on done
		defer close(c.done)
		for {
			select {
			case <-c.stop:
				return
			default:
			}
			if !c.pull.Load() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			b, err := c.cons.Fetch(100, jetstream.FetchMaxWait(time.Second), jetstream.FetchPriorityGroup("engine"))
			if err != nil {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			var last jetstream.Msg
			for m := range b.Messages() {
				if c.armed.Load() {
					c.first.CompareAndSwap(0, time.Now().UnixNano())
				}
				c.got.Add(1)
				last = m
			}
			if last != nil && !c.noAck.Load() {
				_ = last.Ack()
			}
		}
	}()
	return c
}

func (c *pinClient) close() { close(c.stop); <-c.done; c.nc.Close() }

// failover starts two clients, publishes 200 msgs/s, takes the one that
// gets the messages away as told, and returns how long until the other one
// got a message, and how many the first got after it was resumed.
func failover(t *testing.T, js jetstream.JetStream, url, name, how string) (time.Duration, int64) {
	a, b := newPinClient(t, url, name), newPinClient(t, url, name)
	defer a.close()
	defer b.close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // owner: failover (cancel)
		tk := time.NewTicker(5 * time.Millisecond)
		defer tk.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
				_, _ = js.PublishAsync(events.Subject("builds", "p-"+strconv.Itoa(i%50), events.KindQueued), []byte("x"))
			}
		}
	}()
	time.Sleep(1500 * time.Millisecond)
	owner, standby := a, b
	if b.got.Load() > a.got.Load() {
		owner, standby = b, a
	}
	if standby.got.Load() != 0 {
		t.Errorf("both clients got messages before the failover: %d and %d", owner.got.Load(), standby.got.Load())
	}
	standby.armed.Store(true)
	at := time.Now()
	switch how {
	case "close connection":
		owner.nc.Close()
	case "close connection mid-batch":
		owner.noAck.Store(true)
		time.Sleep(300 * time.Millisecond) // it takes messages and acks none
		at = time.Now()
		owner.nc.Close()
	case "stop pulling":
		owner.pull.Store(false)
	case "stop pulling + unpin":
		owner.pull.Store(false)
		s, _ := js.Stream(context.Background(), "BUILDS")
		if err := s.UnpinConsumer(context.Background(), name, "engine"); err != nil {
			t.Fatalf("unpin: %v", err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for standby.first.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if standby.first.Load() == 0 {
		t.Fatalf("%s: the standby got nothing in 30 s", how)
	}
	gap := time.Unix(0, standby.first.Load()).Sub(at)
	var stale int64
	if !strings.HasPrefix(how, "close connection") {
		before := owner.got.Load()
		owner.pull.Store(true) // resumed, with its old pin id
		time.Sleep(2 * time.Second)
		stale = owner.got.Load() - before
	}
	return gap, stale
}

// (d) Membership in a KV bucket whose keys the server expires: how soon a
// watcher hears that a member stopped refreshing its key.
func TestSpikeMembershipExpiry(t *testing.T) {
	_, js, _ := spikeServer(t)
	ctx := context.Background()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: "projector_members", TTL: 3 * time.Second, LimitMarkerTTL: time.Second, Storage: jetstream.FileStorage,
	})
	if err != nil {
		t.Fatalf("create bucket with TTL and limit markers: %v", err)
	}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	for run := range 3 {
		key := fmt.Sprintf("member-%d", run)
		for range 3 { // a live member refreshes every second
			if _, err := kv.Put(ctx, key, []byte("alive")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Second)
		}
		last := time.Now() // the last refresh was a second ago; then the member dies
		last = last.Add(-time.Second)
		deadline := time.After(30 * time.Second)
		for {
			select {
			case e := <-w.Updates():
				if e == nil || e.Key() != key || e.Operation() == jetstream.KeyValuePut {
					continue
				}
				t.Logf("run %d: watcher saw %s of %s %s after its last refresh (bucket TTL 3 s)",
					run+1, e.Operation(), key, time.Since(last).Round(10*time.Millisecond))
			case <-deadline:
				t.Fatalf("run %d: no expiry of %s seen in 30 s", run+1, key)
			}
			break
		}
	}
}

// (e) What building a partition's set of known builds costs on acquire:
// one scan of projector_builds (1,000,000 claims over 100,000 projects),
// keeping the 64-bit hash of the builds whose project falls in the owned
// half of 16 partitions.
func TestSpikeKnownScan(t *testing.T) {
	if os.Getenv("BENCH_SPIKE") == "" {
		t.Skip("BENCH_SPIKE=1 runs the engine spike")
	}
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, testenv.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `
CREATE TABLE projector_builds (build_id text COLLATE "C" PRIMARY KEY, project_id text COLLATE "C" NOT NULL);
INSERT INTO projector_builds SELECT 'p-' || (i % 100000) || '-b' || (i / 100000), 'p-' || (i % 100000)
FROM generate_series(0, 999999) AS i;
ANALYZE projector_builds`); err != nil {
		t.Fatal(err)
	}
	for run := range 3 {
		start, c0 := time.Now(), cpuNow()
		known := map[uint64]struct{}{}
		rows, _ := pool.Query(ctx, `SELECT build_id, project_id FROM projector_builds`)
		var build, project string
		n := 0
		_, err := pgx.ForEachRow(rows, []any{&build, &project}, func() error {
			n++
			if partitionOf(project, 16) < 8 {
				h := fnv.New64a()
				h.Write([]byte(build))
				known[h.Sum64()] = struct{}{}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("run %d: scanned %d claims, kept %d, in %s (%s CPU in this process)", run+1, n, len(known),
			time.Since(start).Round(time.Millisecond), (cpuNow() - c0).Round(time.Millisecond))
	}
}
