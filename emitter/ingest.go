package emitter

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/oklog/ulid/v2"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
)

// IngestResponse is the body of a 202 from POST /v1/events.
type IngestResponse struct {
	Seq       uint64 `json:"seq"`
	ID        string `json:"id"`
	Duplicate bool   `json:"duplicate,omitempty"` // JetStream already had this id
}

// ErrorResponse is the body of every other answer of POST /v1/events.
type ErrorResponse struct {
	Error  string        `json:"error"`
	Reason events.Reason `json:"reason,omitempty"` // set when the event is invalid
}

// NewHandler is the HTTP ingest for services that do not speak NATS:
//
//	POST /v1/events  one event as its JSON body (at most events.MaxBodySize).
//	                 202 {"seq": N, "id": "..."}: JetStream stored it.
//	                 400 {"error": "...", "reason": "<events.Reason>"}: invalid, not sent.
//	                 413 {"error": "...", "reason": "body_too_large"}.
//	                 503 {"error": "..."}: JetStream did not ack; retry the same body.
//	GET /healthz     200 while the process serves.
//	GET /readyz      200 while connected to NATS, else 503.
//
// The body is read with events.DecodeStrict, the projector's rules read as a
// publisher must keep them: an optional measurement out of range (attempt 0,
// a negative duration_ms), which the projector would drop, is refused here.
// Its subject is built from the event, so it always matches. The event
// published is its canonical encoding (unknown fields dropped, integers such
// as 61000.0 written 61000).
//
// A body without "id" (absent or null) gets a fresh ULID, returned in the
// response: convenient for curl, but a client that retries a POST must send
// its own id for the retry to be deduplicated. An empty "id" is invalid.
func NewHandler(p *Publisher, log *zap.Logger) http.Handler {
	if log == nil {
		log = zap.NewNop()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/events", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, events.MaxBodySize))
		if err != nil {
			var tooLarge *http.MaxBytesError
			if errors.As(err, &tooLarge) {
				writeJSON(w, http.StatusRequestEntityTooLarge, ErrorResponse{
					Error:  fmt.Sprintf("body is larger than the limit of %d bytes", events.MaxBodySize),
					Reason: events.ReasonBodyTooLarge,
				})
				return
			}
			writeJSON(w, http.StatusBadRequest, ErrorResponse{Error: "read body: " + err.Error()})
			return
		}
		ev, err := decodeIngest(body)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, ErrorResponse{Error: events.Plain(err), Reason: events.ReasonOf(err)})
			return
		}
		ack, err := p.publish(r.Context(), ev)
		switch {
		case errors.Is(err, events.ErrInvalid):
			writeJSON(w, http.StatusBadRequest, ErrorResponse{Error: events.Plain(err), Reason: events.ReasonOf(err)})
		case err != nil:
			log.Error("ingest publish", zap.String("id", ev.ID), zap.Error(err))
			w.Header().Set("Retry-After", "1")
			writeJSON(w, http.StatusServiceUnavailable, ErrorResponse{Error: err.Error()})
		default:
			writeJSON(w, http.StatusAccepted, IngestResponse{Seq: ack.Sequence, ID: ev.ID, Duplicate: ack.Duplicate})
		}
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if nc := p.js.Conn(); nc == nil || !nc.IsConnected() {
			http.Error(w, "not connected to NATS", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	return mux
}

// decodeIngest decodes an ingested body, giving it a fresh id if it has none.
func decodeIngest(body []byte) (events.Event, error) {
	ev, err := events.DecodeStrict("", "", body, time.Time{})
	if events.ReasonOf(err) != events.ReasonInvalidID {
		return ev, err
	}
	// Decode checked UTF-8 and JSON before the id, so body is a JSON object.
	var fields map[string]json.RawMessage
	if json.Unmarshal(body, &fields) != nil {
		return ev, err
	}
	if id, ok := fields["id"]; ok && !bytes.Equal(bytes.TrimSpace(id), []byte("null")) {
		return ev, err
	}
	fields["id"], _ = json.Marshal(ulid.Make().String())
	withID, merr := json.Marshal(fields)
	if merr != nil {
		return ev, err
	}
	return events.DecodeStrict("", "", withID, time.Time{})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
