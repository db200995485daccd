// Package testenv gives tests real services: a fresh PostgreSQL database per
// test and an embedded NATS JetStream server per test. It is imported only
// from _test.go files.
//
// A package whose tests call Database must call Main from its TestMain, so
// that a throwaway PostgreSQL cluster started for the tests is stopped:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/devenv"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The PostgreSQL server shared by all the tests of the process, found on
// first use.
var (
	pgOnce   sync.Once
	pgShared *devenv.Postgres
	pgErr    error
)

// dropTimeout bounds the DROP DATABASE run at the end of each test.
const dropTimeout = 30 * time.Second

// Main runs the tests, stops the shared throwaway PostgreSQL cluster if one
// was started, and exits with the tests' code. Call it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	// Marks the Once done, so nothing can start a server from now on, and
	// orders the read of pgShared after its write.
	pgOnce.Do(func() {})
	if err := pgShared.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "testenv: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// postgres returns the shared server, finding it on first use: DATABASE_URL,
// else a local server on 127.0.0.1:5432, else a throwaway cluster. When there
// is none the test fails, saying what to install: it never skips.
func postgres(t testing.TB) *devenv.Postgres {
	t.Helper()
	pgOnce.Do(func() {
		pgShared, pgErr = devenv.FindPostgres(context.Background(), os.Getenv, t.Logf)
	})
	if pgErr != nil {
		t.Fatalf("testenv: %v", pgErr)
	}
	return pgShared
}

// AdminURL returns the URL of the shared PostgreSQL server, as a user that
// may create databases.
func AdminURL(t testing.TB) string {
	t.Helper()
	return postgres(t).URL
}

// Database creates a database of its own for the test on the shared server,
// drops it when the test ends, and returns its URL. Parallel tests get
// different databases.
func Database(t testing.TB) string {
	t.Helper()
	admin := postgres(t).URL
	name := "bs_t_" + randomHex(6)
	url, err := devenv.CreateDatabase(t.Context(), admin, name)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		// t.Context() is already canceled when cleanups run.
		ctx, cancel := context.WithTimeout(context.Background(), dropTimeout)
		defer cancel()
		if err := devenv.DropDatabase(ctx, admin, name); err != nil {
			t.Errorf("testenv: %v", err)
		}
	})
	return url
}

// randomHex returns 2n random hex digits.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails (crypto/rand, Go 1.24+)
	return hex.EncodeToString(b)
}

// NATS starts an embedded NATS server with JetStream, its store in a
// temporary directory of the test, and shuts it down when the test ends.
func NATS(t testing.TB) (url string, srv *server.Server) {
	t.Helper()
	srv, err := devenv.StartNATS(t.TempDir(), -1)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() { shutdown(srv) })
	return srv.ClientURL(), srv
}

// NATSWith is NATS with configure applied to the server's options first:
// a server that requires authentication or TLS.
func NATSWith(t testing.TB, configure func(*server.Options)) (url string, srv *server.Server) {
	t.Helper()
	srv, err := devenv.StartNATSWith(t.TempDir(), -1, configure)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() { shutdown(srv) })
	return srv.ClientURL(), srv
}

// JetStream starts an embedded server as NATS does and returns its URL and
// a JetStream client connected to it, closed when the test ends.
func JetStream(t testing.TB) (url string, js jetstream.JetStream) {
	t.Helper()
	url, _ = NATS(t)
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatalf("testenv: connect: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err = jetstream.New(nc)
	if err != nil {
		t.Fatalf("testenv: jetstream: %v", err)
	}
	return url, js
}

// SyncBuffer is a bytes.Buffer safe for one writer and concurrent readers:
// a command's output read while it runs.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// RestartNATS shuts srv down and starts a new server on the same port with
// the same store, as after an outage: the streams and their acknowledged
// messages are back, and clients reconnect to the same URL. The new server is
// shut down when the test ends.
func RestartNATS(t testing.TB, srv *server.Server) *server.Server {
	t.Helper()
	addr, ok := srv.Addr().(*net.TCPAddr)
	if !ok {
		t.Fatalf("testenv: restart nats: server is not listening")
	}
	// StoreDir() is the directory given to StartNATS plus "jetstream".
	jsDir := srv.StoreDir()
	if filepath.Base(jsDir) != server.JetStreamStoreDir {
		t.Fatalf("testenv: restart nats: store dir %q does not end in %q", jsDir, server.JetStreamStoreDir)
	}
	shutdown(srv)

	next, err := devenv.StartNATS(filepath.Dir(jsDir), addr.Port)
	if err != nil {
		t.Fatalf("testenv: restart nats: %v", err)
	}
	t.Cleanup(func() { shutdown(next) })
	return next
}

func shutdown(srv *server.Server) {
	srv.Shutdown() // does nothing when already shut down
	srv.WaitForShutdown()
}
