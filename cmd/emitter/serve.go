package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"go.uber.org/zap"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/httpserve"
)

// shutdownTimeout bounds the wait for in-flight requests on SIGTERM.
const shutdownTimeout = 10 * time.Second

// runServe serves the HTTP ingest (emitter.NewHandler) until ctx ends, then
// finishes the requests in flight and exits.
func runServe(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("serve", stderr)
	nf := addNATSFlags(fs, getenv)
	addr := fs.String("http-addr", envOr(getenv, "EMITTER_HTTP_ADDR", ":8080"), "HTTP listen address (env EMITTER_HTTP_ADDR)")
	secretsFile := fs.String("hmac-secrets-file", getenv("EMITTER_HMAC_SECRETS_FILE"),
		"file of HMAC secrets, one per line, any of which verifies a request (env EMITTER_HMAC_SECRETS_FILE); "+
			"or give them comma-separated in env EMITTER_HMAC_SECRETS")
	insecure := fs.Bool("insecure-no-auth", false, "accept unsigned requests from anyone who can reach --http-addr (local experiments only)")
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

	opts := emitter.HandlerOptions{Logger: log, InsecureNoAuth: *insecure}
	secrets := emitter.ParseSecrets(getenv("EMITTER_HMAC_SECRETS"), ",")
	if *secretsFile != "" {
		b, err := os.ReadFile(*secretsFile)
		if err != nil {
			return fmt.Errorf("--hmac-secrets-file: %w", err)
		}
		secrets = append(secrets, emitter.ParseSecrets(string(b), "\n")...)
	}
	switch {
	case *insecure:
		log.Error("INSECURE: --insecure-no-auth: every request is accepted unsigned, from anyone who can reach the listen address; " +
			"never run this where another machine can reach it")
	case len(secrets) == 0:
		return errors.New("serve: no HMAC secret: set EMITTER_HMAC_SECRETS (comma-separated) or --hmac-secrets-file " +
			"(one per line; make one with openssl rand -hex 32), or pass --insecure-no-auth for a local experiment")
	default:
		if opts.Verifier, err = emitter.NewVerifier(secrets); err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		log.Info("requests must be signed", zap.Int("secrets", len(secrets)))
	}

	nc, js, err := nf.connect("buildstate emitter serve", log)
	if err != nil {
		return err
	}
	defer nc.Close()
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
	srv := httpserve.New(emitter.NewHandler(pub, opts), log)
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
