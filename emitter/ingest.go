package emitter

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/oklog/ulid/v2"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/buildstate/buildstate/internal/events"
)

// Limits of POST /v1/events/batch.
const (
	MaxBatchLines = 1000
	MaxBatchBytes = 4 << 20
)

// Reasons of the ingest's refusals that are not about an event's contents.
const (
	ReasonUnauthenticated      events.Reason = "unauthenticated"
	ReasonUnsupportedMediaType events.Reason = "unsupported_media_type"
	ReasonTooManyLines         events.Reason = "too_many_lines"
	// ReasonUnavailable: JetStream did not acknowledge the event in time; it
	// may or may not be stored. Send it again with the same id.
	ReasonUnavailable events.Reason = "unavailable"
)

// DefaultBatchTimeout bounds the publishing of one batch; lines not
// acknowledged by then are answered with ReasonUnavailable. It stays under
// the server's write timeout (httpserve.WriteTimeout).
const DefaultBatchTimeout = 30 * time.Second

// batchConcurrency is how many lines of a batch are published at once.
const batchConcurrency = 32

// IngestResponse is the body of a 202 from POST /v1/events.
type IngestResponse struct {
	Seq       uint64 `json:"seq"`
	ID        string `json:"id"`
	Duplicate bool   `json:"duplicate,omitempty"` // JetStream already had this id
}

// ErrorResponse is the body of every other answer of POST /v1/events.
type ErrorResponse struct {
	Error  string        `json:"error"`
	Reason events.Reason `json:"reason,omitempty"`
}

// BatchResult is the answer for one line of a batch: Seq and ID when
// JetStream stored it, else Error and Reason (and nothing was published,
// unless Reason is ReasonUnavailable: then it may have been).
type BatchResult struct {
	Seq       uint64        `json:"seq,omitempty"`
	ID        string        `json:"id,omitempty"`
	Duplicate bool          `json:"duplicate,omitempty"`
	Error     string        `json:"error,omitempty"`
	Reason    events.Reason `json:"reason,omitempty"`
}

// BatchResponse is the body of a 200 from POST /v1/events/batch.
type BatchResponse struct {
	Results []BatchResult `json:"results"`
}

// HandlerOptions configure NewHandler.
type HandlerOptions struct {
	// Verifier checks every POST's signature. Without one every POST is
	// refused with 401, unless InsecureNoAuth.
	Verifier *Verifier
	// InsecureNoAuth accepts unsigned requests from anyone who can reach
	// the handler. For local experiments only.
	InsecureNoAuth bool
	// BatchTimeout bounds one batch (default DefaultBatchTimeout).
	BatchTimeout time.Duration
	Logger       *zap.Logger
}

