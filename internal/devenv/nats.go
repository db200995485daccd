// Package devenv provides real backing services with nothing configured: an
// embedded NATS JetStream server and a PostgreSQL server (the one named by
// DATABASE_URL, a local one on 127.0.0.1:5432, or a throwaway cluster started
// from the PostgreSQL binaries). The demo command and the tests use it.
package devenv

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// natsReadyTimeout bounds the wait for the embedded server to accept clients.
const natsReadyTimeout = 10 * time.Second

// StartNATS starts an embedded nats-server on 127.0.0.1 with JetStream
// enabled, keeping its file store under storeDir (in storeDir/jetstream).
// port -1 picks a random free port; use srv.ClientURL() to connect. The caller
// owns the server: srv.Shutdown() then srv.WaitForShutdown().
//
// Starting again with the same storeDir recovers the streams and their
// messages.
func StartNATS(storeDir string, port int) (*server.Server, error) {
	return StartNATSWith(storeDir, port, nil)
}

// StartNATSWith is StartNATS with configure, if not nil, applied to the
// server's options first (authentication, TLS).
func StartNATSWith(storeDir string, port int, configure func(*server.Options)) (*server.Server, error) {
	if storeDir == "" {
		// nats-server would silently fall back to a directory shared by every
		// process on the machine (os.TempDir()/jetstream).
		return nil, errors.New("start nats: store dir is empty")
	}
	opts := &server.Options{
		Host:      "127.0.0.1",
		Port:      port,
		JetStream: true,
		StoreDir:  storeDir,
		// SyncAlways makes the file store fsync every write before the
		// publish is acknowledged. By default nats-server fsyncs only every
		// two minutes, so an acknowledged message may exist only in the OS
		// page cache and be lost if the machine crashes or loses power. With
		// SyncAlways an acknowledged publish survives a crash.
		SyncAlways: true,
		NoLog:      true, // the server logs nothing, except the errors captured below
		NoSigs:     true, // the embedding process owns the signals
	}
	if configure != nil {
		configure(opts)
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("start nats: %w", err)
	}
	// Without a logger the server drops the reason it failed to start (a
	// port in use, an unusable store dir); keep those messages for the error.
	errs := &errorLog{}
	srv.SetLogger(errs, false, false)

	// Start returns once JetStream is enabled and the client listener is
	// set up, or as soon as either fails.
	srv.Start()
	if !srv.JetStreamEnabled() || srv.Addr() == nil || !srv.ReadyForConnections(natsReadyTimeout) {
		srv.Shutdown()
		srv.WaitForShutdown()
		reason := errs.String()
		if reason == "" {
			reason = fmt.Sprintf("not ready for connections within %s", natsReadyTimeout)
		}
		return nil, fmt.Errorf("start nats on 127.0.0.1:%d with store %s: %s", port, storeDir, reason)
	}
	srv.SetLogger(nil, false, false) // started: back to NoLog, keep nothing
	return srv, nil
}

// errorLog is a server.Logger that keeps the fatal and error messages and
// drops everything else. Unlike the server's own logger, its Fatalf does not
// exit the process.
type errorLog struct {
	mu   sync.Mutex
	msgs []string
}

func (l *errorLog) add(format string, v ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.msgs = append(l.msgs, fmt.Sprintf(format, v...))
}

func (l *errorLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.msgs, "; ")
}

func (l *errorLog) Fatalf(format string, v ...any) { l.add(format, v...) }
func (l *errorLog) Errorf(format string, v ...any) { l.add(format, v...) }
func (l *errorLog) Noticef(string, ...any)         {}
func (l *errorLog) Warnf(string, ...any)           {}
func (l *errorLog) Debugf(string, ...any)          {}
func (l *errorLog) Tracef(string, ...any)          {}
