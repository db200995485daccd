package natsjs

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// The group's timing (docs/engine.md §1): a member puts its key every
// MemberRefresh; the server removes a key MemberTTL after its last put and,
// with limit markers (server 2.11), tells every watcher, so a member that
// died is out of the group about MemberTTL after its last refresh.
const (
	MemberTTL     = 3 * time.Second
	MemberRefresh = time.Second
	memberMarkers = time.Second // how long the bucket keeps an expiry's marker
	memberResync  = 5 * time.Second
)

// Group is this instance's membership of the group of projector instances
// that share a durable's partitions: a NATS KV bucket,
// buildstate_members_<durable>, with one key per live instance. Members
// yields the live instances, in order, whenever they change; Assign says
// which partitions are whose.
type Group struct {
	kv      jetstream.KeyValue
	self    string
	key     string
	log     *zap.Logger
	updates chan []string
	joined  time.Time
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// MembersBucket names the group's bucket of durable.
func MembersBucket(durable string) string { return "buildstate_members_" + keySafe(durable) }

// keySafe replaces what a KV key or bucket may not hold.
func keySafe(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			return r
		}
		return '_'
	}, s)
}

// JoinGroup puts self (an instance id) in durable's group and keeps it there
// until Leave: its key is put again every MemberRefresh. The first Members
// value is the group as this instance found it, itself included.
func JoinGroup(ctx context.Context, js jetstream.JetStream, durable, self string, log *zap.Logger) (*Group, error) {
	if log == nil {
		log = zap.NewNop()
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:         MembersBucket(durable),
		Description:    "buildstate projector instances of durable " + durable,
		TTL:            MemberTTL,
		LimitMarkerTTL: memberMarkers,
		Storage:        jetstream.MemoryStorage, // a member that is gone is gone: nothing to keep over a restart
		History:        1,
	})
	if err != nil {
		return nil, fmt.Errorf("group %s: members bucket: %w", durable, err)
	}
	g := &Group{kv: kv, self: self, key: keySafe(self), log: log, updates: make(chan []string, 1), joined: time.Now()}
	if _, err := kv.Put(ctx, g.key, []byte(self)); err != nil {
		return nil, fmt.Errorf("group %s: join: %w", durable, err)
	}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return nil, fmt.Errorf("group %s: watch: %w", durable, err)
	}
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	g.cancel = cancel
	g.wg.Add(2)
	go func() { defer g.wg.Done(); g.refresh(bg) }()
	go func() { defer g.wg.Done(); defer w.Stop(); g.watch(bg, w) }()
	return g, nil
}

// Members yields the group's live members (instance ids, sorted, this one
// always among them) each time they change; only the latest is kept for a
// slow reader.
func (g *Group) Members() <-chan []string { return g.updates }

// Joined is when this instance joined.
func (g *Group) Joined() time.Time { return g.joined }

// Self is this instance's id.
func (g *Group) Self() string { return g.self }

// Leave takes this instance out of the group at once (the others need not
// wait for its key to expire) and stops its refresh and watch.
func (g *Group) Leave(ctx context.Context) {
	g.Stop()
	if err := g.kv.Delete(ctx, g.key); err != nil {
		g.log.Warn("group: leave", zap.Error(err))
	}
}

// Stop stops the refresh and the watch without deleting this member's key:
// the others see it leave when the key expires, as if it had died.
func (g *Group) Stop() {
	g.cancel()
	g.wg.Wait()
}

func (g *Group) refresh(ctx context.Context) {
	t := time.NewTicker(MemberRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, MemberRefresh)
		_, err := g.kv.Put(pctx, g.key, []byte(g.self))
		cancel()
		if err != nil && ctx.Err() == nil {
			g.log.Warn("group: refresh of this member's key", zap.Error(err))
		}
	}
}

