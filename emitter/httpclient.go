package emitter

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v5"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
)

// DefaultHTTPTimeout bounds each attempt of an HTTPClient request. It is
// longer than the server's own retries of a JetStream publish (4 attempts of
// DefaultTimeout), so a slow ack is waited for rather than sent again.
const DefaultHTTPTimeout = 30 * time.Second

// HTTPOptions configure an HTTPClient. Zero values take the defaults.
type HTTPOptions struct {
	// Client sends the requests (default: a new http.Client; each attempt
	// is bounded by Timeout, not by the client).
	Client *http.Client
	// Timeout bounds each attempt (default DefaultHTTPTimeout).
	Timeout time.Duration
	// Retries is how many more attempts follow one that timed out, could
	// not connect or was answered 429, 502, 503 or 504 (default 3;
	// negative means none).
	Retries int
	// Logger receives a warning for each retry (default: no logging).
	Logger *zap.Logger
}

// HTTPClient publishes events through the HTTP ingest (emitter serve), for
// services that cannot reach NATS. It signs every request with the shared
// secret, sends each event with its id so that a retry (after a timeout, or
// an answer that JetStream did not ack) is deduplicated, and sends many
// events as NDJSON batches. It is safe for concurrent use.
type HTTPClient struct {
	base    string
	secret  []byte
	hc      *http.Client
	timeout time.Duration
	retries int
	log     *zap.Logger
}

// NewHTTPClient returns a client of the ingest at baseURL (e.g.
// "https://ingest.example.com"), signing with secret.
func NewHTTPClient(baseURL, secret string, opts HTTPOptions) *HTTPClient {
	c := &HTTPClient{base: strings.TrimRight(baseURL, "/"), secret: []byte(secret), hc: opts.Client,
		timeout: opts.Timeout, retries: opts.Retries, log: opts.Logger}
	if c.hc == nil {
		c.hc = &http.Client{}
	}
	if c.timeout <= 0 {
		c.timeout = DefaultHTTPTimeout
	}
	switch {
	case c.retries == 0:
		c.retries = DefaultRetries
	case c.retries < 0:
		c.retries = 0
	}
	if c.log == nil {
		c.log = zap.NewNop()
	}
	return c
}

// HTTPError is an answer of the ingest other than success.
type HTTPError struct {
	StatusCode int
	Reason     events.Reason // "" when the body said none
	Message    string
}

func (e *HTTPError) Error() string {
	if e.Reason != "" {
		return fmt.Sprintf("ingest answered %d %s: %s", e.StatusCode, e.Reason, e.Message)
	}
	return fmt.Sprintf("ingest answered %d: %s", e.StatusCode, e.Message)
}

// Unwrap puts ErrUnauthenticated (401) or events.ErrInvalid (400 with a
// reason) in the chain.
func (e *HTTPError) Unwrap() error {
	switch {
	case e.StatusCode == http.StatusUnauthorized:
		return ErrUnauthenticated
	case e.StatusCode == http.StatusBadRequest && e.Reason != "":
		return events.ErrInvalid
	}
	return nil
}

// Queued publishes NewQueued(projectID, buildID, at) and returns its
// stream sequence.
func (c *HTTPClient) Queued(ctx context.Context, projectID, buildID string, at time.Time) (uint64, error) {
	return c.Publish(ctx, NewQueued(projectID, buildID, at))
}

// Started publishes NewStarted.
func (c *HTTPClient) Started(ctx context.Context, projectID, buildID string, at time.Time, framework string) (uint64, error) {
	return c.Publish(ctx, NewStarted(projectID, buildID, at, framework))
}

// MetricsRecorded publishes NewMetricsRecorded.
func (c *HTTPClient) MetricsRecorded(ctx context.Context, projectID, buildID string, at time.Time, m Metrics) (uint64, error) {
	return c.Publish(ctx, NewMetricsRecorded(projectID, buildID, at, m))
}

// Completed publishes NewCompleted.
func (c *HTTPClient) Completed(ctx context.Context, projectID, buildID string, at time.Time, co Completion) (uint64, error) {
	return c.Publish(ctx, NewCompleted(projectID, buildID, at, co))
}

// Publish validates ev (an invalid event is not sent), POSTs it to
// /v1/events and returns its stream sequence once JetStream has stored it.
// As with Publisher.Publish, an error means the event may or may not be
// stored: send it again with the same id.
func (c *HTTPClient) Publish(ctx context.Context, ev Event) (uint64, error) {
	body, err := encode(ev)
	if err != nil {
		return 0, err
	}
	var res IngestResponse
	if err := c.post(ctx, "/v1/events", "application/json", ev.ID, body, &res); err != nil {
		return 0, fmt.Errorf("publish %s: %w", ev.ID, err)
	}
	return res.Seq, nil
}

