// Package httpserve holds the settings every buildstate HTTP server shares
// (the emitter's ingest and the projector's /healthz, /readyz, /metrics), so
// that none of them is left with Go's defaults: no timeouts at all, and 1 MiB
// of headers per request.
package httpserve

import (
	"net/http"
	"time"

	"go.uber.org/zap"
)

// The limits of New's servers.
const (
	// ReadHeaderTimeout bounds the wait for a request's headers: a client
	// that opens connections and sends nothing (slowloris) is cut off.
	ReadHeaderTimeout = 5 * time.Second
	// ReadTimeout bounds reading a whole request, body included.
	ReadTimeout = 30 * time.Second
	// WriteTimeout bounds a request from the end of its headers to the end
	// of its response; handlers that wait for something (a JetStream ack)
	// must give up before it.
	WriteTimeout = 60 * time.Second
	// IdleTimeout closes a kept-alive connection that sends nothing more.
	IdleTimeout = 120 * time.Second
	// MaxHeaderBytes caps the request line and headers.
	MaxHeaderBytes = 16 << 10
)

// New returns a server for h with the limits above, logging its own errors
// (a failed TLS handshake, a panicking handler) to log.
func New(h http.Handler, log *zap.Logger) *http.Server {
	if log == nil {
		log = zap.NewNop()
	}
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		WriteTimeout:      WriteTimeout,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
		ErrorLog:          zap.NewStdLog(log),
	}
}
