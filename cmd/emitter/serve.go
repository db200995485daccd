package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/events"
)

// shutdownTimeout bounds the wait for in-flight requests on SIGTERM.
const shutdownTimeout = 10 * time.Second

// runServe serves the HTTP ingest (emitter.NewHandler) until ctx ends, then
// finishes the requests in flight and exits.
func runServe(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("serve", stderr)
	nf := addNATSFlags(fs, getenv)
	addr := fs.String("http-addr", envOr(getenv, "EMITTER_HTTP_ADDR", ":8080"), "HTTP listen address (env EMITTER_HTTP_ADDR)")
	timeout := fs.Duration("timeout", emitter.DefaultTimeout, "wait for each JetStream ack attempt")
	logFormat := fs.String("log-format", "json", "log format: json or console")
	if err := parse(fs, args); err != nil {
		return err
	}
	log, err := newLogger(*logFormat, stderr)
	if err != nil {
		return err
	}
	defer log.Sync()

	nc, err := nf.connect("buildstate emitter serve",
		nats.MaxReconnects(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil { // nil: our own Close
				log.Warn("nats disconnected", zap.Error(err))
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("nats reconnected", zap.String("url", nc.ConnectedUrlRedacted())) }),
	)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	// The projector creates the stream; until it does, publishes answer 503.
	subject := events.Subject(nf.prefix, "x", events.KindQueued)
	if name, err := js.StreamNameBySubject(ctx, subject); err != nil {
		log.Warn("no JetStream stream takes the event subjects yet; POST /v1/events answers 503 until the projector creates it",
			zap.String("subject", nf.prefix+".>"), zap.Error(err))
	} else {
		log.Info("publishing to stream", zap.String("stream", name), zap.String("subject", nf.prefix+".>"))
	}

	pub := emitter.New(js, emitter.Options{Prefix: nf.prefix, Timeout: *timeout, Logger: log})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *addr, err)
	}
	srv := &http.Server{
		Handler:           emitter.NewHandler(pub, log),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		ErrorLog:          zap.NewStdLog(log),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	log.Info("listening", zap.String("addr", ln.Addr().String()))

	select {
	case err := <-errc:
		return fmt.Errorf("serve http: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("shut down http: %w", err)
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve http: %w", err)
	}
	return nil
}
