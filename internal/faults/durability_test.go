package faults

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/internal/workload"
)

// published is what a publisher was told: the event and the sequence acked.
type published struct {
	ev   events.Event
	body []byte
	seq  uint64
}

// publishAll publishes evs through the emitter with 8 publishers at once and
// returns what was acknowledged.
func publishAll(t *testing.T, p *emitter.Publisher, evs []events.Event) []published {
	t.Helper()
	out := make([]published, len(evs))
	errs := make(chan error, len(evs))
	var wg sync.WaitGroup
	next := make(chan int)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				seq, err := p.Publish(context.Background(), evs[i])
				if err != nil {
					errs <- fmt.Errorf("publish %s: %w", evs[i].ID, err)
					continue
				}
				body, _ := evs[i].Marshal()
				out[i] = published{ev: evs[i], body: body, seq: seq}
			}
		}()
	}
	for i := range evs {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return out
}

// assertStored fails unless the stream holds exactly the acked messages,
// each at its acked sequence with its bytes and its Nats-Msg-Id.
func assertStored(t *testing.T, js jetstream.JetStream, acked []published) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != uint64(len(acked)) {
		t.Errorf("stream holds %d messages; want the %d acknowledged", info.State.Msgs, len(acked))
	}
	lost := 0
	for _, a := range acked {
		m, err := s.GetMsg(ctx, a.seq)
		if err != nil || !bytes.Equal(m.Data, a.body) || m.Header.Get(jetstream.MsgIDHeader) != a.ev.ID {
			lost++
			if lost <= 3 {
				t.Errorf("acked seq %d (%s): got %v, %v; want its body and Nats-Msg-Id", a.seq, a.ev.ID, m, err)
			}
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d acknowledged messages lost or changed", lost, len(acked))
	}
}

