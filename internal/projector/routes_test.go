package projector

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/testenv"
)

// /readyz says what is not ready, but never the database's user, host or
// port (nor its password): a real pool pointed at a port where nothing
// listens, and a real NATS connection.
func TestReadyzHidesTheDatabase(t *testing.T) {
	url, _ := testenv.NATS(t)
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	pool, err := pgxpool.New(t.Context(), "postgres://readyzuser:readyzpw@127.0.0.1:1/readyzdb?connect_timeout=1")
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	srv := httptest.NewServer(routes(NewTelemetry(), func() bool { return false }, pool, nc, zap.NewNop(), nil))
	defer srv.Close()

	resp, err := http.Get(srv.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable ||
		!strings.Contains(string(body), "postgres: unreachable") || !strings.Contains(string(body), "consumer: retrying a batch") {
		t.Errorf("GET /readyz = %d %q; want 503 naming postgres and the consumer", resp.StatusCode, body)
	}
	for _, s := range []string{"readyzuser", "readyzpw", "readyzdb", "127.0.0.1", ":1"} {
		if strings.Contains(string(body), s) {
			t.Errorf("GET /readyz = %q; it shows %q", body, s)
		}
	}
}

// The partition's metrics are on /metrics from the start, at zero, before
// any acquire or fence.
func TestPartitionMetricsStartAtZero(t *testing.T) {
	url, _ := testenv.NATS(t)
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	pool, err := pgxpool.New(t.Context(), "postgres://u@127.0.0.1:1/db?connect_timeout=1")
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	srv := httptest.NewServer(routes(NewTelemetry(), func() bool { return true }, pool, nc, zap.NewNop(), nil))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, line := range []string{"buildstate_fenced_total 0", "buildstate_partition_acquired_total 0", "buildstate_partition_owned 0"} {
		if !strings.Contains(string(body), "\n"+line+"\n") {
			t.Errorf("GET /metrics has no line %q", line)
		}
	}
}