// PublishBatch publishes evs through /v1/events/batch, in requests of at
// most MaxBatchLines lines and MaxBatchBytes, and returns one result per
// event, in order. An invalid event is not sent (its result says why); a line
// JetStream did not acknowledge (ReasonUnavailable) is sent again with the
// same id, up to Retries times. The error is for a request that failed as a
// whole; the results then hold what was done before it.
func (c *HTTPClient) PublishBatch(ctx context.Context, evs []Event) ([]BatchResult, error) {
	results := make([]BatchResult, len(evs))
	lines := make([][]byte, len(evs))
	var pending []int
	for i, ev := range evs {
		body, err := encode(ev)
		if err != nil {
			results[i] = BatchResult{Error: err.Error(), Reason: events.ReasonOf(err)}
			continue
		}
		lines[i], pending = body, append(pending, i)
	}
	b := retryBackOff()
	for round := 0; len(pending) > 0 && round <= c.retries; round++ {
		if round > 0 {
			wait := b.NextBackOff()
			c.log.Warn("batch retry of unacknowledged lines", zap.Int("lines", len(pending)), zap.Duration("wait", wait))
			select {
			case <-ctx.Done():
				return results, ctx.Err()
			case <-time.After(wait):
			}
		}
		var again []int
		for _, chunk := range chunks(pending, lines) {
			var body bytes.Buffer
			for _, i := range chunk {
				body.Write(lines[i])
				body.WriteByte('\n')
			}
			var res BatchResponse
			if err := c.post(ctx, "/v1/events/batch", "application/x-ndjson", "", body.Bytes(), &res); err != nil {
				return results, fmt.Errorf("publish batch: %w", err)
			}
			if len(res.Results) != len(chunk) {
				return results, fmt.Errorf("publish batch: %d results for %d lines", len(res.Results), len(chunk))
			}
			for j, i := range chunk {
				results[i] = res.Results[j]
				if res.Results[j].Reason == ReasonUnavailable {
					again = append(again, i)
				}
			}
		}
		pending = again
	}
	return results, nil
}

// chunks splits the indexes of pending lines into requests within the
// batch limits.
func chunks(pending []int, lines [][]byte) [][]int {
	var out [][]int
	var cur []int
	size := 0
	for _, i := range pending {
		n := len(lines[i]) + 1
		if len(cur) == MaxBatchLines || len(cur) > 0 && size+n > MaxBatchBytes {
			out, cur, size = append(out, cur), nil, 0
		}
		cur, size = append(cur, i), size+n
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}

// post sends body, signed afresh on each attempt, and decodes the success
// answer into out. It retries what may succeed if repeated: the body is the
// same, so the events' ids are too.
func (c *HTTPClient) post(ctx context.Context, path, contentType, id string, body []byte, out any) error {
	attempt := 0
	_, err := backoff.Retry(ctx, func() (struct{}, error) {
		attempt++
		actx, cancel := context.WithTimeout(ctx, c.timeout)
		defer cancel()
		req, err := http.NewRequestWithContext(actx, http.MethodPost, c.base+path, bytes.NewReader(body))
		if err != nil {
			return struct{}{}, backoff.Permanent(err)
		}
		req.Header.Set("Content-Type", contentType)
		req.Header.Set(SignatureHeader, Sign(c.secret, time.Now(), body))
		resp, err := c.hc.Do(req)
		if err != nil {
			if ctx.Err() != nil {
				return struct{}{}, backoff.Permanent(err)
			}
			return struct{}{}, err // timed out, refused, reset: send again
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(io.LimitReader(resp.Body, 2*MaxBatchBytes))
		if err != nil {
			return struct{}{}, fmt.Errorf("read answer: %w", err)
		}
		if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusAccepted {
			if err := json.Unmarshal(data, out); err != nil {
				return struct{}{}, backoff.Permanent(fmt.Errorf("answer %d is not JSON: %w", resp.StatusCode, err))
			}
			return struct{}{}, nil
		}
		var e ErrorResponse
		_ = json.Unmarshal(data, &e)
		herr := &HTTPError{StatusCode: resp.StatusCode, Reason: e.Reason, Message: e.Error}
		if herr.Message == "" {
			herr.Message = strings.TrimSpace(string(data))
		}
		switch resp.StatusCode {
		case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return struct{}{}, herr
		}
		return struct{}{}, backoff.Permanent(herr)
	},
		backoff.WithBackOff(retryBackOff()),
		backoff.WithMaxTries(uint(c.retries)+1),
		backoff.WithMaxElapsedTime(0),
		backoff.WithNotify(func(err error, wait time.Duration) {
			c.log.Warn("ingest retry", zap.String("path", path), zap.String("id", id),
				zap.Int("attempt", attempt), zap.Duration("wait", wait), zap.Error(err))
		}),
	)
	if err != nil && attempt > 1 {
		return fmt.Errorf("%d attempts: %w", attempt, err)
	}
	return err
}