// assertRepublishDropped publishes every event again (the emitter's retry
// after a lost ack): each must come back with its first sequence, and the
// stream must not grow.
func assertRepublishDropped(t *testing.T, p *emitter.Publisher, js jetstream.JetStream, acked []published) {
	t.Helper()
	evs := make([]events.Event, len(acked))
	for i, a := range acked {
		evs[i] = a.ev
	}
	again := publishAll(t, p, evs)
	moved := 0
	for i, a := range again {
		if a.seq != acked[i].seq {
			moved++
		}
	}
	if moved > 0 {
		t.Errorf("%d of %d republished events got a new sequence; want the stored copy's", moved, len(acked))
	}
	assertStored(t, js, acked)
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// natsProc is nats-server running as a process of its own, so that it can
// be killed.
type natsProc struct {
	cmd  *exec.Cmd
	done chan struct{}
	url  string
	mon  string
}

func startNATSProc(t *testing.T, bin, conf string, port, monPort int) *natsProc {
	t.Helper()
	cmd := exec.Command(bin, "-c", conf)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &natsProc{cmd: cmd, done: make(chan struct{}), url: fmt.Sprintf("nats://127.0.0.1:%d", port),
		mon: fmt.Sprintf("http://127.0.0.1:%d", monPort)}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-p.done })
	deadline := time.Now().Add(30 * time.Second)
	for {
		if code, _, err := httpGet(p.mon + "/healthz?js-enabled-only=true"); err == nil && code == http.StatusOK {
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("nats-server exited at start:\n%s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server not healthy in 30s:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *natsProc) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
}

func connectJS(t *testing.T, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
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

// TestAckedPublishesSurviveServerKill runs nats-server as a process with the
// documented setting (jetstream { sync_interval: always }), publishes 2,000
// events through the emitter, and SIGKILLs the server the moment the last
// ack arrives. After a restart on the same store every acknowledged message
// is there, byte for byte at its acked sequence, and publishing all of them
// again with the same ids (what the emitter does after a lost ack) stores
// nothing new: the duplicate window survived the crash.
func TestAckedPublishesSurviveServerKill(t *testing.T) {
	t.Parallel()
	bin := buildBinary(t, "github.com/nats-io/nats-server/v2", "nats-server")
	dir := t.TempDir()
	port, monPort := freePort(t), freePort(t)
	conf := filepath.Join(dir, "nats.conf")
	cfg := fmt.Sprintf("listen: \"127.0.0.1:%d\"\nhttp: \"127.0.0.1:%d\"\njetstream {\n  store_dir: %q\n  sync_interval: always\n}\n",
		port, monPort, filepath.Join(dir, "store"))
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := startNATSProc(t, bin, conf, port, monPort)
	var varz struct {
		JetStream struct {
			Config struct {
				SyncAlways bool `json:"sync_always"`
			} `json:"config"`
		} `json:"jetstream"`
	}
	if _, body, err := httpGet(srv.mon + "/varz"); err != nil || json.Unmarshal([]byte(body), &varz) != nil || !varz.JetStream.Config.SyncAlways {
		t.Fatalf("/varz: sync_always = %v (%v); want true", varz.JetStream.Config.SyncAlways, err)
	}
	js := connectJS(t, srv.url)
	s, err := natsjs.EnsureStream(context.Background(), js, stream, prefix, 1)
	if err != nil {
		t.Fatal(err)
	}
	if c := s.CachedInfo().Config; c.Storage != jetstream.FileStorage || c.Duplicates != natsjs.DuplicateWindow {
		t.Fatalf("stream storage %v, duplicate window %v; want file, %v", c.Storage, c.Duplicates, natsjs.DuplicateWindow)
	}
	pub := emitter.New(js, emitter.Options{Prefix: prefix})
	evs := distinctEvents(workload.Generate(909, workload.Config{Projects: 200}), 2000)
	start := time.Now()
	acked := publishAll(t, pub, evs)
	t.Logf("%d publishes acked in %v", len(acked), time.Since(start).Round(time.Millisecond))
	srv.kill(t)

	srv = startNATSProc(t, bin, conf, port, monPort)
	js = connectJS(t, srv.url)
	assertStored(t, js, acked)
	assertRepublishDropped(t, emitter.New(js, emitter.Options{Prefix: prefix}), js, acked)
}

// TestEmbeddedServerDurability checks the embedded server the demo and the
// tests use (devenv.StartNATS): SyncAlways is on, the projector's stream is
// file storage with a duplicate window, and acknowledged publishes are all
// there after a restart on the same store, where publishing them again with
// the same ids stores nothing new.
func TestEmbeddedServerDurability(t *testing.T) {
	t.Parallel()
	url, srv := testenv.NATS(t)
	if !srv.JetStreamConfig().SyncAlways {
		t.Errorf("devenv.StartNATS: SyncAlways = false; want true")
	}
	js := connectJS(t, url)
	s, err := natsjs.EnsureStream(context.Background(), js, stream, prefix, 1)
	if err != nil {
		t.Fatal(err)
	}
	if c := s.CachedInfo().Config; c.Storage != jetstream.FileStorage || c.Duplicates != natsjs.DuplicateWindow || !c.DenyDelete {
		t.Errorf("stream storage %v, duplicates %v, deny delete %v; want file, %v, true", c.Storage, c.Duplicates, c.DenyDelete, natsjs.DuplicateWindow)
	}
	pub := emitter.New(js, emitter.Options{Prefix: prefix})
	acked := publishAll(t, pub, distinctEvents(workload.Generate(910, workload.Config{Projects: 30}), 500))
	testenv.RestartNATS(t, srv)
	// A fresh connection, as a publisher restarted with the server would have.
	js = connectJS(t, url)
	assertStored(t, js, acked)
	assertRepublishDropped(t, emitter.New(js, emitter.Options{Prefix: prefix}), js, acked)
}

// distinctEvents returns the first n events with distinct ids.
func distinctEvents(evs []events.Event, n int) []events.Event {
	seen := map[string]bool{}
	var out []events.Event
	for _, ev := range evs {
		if !seen[ev.ID] && len(out) < n {
			seen[ev.ID] = true
			out = append(out, ev)
		}
	}
	return out
}
