package natsjs

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/testenv"
)

// TestLoopBeginsTheNextBatchFirst: with LoopOptions.Begin, on a backlog (a
// whole batch waiting) the loop begins a batch before it finishes the one
// before it, finishes each once and in order, acks every message once it
// finished, and retries a batch whose finish failed with the Handler; once
// the backlog is gone it finishes each batch before taking the next.
func TestLoopBeginsTheNextBatchFirst(t *testing.T) {
	_, js := testenv.JetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := EnsureStream(ctx, js, "LOOP", "builds", 1); err != nil {
		t.Fatal(err)
	}
	const total = 500
	for i := range total {
		if _, err := js.Publish(ctx, fmt.Sprintf("builds.p-%d.queued", i), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	cons, err := EnsureConsumer(ctx, js, "LOOP", "loop", "builds", nil)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var calls []string // "begin N", "finish N", "retry N", in order
	seen := map[uint64]int{}
	batches := 0
	failed := false
	runCtx, stop := context.WithCancel(ctx)
	handler := func(_ context.Context, msgs []jetstream.Msg) error {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, "retry")
		return nil
	}
	begin := func(_ context.Context, msgs []jetstream.Msg) func(context.Context) error {
		mu.Lock()
		batches++
		n := batches
		calls = append(calls, fmt.Sprintf("begin %d", n))
		for _, m := range msgs {
			md, _ := m.Metadata()
			seen[md.Sequence.Stream]++
		}
		mu.Unlock()
		time.Sleep(20 * time.Millisecond) // the handler's work, while the next batch arrives
		return func(context.Context) error {
			mu.Lock()
			defer mu.Unlock()
			calls = append(calls, fmt.Sprintf("finish %d", n))
			if n == 2 && !failed {
				failed = true
				return errors.New("transient")
			}
			return nil
		}
	}
	loop := NewLoop(cons, handler, LoopOptions{BatchSize: 50, Begin: begin, MaxBackoff: 100 * time.Millisecond})
	done := make(chan error, 1)
	go func() { done <- loop.Run(runCtx) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		info, err := cons.Info(ctx)
		if err == nil && info.AckFloor.Stream == total {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ack floor %v after 30 s; want %d", info.AckFloor.Stream, total)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Live: messages one at a time after the backlog, a few arriving
	// during each batch's work.
	mu.Lock()
	live := batches + 1 // the first batch past the backlog
	mu.Unlock()
	const trickle = 20
	for i := range trickle {
		if _, err := js.Publish(ctx, fmt.Sprintf("builds.live-%d.queued", i), []byte("x")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for {
		info, err := cons.Info(ctx)
		if err == nil && info.AckFloor.Stream == total+trickle {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ack floor %v; want %d", info.AckFloor.Stream, total+trickle)
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for seq := uint64(1); seq <= total+trickle; seq++ {
		if seen[seq] != 1 {
			t.Errorf("message %d begun %d times; want once", seq, seen[seq])
		}
	}
	// Every batch is finished after the next one began (the backlog was
	// ready), but the last; finishes come in order; batch 2's failed finish
	// is retried with the handler before batch 3 finishes.
	pos := map[string]int{}
	for i, c := range calls {
		pos[c] = i
	}
	if _, ok := pos["begin 3"]; !ok {
		t.Fatalf("calls %v; want at least 3 batches", calls)
	}
	overlapped := 0
	for n := 1; n < live-1; n++ {
		f, b := pos[fmt.Sprintf("finish %d", n)], pos[fmt.Sprintf("begin %d", n+1)]
		if b < f {
			overlapped++
		}
		if n > 1 && pos[fmt.Sprintf("finish %d", n-1)] > f {
			t.Errorf("batch %d finished before batch %d: %v", n, n-1, calls)
		}
	}
	if overlapped < (live-2)/2 {
		t.Errorf("%d of %d backlog batches began before the one before finished; want most (the backlog was ready): %v", overlapped, live-2, calls)
	}
	// Past the backlog, each batch is finished before the next begins.
	if batches < live+4 {
		t.Fatalf("%d batches, the live ones from %d; want 5 live batches or more: %v", batches, live, calls)
	}
	for n := live; n < batches; n++ {
		if pos[fmt.Sprintf("begin %d", n+1)] < pos[fmt.Sprintf("finish %d", n)] {
			t.Errorf("live batch %d began before batch %d finished: %v", n+1, n, calls)
		}
	}
	if r, ok := pos["retry"]; !ok || r < pos["finish 2"] || r > pos["finish 3"] {
		t.Errorf("calls %v; want batch 2's failed finish retried with the handler before batch 3 finishes", calls)
	}
}

// TestLoopAttachedConsumers: a loop without a consumer of its own applies
// the consumers attached to it in the same batches; a GiveBack naks the
// messages it names (they come again) and acks the others; a detached
// consumer's new messages stay with the server; a stop gives back nothing
// that was handled.
func TestLoopAttachedConsumers(t *testing.T) {
	_, js := testenv.JetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := EnsureStream(ctx, js, "ATTACH", "builds", 1); err != nil {
		t.Fatal(err)
	}
	publish := func(project string, n int) {
		for range n {
			if _, err := js.Publish(ctx, "builds."+project+".queued", []byte("x")); err != nil {
				t.Fatal(err)
			}
		}
	}
	publish("a", 100)
	publish("b", 100)
	conses := map[string]jetstream.Consumer{}
	for _, p := range []string{"a", "b"} {
		c := ConsumerConfig("attach-"+p, "builds")
		c.FilterSubject = "builds." + p + ".*"
		cons, err := EnsureConsumerConfig(ctx, js, "ATTACH", c, nil)
		if err != nil {
			t.Fatal(err)
		}
		conses[p] = cons
	}
	var mu sync.Mutex
	handled := map[string]int{}   // project -> messages handled (acked)
	delivered := map[uint64]int{} // stream seq -> times the handler saw it
	gaveBack := 0
	h := func(_ context.Context, msgs []jetstream.Msg) error {
		mu.Lock()
		defer mu.Unlock()
		var back []int
		for i, m := range msgs {
			md, _ := m.Metadata()
			delivered[md.Sequence.Stream]++
			if m.Subject() == "builds.b.queued" && gaveBack == 0 {
				back = append(back, i)
			}
		}
		for i, m := range msgs {
			if !slices.Contains(back, i) {
				handled[strings.Split(m.Subject(), ".")[1]]++
			}
		}
		if len(back) > 0 {
			gaveBack = len(back)
			return &GiveBack{Back: back, Err: errors.New("not mine yet")}
		}
		return nil
	}
	loop := NewLoop(nil, h, LoopOptions{BatchSize: 50})
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- loop.Run(runCtx) }()
	detach := map[string]func(){}
	for p, cons := range conses {
		d, err := loop.Attach(cons, 20)
		if err != nil {
			t.Fatal(err)
		}
		detach[p] = d
	}
	waitHandled := func(a, b int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			mu.Lock()
			ok := handled["a"] >= a && handled["b"] >= b
			mu.Unlock()
			if ok {
				return
			}
			if time.Now().After(deadline) {
				mu.Lock()
				defer mu.Unlock()
				t.Fatalf("handled %v; want a %d, b %d", handled, a, b)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitHandled(100, 100)
	detach["a"]()
	time.Sleep(200 * time.Millisecond) // what a's pull had in hand reaches the handler
	publish("a", 10)
	publish("b", 10)
	waitHandled(100, 110)
	time.Sleep(300 * time.Millisecond)
	stop()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
	if _, err := loop.Attach(conses["a"], 0); err == nil {
		t.Error("Attach after the loop stopped succeeded")
	}
	mu.Lock()
	defer mu.Unlock()
	if handled["a"] != 100 || handled["b"] != 110 {
		t.Errorf("handled %v; want a 100 (its last 10 published after the detach), b 110", handled)
	}
	if gaveBack == 0 {
		t.Fatal("no batch held b's messages: the test gave nothing back")
	}
	again := 0
	for _, n := range delivered {
		if n > 1 {
			again++
		}
	}
	if again != gaveBack {
		t.Errorf("%d messages seen twice; want the %d given back", again, gaveBack)
	}
	ia, err := conses["a"].Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ib, err := conses["b"].Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ia.NumPending != 10 || ia.NumAckPending != 0 || ia.AckFloor.Consumer != 100 {
		t.Errorf("a after its detach: %d pending, %d unacked, ack floor %d; want 10, 0, 100", ia.NumPending, ia.NumAckPending, ia.AckFloor.Consumer)
	}
	if ib.NumPending != 0 || ib.NumAckPending != 0 {
		t.Errorf("b: %d pending, %d unacked; want 0, 0", ib.NumPending, ib.NumAckPending)
	}
}
