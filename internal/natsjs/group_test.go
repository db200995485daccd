package natsjs_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/testenv"
)

// Every member computes the same owners; each partition has one; shares
// differ by at most one; a member joining or leaving moves few partitions
// besides its own share.
func TestAssignIsRendezvous(t *testing.T) {
	members := []string{"a/1/x", "b/2/y", "c/3/z"}
	owners := func(ms []string) map[int]string {
		out := map[int]string{}
		for _, m := range ms {
			for _, k := range natsjs.Assign(16, ms, m) {
				if o, ok := out[k]; ok {
					t.Fatalf("partition %d given to %s and %s", k, o, m)
				}
				out[k] = m
			}
		}
		if len(out) != 16 {
			t.Fatalf("%d of 16 partitions owned: %v", len(out), out)
		}
		return out
	}
	balanced := func(o map[int]string, n int) {
		t.Helper()
		counts := map[string]int{}
		for _, m := range o {
			counts[m]++
		}
		lo, hi := 16, 0
		for _, c := range counts {
			lo, hi = min(lo, c), max(hi, c)
		}
		if len(counts) != n || hi-lo > 1 {
			t.Errorf("shares %v of 16 among %d members: want them within one of each other", counts, n)
		}
	}
	// moved counts the partitions that changed hands other than to or from m.
	moved := func(a, b map[int]string, m string) int {
		n := 0
		for k := range a {
			if a[k] != b[k] && a[k] != m && b[k] != m {
				n++
			}
		}
		return n
	}
	three := owners(members)
	balanced(three, 3)
	four := owners(append(slices.Clone(members), "d/4/w"))
	balanced(four, 4)
	two := owners(members[:2])
	balanced(two, 2)
	// Plain rendezvous moves none; the bound on loads may move a few.
	if n := moved(three, four, "d/4/w"); n > 4 {
		t.Errorf("%d partitions moved between the others when d joined; want at most 4", n)
	}
	if n := moved(three, two, "c/3/z"); n > 4 {
		t.Errorf("%d partitions moved between the others when c left; want at most 4", n)
	}
	for i := range 40 { // many random ids: balanced for 2 and 3
		ms := []string{fmt.Sprintf("h/%d/a", i), fmt.Sprintf("h/%d/b", i*7+1), fmt.Sprintf("h/%d/c", i*13+2)}
		balanced(owners(ms[:2]), 2)
		balanced(owners(ms), 3)
	}
	if got := natsjs.Assign(4, []string{"solo"}, "solo"); !slices.Equal(got, []int{0, 1, 2, 3}) {
		t.Errorf("one member owns %v; want all", got)
	}
}