// watch follows the bucket, and lists its keys again every memberResync in
// case the watch missed an update (a reconnect).
func (g *Group) watch(ctx context.Context, w jetstream.KeyWatcher) {
	members := map[string]string{g.key: g.self}
	seen := map[string]time.Time{} // when each key's last put was seen
	var sent []string
	publish := func() {
		members[g.key] = g.self // this instance is live while it runs
		list := slices.Sorted(maps.Values(members))
		if slices.Equal(list, sent) {
			return
		}
		sent = list
		g.log.Info("group members", zap.Strings("members", list))
		select { // keep only the latest
		case <-g.updates:
		default:
		}
		g.updates <- list
	}
	publish()
	resync := time.NewTicker(memberResync)
	defer resync.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil { // the initial values are all in
				publish()
				continue
			}
			if e.Operation() == jetstream.KeyValuePut {
				members[e.Key()] = string(e.Value())
				seen[e.Key()] = time.Now()
			} else {
				delete(members, e.Key())
				delete(seen, e.Key())
			}
			publish()
		case <-resync.C:
			lctx, cancel := context.WithTimeout(ctx, MemberRefresh)
			keys, err := g.kv.Keys(lctx)
			cancel()
			if err != nil && !errors.Is(err, jetstream.ErrNoKeysFound) {
				continue
			}
			live := map[string]bool{}
			for _, k := range keys {
				live[k] = true
			}
			// A key missing from the list is gone only if its puts stopped
			// too: a list taken while a member re-puts its key can miss it
			// (history 1), and dropping a live member moves partitions.
			for k := range members {
				if !live[k] && k != g.key && time.Since(seen[k]) > MemberTTL {
					delete(members, k)
					delete(seen, k)
				}
			}
			publish()
		}
	}
}

// Assign lists, in order, the partitions of n that members give self.
// Rendezvous hashing with bounded loads: every (partition, member) pair has
// a score (a hash); pairs are taken best score first, and a partition goes
// to the member of its best pair that still has room, each member holding at
// most ceil(n / members) and only n mod members of them that many. So every member computes the same owners from the
// same list, the shares differ by at most one (plain rendezvous gave 4 and
// 12 of 16 to two members, measured), and a member joining or leaving moves
// few partitions besides the ones it takes or gives up (the test bounds it).
func Assign(n int, members []string, self string) []int {
	if len(members) == 0 {
		return nil
	}
	type pair struct {
		score uint64
		k     int
		m     string
	}
	pairs := make([]pair, 0, n*len(members))
	for k := range n {
		for _, m := range members {
			pairs = append(pairs, pair{score(k, m), k, m})
		}
	}
	slices.SortFunc(pairs, func(a, b pair) int {
		if a.score != b.score {
			return cmp.Compare(b.score, a.score)
		}
		if a.k != b.k {
			return cmp.Compare(a.k, b.k)
		}
		return strings.Compare(a.m, b.m)
	})
	// Each member holds n/m partitions, and n%m of them (the first to need
	// it) one more.
	lo, extra, full := n/len(members), n%len(members), 0
	held := map[string]int{}
	owned := make([]bool, n)
	var out []int
	for _, p := range pairs {
		if owned[p.k] || held[p.m] > lo || (held[p.m] == lo && full == extra) {
			continue
		}
		if held[p.m] == lo {
			full++
		}
		owned[p.k] = true
		held[p.m]++
		if p.m == self {
			out = append(out, p.k)
		}
	}
	slices.Sort(out)
	return out
}

func score(k int, member string) uint64 {
	h := fnv.New64a()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(k))
	_, _ = h.Write(b[:])
	_, _ = h.Write([]byte(member))
	// FNV's last bytes mix poorly into the high bits; finish with a
	// 64-bit mixer (splitmix64) so that scores of one partition spread.
	x := h.Sum64()
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// Unpin asks the server to move consumer's pin (PriorityGroup) to the next
// client that pulls: what an instance given a partition does once it holds
// the partition's fence, so that it need not wait PinnedTTL for the
// previous owner's pin to lapse.
func Unpin(ctx context.Context, js jetstream.JetStream, stream, consumer string) error {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return err
	}
	return s.UnpinConsumer(ctx, consumer, PriorityGroup)
}

// GroupMembers lists the instances in durable's group now (the values of its
// members bucket), sorted; none if the bucket does not exist (no
// partitioned projector has run).
func GroupMembers(ctx context.Context, js jetstream.JetStream, durable string) ([]string, error) {
	kv, err := js.KeyValue(ctx, MembersBucket(durable))
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("group %s: %w", durable, err)
	}
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("group %s: %w", durable, err)
	}
	var out []string
	for k := range keys.Keys() {
		if e, err := kv.Get(ctx, k); err == nil {
			out = append(out, string(e.Value()))
		}
	}
	slices.Sort(out)
	return out, nil
}
