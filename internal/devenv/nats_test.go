package devenv

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func TestStartNATSPublishAndRead(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	dir := t.TempDir()
	srv, err := StartNATS(dir, -1)
	if err != nil {
		t.Fatalf("StartNATS(%q, -1) = %v", dir, err)
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})

	cfg := srv.JetStreamConfig()
	if cfg == nil {
		t.Fatal("JetStreamConfig() = nil; want JetStream enabled")
	}
	if !cfg.SyncAlways {
		t.Errorf("JetStreamConfig().SyncAlways = false; want true")
	}
	if want := filepath.Join(dir, "jetstream"); cfg.StoreDir != want {
		t.Errorf("JetStreamConfig().StoreDir = %q; want %q", cfg.StoreDir, want)
	}
	if url := srv.ClientURL(); !strings.HasPrefix(url, "nats://127.0.0.1:") {
		t.Errorf("ClientURL() = %q; want nats://127.0.0.1:<port>", url)
	}

	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream: %v", err)
	}
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:     "DEVENV",
		Subjects: []string{"devenv.>"},
		Storage:  jetstream.FileStorage,
	})
	if err != nil {
		t.Fatalf("create stream: %v", err)
	}
	var want []string
	for i := range 3 {
		data := fmt.Sprintf("event %d", i)
		if _, err := js.Publish(ctx, "devenv.test", []byte(data)); err != nil {
			t.Fatalf("publish %q: %v", data, err)
		}
		want = append(want, data)
	}

	cons, err := stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatalf("ordered consumer: %v", err)
	}
	batch, err := cons.Fetch(len(want), jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	var got []string
	for msg := range batch.Messages() {
		got = append(got, string(msg.Data()))
	}
	if err := batch.Error(); err != nil {
		t.Fatalf("fetch: %v", err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read back %q; want %q", got, want)
	}
}

func TestStartNATSErrors(t *testing.T) {
	t.Parallel()
	// A port someone else is listening on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	busy := l.Addr().(*net.TCPAddr).Port

	tests := []struct {
		name     string
		storeDir string
		port     int
	}{
		{"empty store dir", "", -1},
		{"port in use", t.TempDir(), busy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, err := StartNATS(tt.storeDir, tt.port)
			if err == nil {
				srv.Shutdown()
				srv.WaitForShutdown()
				t.Fatalf("StartNATS(%q, %d) = nil error; want an error", tt.storeDir, tt.port)
			}
			t.Logf("StartNATS(%q, %d) = %v", tt.storeDir, tt.port, err)
		})
	}
}