// Members joining, leaving and dying (no refresh: the key expires) are seen
// by the others through the bucket.
func TestGroupMembership(t *testing.T) {
	t.Parallel()
	js := jetStream(t)
	ctx := context.Background()
	join := func(name string) *natsjs.Group {
		g, err := natsjs.JoinGroup(ctx, js, "projector", name, nil)
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	wait := func(g *natsjs.Group, want []string, within time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		deadline := time.After(within)
		var last []string
		for {
			select {
			case last = <-g.Members():
				if slices.Equal(last, want) {
					return time.Since(start)
				}
			case <-deadline:
				t.Fatalf("%s sees members %v; want %v within %s", g.Self(), last, want, within)
			}
		}
	}
	a := join("a")
	defer a.Leave(ctx)
	wait(a, []string{"a"}, 5*time.Second)
	b := join("b")
	wait(a, []string{"a", "b"}, 5*time.Second)
	wait(b, []string{"a", "b"}, 5*time.Second)
	b.Leave(ctx)
	wait(a, []string{"a"}, 5*time.Second)

	// A member that stops refreshing (killed) leaves when its key expires.
	c := join("c")
	wait(a, []string{"a", "c"}, 5*time.Second)
	c.Stop()
	took := wait(a, []string{"a"}, 3*natsjs.MemberTTL)
	t.Logf("a saw c's key expire %v after c stopped refreshing (TTL %v)", took.Round(10*time.Millisecond), natsjs.MemberTTL)
}

// The projector's EnsureLayout partitions a stream; the publishers' and the
// demo's EnsureStream keeps its layout; another count is refused.
func TestEnsureStreamKeepsTheLayout(t *testing.T) {
	t.Parallel()
	js := jetStream(t)
	ctx := context.Background()
	if _, err := natsjs.EnsureStream(ctx, js, "BUILDS", "builds", 1); err != nil {
		t.Fatal(err)
	}
	p4 := events.Layout{Partitions: 4}
	if _, sw, err := natsjs.EnsureLayout(ctx, js, "BUILDS", "builds", 1, p4, false, nil); err != nil || sw == nil || sw.Repartition() {
		t.Fatalf("EnsureLayout p1 → p4 = %v, switch %+v; want a switch that is not a repartition", err, sw)
	}
	if _, err := natsjs.EnsureStream(ctx, js, "BUILDS", "builds", 1); err != nil {
		t.Fatal(err)
	}
	if l, former, err := natsjs.StreamLayout(ctx, js, "BUILDS", "builds"); err != nil || l != p4 || len(former) != 0 {
		t.Errorf("layout after EnsureStream = %v (former %v), %v; want p4 kept, none former", l, former, err)
	}
	if _, _, err := natsjs.EnsureLayout(ctx, js, "BUILDS", "builds", 1, events.Layout{Partitions: 8}, false, nil); !errors.Is(err, natsjs.ErrLayout) {
		t.Errorf("EnsureLayout p4 → p8 = %v; want ErrLayout", err)
	}
	if _, sw, err := natsjs.EnsureLayout(ctx, js, "BUILDS", "builds", 1, p4, false, nil); err != nil || sw != nil {
		t.Errorf("EnsureLayout p4 again = %v, switch %+v; want no change", err, sw)
	}
	// A repartition changes the count and keeps the former layout, which
	// EnsureStream keeps too; back to p4, p8 is the former one.
	p8 := events.Layout{Partitions: 8}
	if _, sw, err := natsjs.EnsureLayout(ctx, js, "BUILDS", "builds", 1, p8, true, nil); err != nil || sw == nil || !sw.Repartition() || sw.From != p4 {
		t.Fatalf("EnsureLayout p4 → p8 with repartition = %v, switch %+v; want a repartition from p4", err, sw)
	}
	if _, err := natsjs.EnsureStream(ctx, js, "BUILDS", "builds", 1); err != nil {
		t.Fatal(err)
	}
	if l, former, err := natsjs.StreamLayout(ctx, js, "BUILDS", "builds"); err != nil || l != p8 || fmt.Sprint(former) != fmt.Sprint([]events.Layout{p4}) {
		t.Errorf("after the repartition: layout %v, former %v, %v; want p8, [p4]", l, former, err)
	}
	if got := p8.Subjects("builds", p4); fmt.Sprint(got) != "[builds.> p8.*.builds.> p4.*.builds.>]" {
		t.Errorf("Subjects = %v; want the published form and both stored forms", got)
	}
	if _, _, err := natsjs.EnsureLayout(ctx, js, "BUILDS", "builds", 1, p4, true, nil); err != nil {
		t.Fatal(err)
	}
	if l, former, err := natsjs.StreamLayout(ctx, js, "BUILDS", "builds"); err != nil || l != p4 || fmt.Sprint(former) != fmt.Sprint([]events.Layout{p8}) {
		t.Errorf("back to p4: layout %v, former %v, %v; want p4, [p8]", l, former, err)
	}
}

// jetStream is a JetStream client of an embedded server of the test's own.
func jetStream(t *testing.T) jetstream.JetStream {
	t.Helper()
	url, _ := testenv.NATS(t)
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}
