package natsjs_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/testenv"
)

// Every member computes the same owners; each partition has one; a member
// joining takes only partitions that move to it, and leaving gives back only
// its own.
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
	three := owners(members)
	counts := map[string]int{}
	for _, m := range three {
		counts[m]++
	}
	for _, m := range members {
		if counts[m] < 2 {
			t.Errorf("%s owns %d of 16 partitions with 3 members: %v", m, counts[m], counts)
		}
	}
	four := owners(append(slices.Clone(members), "d/4/w"))
	for k, o := range four {
		if o != three[k] && o != "d/4/w" {
			t.Errorf("partition %d moved from %s to %s when d joined", k, three[k], o)
		}
	}
	two := owners(members[:2])
	for k, o := range three {
		if o != "c/3/z" && two[k] != o {
			t.Errorf("partition %d moved from %s to %s when c left", k, o, two[k])
		}
	}
	if got := natsjs.Assign(4, []string{"solo"}, "solo"); !slices.Equal(got, []int{0, 1, 2, 3}) {
		t.Errorf("one member owns %v; want all", got)
	}
}

// Members joining, leaving and dying (no refresh: the key expires) are seen
// by the others through the bucket.
func TestGroupMembership(t *testing.T) {
	t.Parallel()
	url, _ := testenv.NATS(t)
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
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