// NewHandler is the HTTP ingest for services that do not speak NATS:
//
//	POST /v1/events        one event as its JSON body (Content-Type
//	                       application/json, at most events.MaxBodySize).
//	                       202 {"seq": N, "id": "..."}: JetStream stored it.
//	                       400 {"error": "...", "reason": "<events.Reason>"}: invalid, not sent.
//	                       401 reason unauthenticated; 413 reason body_too_large;
//	                       415 reason unsupported_media_type.
//	                       503 reason unavailable: JetStream did not ack; retry the same body.
//	POST /v1/events/batch  events as NDJSON (Content-Type application/x-ndjson),
//	                       at most MaxBatchLines lines and MaxBatchBytes.
//	                       200 {"results": [...]}: a BatchResult per line, in order;
//	                       each line is judged alone. 401, 413 (also reason
//	                       too_many_lines), 415 for the whole request.
//	GET /healthz           200 while the process serves.
//	GET /readyz            200 while connected to NATS, else 503.
//
// Every POST must carry a good X-Buildstate-Signature (see Sign); /healthz
// and /readyz need none and tell nothing but ok or not.
//
// A body is read with events.DecodeStrict, the projector's rules read as a
// publisher must keep them: an optional measurement out of range (attempt 0,
// a negative duration_ms), which the projector would drop, is refused here.
// Its subject is built from the event, so it always matches. The event
// published is its canonical encoding (unknown fields dropped, integers such
// as 61000.0 written 61000).
//
// An event without "id" (absent or null) gets a fresh ULID, returned in the
// response: convenient for curl, but a client that retries must send its own
// id for the retry to be deduplicated. An empty "id" is invalid.
func NewHandler(p *Publisher, opts HandlerOptions) http.Handler {
	h := &ingest{p: p, opts: opts, log: opts.Logger}
	if h.log == nil {
		h.log = zap.NewNop()
	}
	if h.opts.BatchTimeout <= 0 {
		h.opts.BatchTimeout = DefaultBatchTimeout
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/events", h.one)
	mux.HandleFunc("POST /v1/events/batch", h.batch)
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

type ingest struct {
	p    *Publisher
	opts HandlerOptions
	log  *zap.Logger
}

// read admits a POST: its signature's header and time, its media type, its
// size, then its signature over the body. It answers a refusal itself and
// returns ok false.
func (h *ingest) read(w http.ResponseWriter, r *http.Request, mediaType string, limit int64) (body []byte, ok bool) {
	var sig signature
	if !h.opts.InsecureNoAuth {
		if h.opts.Verifier == nil {
			writeError(w, http.StatusUnauthorized, ReasonUnauthenticated, "this server has no HMAC secret and accepts no request")
			return nil, false
		}
		var err error
		if sig, err = h.opts.Verifier.parse(r.Header.Get(SignatureHeader)); err != nil {
			writeError(w, http.StatusUnauthorized, ReasonUnauthenticated, err.Error())
			return nil, false
		}
	}
	if err := checkMediaType(r.Header.Get("Content-Type"), mediaType); err != nil {
		writeError(w, http.StatusUnsupportedMediaType, ReasonUnsupportedMediaType, err.Error())
		return nil, false
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			writeError(w, http.StatusRequestEntityTooLarge, events.ReasonBodyTooLarge,
				fmt.Sprintf("body is larger than the limit of %d bytes", limit))
			return nil, false
		}
		writeError(w, http.StatusBadRequest, "", "read body: "+err.Error())
		return nil, false
	}
	if !h.opts.InsecureNoAuth {
		if err := h.opts.Verifier.check(sig, body); err != nil {
			writeError(w, http.StatusUnauthorized, ReasonUnauthenticated, err.Error())
			return nil, false
		}
	}
	return body, true
}

// checkMediaType accepts header if it is want, with at most a UTF-8 charset.
func checkMediaType(header, want string) error {
	mt, params, err := mime.ParseMediaType(header)
	if err != nil || mt != want {
		return fmt.Errorf("Content-Type %q: want %s", header, want)
	}
	for k, v := range params {
		if k != "charset" || !strings.EqualFold(v, "utf-8") {
			return fmt.Errorf("Content-Type %q: want %s, with no parameter but charset=utf-8", header, want)
		}
	}
	return nil
}

func (h *ingest) one(w http.ResponseWriter, r *http.Request) {
	body, ok := h.read(w, r, "application/json", events.MaxBodySize)
	if !ok {
		return
	}
	res := h.publish(r.Context(), body)
	switch res.Reason {
	case "":
		writeJSON(w, http.StatusAccepted, IngestResponse{Seq: res.Seq, ID: res.ID, Duplicate: res.Duplicate})
	case ReasonUnavailable:
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, res.Reason, res.Error)
	default:
		writeError(w, http.StatusBadRequest, res.Reason, res.Error)
	}
}

func (h *ingest) batch(w http.ResponseWriter, r *http.Request) {
	body, ok := h.read(w, r, "application/x-ndjson", MaxBatchBytes)
	if !ok {
		return
	}
	lines := bytes.Split(body, []byte{'\n'})
	if len(lines) > 0 && len(lines[len(lines)-1]) == 0 {
		lines = lines[:len(lines)-1] // the newline ending the last line
	}
	if len(lines) > MaxBatchLines {
		writeError(w, http.StatusRequestEntityTooLarge, ReasonTooManyLines,
			fmt.Sprintf("batch has %d lines; the limit is %d", len(lines), MaxBatchLines))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), h.opts.BatchTimeout)
	defer cancel()
	results := make([]BatchResult, len(lines))
	var g errgroup.Group
	g.SetLimit(batchConcurrency)
	for i, line := range lines {
		g.Go(func() error {
			results[i] = h.publish(ctx, bytes.TrimSuffix(line, []byte{'\r'}))
			return nil
		})
	}
	g.Wait()
	writeJSON(w, http.StatusOK, BatchResponse{Results: results})
}

// publish decodes one event and publishes it: the one rule for a body of
// POST /v1/events and a line of a batch.
func (h *ingest) publish(ctx context.Context, body []byte) BatchResult {
	ev, err := decodeIngest(body)
	if err != nil {
		return BatchResult{Error: events.Plain(err), Reason: events.ReasonOf(err)}
	}
	ack, err := h.p.publish(ctx, ev)
	switch {
	case errors.Is(err, events.ErrInvalid):
		return BatchResult{Error: events.Plain(err), Reason: events.ReasonOf(err)}
	case err != nil:
		h.log.Error("ingest publish", zap.String("id", ev.ID), zap.Error(err))
		return BatchResult{Error: err.Error(), Reason: ReasonUnavailable}
	}
	return BatchResult{Seq: ack.Sequence, ID: ev.ID, Duplicate: ack.Duplicate}
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

func writeError(w http.ResponseWriter, status int, reason events.Reason, msg string) {
	writeJSON(w, status, ErrorResponse{Error: msg, Reason: reason})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
