package faults

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/internal/workload"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const (
	stream  = "BUILDS"
	prefix  = "builds"
	durable = "projector"
)

// rig is one test's services: an embedded JetStream server with the BUILDS
// stream, and a database of its own.
type rig struct {
	natsURL string
	srv     *server.Server
	dbURL   string
	nc      *nats.Conn
	js      jetstream.JetStream
}

func newRig(t *testing.T) *rig {
	t.Helper()
	natsURL, srv := fastNATS(t)
	nc, err := nats.Connect(natsURL, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := natsjs.EnsureStream(context.Background(), js, stream, prefix, 1); err != nil {
		t.Fatal(err)
	}
	return &rig{natsURL: natsURL, srv: srv, dbURL: testenv.Database(t), nc: nc, js: js}
}

// fastNATS starts an embedded JetStream server like testenv.NATS, but
// without SyncAlways: that setting fsyncs every publish (about 1 ms each on
// the CI disk, 30 s for a 30,000-message backlog), and only the durability
// test is about fsync. testenv.RestartNATS restarts it (with SyncAlways).
func fastNATS(t *testing.T) (string, *server.Server) {
	t.Helper()
	srv, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("embedded nats-server not ready in 10s")
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	return srv.ClientURL(), srv
}

// backlog is a seeded workload of shuffled events with duplicates: about
// 4.3 events per build, 5 builds per project, plus 20% exact copies.
func backlog(seed int64, projects int) []events.Event {
	return workload.Generate(seed, workload.Config{Projects: projects, BuildsPerProject: 5, DupRate: 0.2, Shuffle: true})
}

// distinctIDs is the sorted set of the events' ids.
func distinctIDs(evs []events.Event) []string {
	seen := map[string]bool{}
	var ids []string
	for _, ev := range evs {
		if !seen[ev.ID] {
			seen[ev.ID] = true
			ids = append(ids, ev.ID)
		}
	}
	slices.Sort(ids)
	return ids
}

// publishEvents publishes evs in order and returns them as the stored log
// messages. The first copy of an id carries Nats-Msg-Id; later copies do not,
// as a republish after the duplicate window would arrive, so that the
// projector sees every duplicate.
func (r *rig) publishEvents(t *testing.T, evs []events.Event) []projection.Message {
	t.Helper()
	return r.publishRaw(t, rawEvents(t, evs))
}

// rawEvents are evs as publishEvents sends them.
func rawEvents(t *testing.T, evs []events.Event) []rawMsg {
	t.Helper()
	raw := make([]rawMsg, len(evs))
	seen := map[string]bool{}
	for i, ev := range evs {
		body, err := ev.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		raw[i] = rawMsg{subject: events.Subject(prefix, ev.ProjectID, ev.Kind()), data: body}
		if !seen[ev.ID] {
			seen[ev.ID] = true
			raw[i].msgID = ev.ID
		}
	}
	return raw
}

type rawMsg struct {
	subject string
	data    []byte
	msgID   string // "" sends no Nats-Msg-Id
}

// publishRaw publishes messages asynchronously, waits for every ack, and
// returns them with their stream sequences.
func (r *rig) publishRaw(t *testing.T, msgs []rawMsg) []projection.Message {
	t.Helper()
	futures := make([]jetstream.PubAckFuture, len(msgs))
	for i, m := range msgs {
		if i > 0 && i%1000 == 0 { // stay under the async window
			select {
			case <-r.js.PublishAsyncComplete():
			case <-time.After(time.Minute):
				t.Fatalf("publish: no acks for a minute")
			}
		}
		var opts []jetstream.PublishOpt
		if m.msgID != "" {
			opts = append(opts, jetstream.WithMsgID(m.msgID))
		}
		f, err := r.js.PublishAsync(m.subject, m.data, opts...)
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		futures[i] = f
	}
	out := make([]projection.Message, len(msgs))
	timeout := time.After(2 * time.Minute)
	for i, f := range futures {
		select {
		case ack := <-f.Ok():
			if ack.Duplicate {
				t.Fatalf("publish %d (%s) was dropped as a duplicate", i, msgs[i].msgID)
			}
			out[i] = projection.Message{Seq: ack.Sequence, Subject: msgs[i].subject, Data: msgs[i].data, StoredAt: time.Now()}
		case err := <-f.Err():
			t.Fatalf("publish %d: %v", i, err)
		case <-timeout:
			t.Fatalf("publish %d: no ack in 2m", i)
		}
	}
	return out
}

// migrate applies the schema to the database at url.
func migrate(t *testing.T, url string) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := projection.Migrate(ctx, conn, "public"); err != nil {
		t.Fatal(err)
	}
}

func openPool(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// reference applies msgs in one Apply to a fresh database: the read model an
// uninterrupted run gives. It returns that database's URL.
func reference(t *testing.T, msgs []projection.Message) string {
	t.Helper()
	url := testenv.Database(t)
	migrate(t, url)
	pool := openPool(t, url)
	store := projection.New(pool, projection.Options{Prefix: prefix, Gate: true})
	if _, err := store.Apply(context.Background(), nil, msgs); err != nil {
		t.Fatalf("reference Apply: %v", err)
	}
	return url
}

// model is a read model as comparable text: every projects row but
// updated_at, every project_build_metrics row, the applied ids.
type model struct {
	projects, metrics, applied []string
	deadLetters                int
}

func readModel(t *testing.T, url string) model {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var m model
	for _, q := range []struct {
		sql string
		dst *[]string
	}{
		{`SELECT (to_jsonb(p) - 'updated_at')::text FROM projects p ORDER BY project_id`, &m.projects},
		{`SELECT to_jsonb(b)::text FROM project_build_metrics b ORDER BY build_id`, &m.metrics},
		{`SELECT event_id FROM projector_applied ORDER BY event_id`, &m.applied},
	} {
		rows, err := conn.Query(ctx, q.sql)
		if err != nil {
			t.Fatal(err)
		}
		*q.dst, err = pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM projector_dead_letters`).Scan(&m.deadLetters); err != nil {
		t.Fatal(err)
	}
	return m
}

// assertSameModel fails unless the database at url holds the rows of the
// reference database, and exactly the applied ids want.
func assertSameModel(t *testing.T, url, refURL string, want []string) {
	t.Helper()
	got, ref := readModel(t, url), readModel(t, refURL)
	diffRows(t, "projects", got.projects, ref.projects)
	diffRows(t, "project_build_metrics", got.metrics, ref.metrics)
	diffRows(t, "projector_applied", got.applied, want)
	t.Logf("read model: %d projects, %d metrics rows, %d applied ids, %d dead letters (reference: %d, %d, %d, %d)",
		len(got.projects), len(got.metrics), len(got.applied), got.deadLetters,
		len(ref.projects), len(ref.metrics), len(ref.applied), ref.deadLetters)
	if len(ref.projects) == 0 || len(ref.metrics) == 0 {
		t.Errorf("reference has %d projects and %d metrics rows; want some", len(ref.projects), len(ref.metrics))
	}
}

// diffRows reports rows of got missing from want and the other way round.
func diffRows(t *testing.T, table string, got, want []string) {
	t.Helper()
	if slices.Equal(got, want) {
		return
	}
	g, w := map[string]bool{}, map[string]bool{}
	for _, r := range got {
		g[r] = true
	}
	for _, r := range want {
		w[r] = true
	}
	var extra, missing []string
	for _, r := range got {
		if !w[r] {
			extra = append(extra, r)
		}
	}
	for _, r := range want {
		if !g[r] {
			missing = append(missing, r)
		}
	}
	t.Errorf("%s: %d rows, want %d; %d unexpected, %d missing; first unexpected %q; first missing %q",
		table, len(got), len(want), len(extra), len(missing), first(extra, 3), first(missing, 3))
}

func first(xs []string, n int) []string { return xs[:min(n, len(xs))] }

// consumerInfo returns the durable consumer's state.
func (r *rig) consumerInfo(t *testing.T) *jetstream.ConsumerInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := r.js.Consumer(ctx, stream, durable)
	if err != nil {
		t.Fatalf("consumer %s: %v", durable, err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatalf("consumer %s info: %v", durable, err)
	}
	return info
}

// waitDrained polls the durable consumer until every message of the stream
// is delivered and acked.
func (r *rig) waitDrained(t *testing.T, timeout time.Duration, alive func() error) {
	t.Helper()
	r.waitDrainedAll(t, []string{durable}, timeout, alive)
}

// countApplied counts projector_applied rows (0 before the schema exists).
func countApplied(t *testing.T, url string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM projector_applied`).Scan(&n); err != nil {
		return 0
	}
	return n
}

// inProcess is a projector.Run in a goroutine of the test.
type inProcess struct {
	addr   string
	logs   *testenv.SyncBuffer
	cancel context.CancelFunc
	done   chan error
	err    error
	exited bool
}

// startInProcess runs projector.Run on r with JSON logs to a buffer and HTTP
// on a random port, and returns once it consumes.
func startInProcess(t *testing.T, r *rig, batch int, change ...func(*projector.Config)) *inProcess {
	t.Helper()
	p := &inProcess{logs: &testenv.SyncBuffer{}, done: make(chan error, 1)}
	enc := zap.NewProductionEncoderConfig()
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(p.logs), zap.DebugLevel))
	ready := make(chan string, 1)
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	cfg := projector.Config{
		DatabaseURL: r.dbURL, NATS: natsjs.Client{URL: r.natsURL}, Stream: stream, Prefix: prefix, Durable: durable,
		HTTPAddr: "127.0.0.1:0", BatchSize: batch, Logger: log,
		Ready: func(addr string) { ready <- addr },
	}
	for _, c := range change {
		c(&cfg)
	}
	go func() { p.done <- projector.Run(ctx, cfg) }()
	select {
	case p.addr = <-ready:
	case err := <-p.done:
		t.Fatalf("projector.Run = %v before consuming\n%s", err, p.logs.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("projector not consuming after 30s\n%s", p.logs.String())
	}
	t.Cleanup(func() { p.stop(t) })
	return p
}

// allAlive returns an error once any of ps has returned from Run.
func allAlive(ps []*inProcess) func() error {
	return func() error {
		for _, p := range ps {
			if err := p.alive(); err != nil {
				return err
			}
		}
		return nil
	}
}

// alive returns an error once Run has returned.
func (p *inProcess) alive() error {
	if p.exited {
		return fmt.Errorf("run returned %v", p.err)
	}
	select {
	case p.err = <-p.done:
		p.exited = true
		return fmt.Errorf("run returned %v", p.err)
	default:
		return nil
	}
}

// stop cancels Run and returns its error and how long it took.
func (p *inProcess) stop(t *testing.T) (error, time.Duration) {
	t.Helper()
	start := time.Now()
	p.cancel()
	if !p.exited {
		select {
		case p.err = <-p.done:
			p.exited = true
		case <-time.After(30 * time.Second):
			t.Fatalf("projector.Run did not return 30s after its context ended\n%s", p.logs.String())
		}
	}
	return p.err, time.Since(start)
}

// httpGet returns the status and body of GET url.
func httpGet(url string) (int, string, error) {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// metric sums the samples of a Prometheus text exposition whose name is
// name and whose labels include every label of want (`k="v"`).
func metric(exposition, name string, want ...string) float64 {
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(exposition))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		series, value, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		n, labels, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		match := true
		for _, l := range want {
			if !strings.Contains(labels, l) {
				match = false
			}
		}
		if !match {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

// retrySeries returns the buildstate_write_retries_total lines.
func retrySeries(exposition string) []string {
	var out []string
	for _, line := range strings.Split(exposition, "\n") {
		if strings.HasPrefix(line, "buildstate_write_retries_total") {
			out = append(out, line)
		}
	}
	return out
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	code, body, err := httpGet("http://" + addr + "/metrics")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET /metrics = %d, %v", code, err)
	}
	return body
}

// assertNoRetries fails if the exposition counted any write retry.
func assertNoRetries(t *testing.T, exposition string) {
	t.Helper()
	if n := metric(exposition, "buildstate_write_retries_total"); n != 0 {
		t.Errorf("buildstate_write_retries_total = %v; want 0 in a normal run: %q", n, retrySeries(exposition))
	}
}

// --- the projector binary ---

var binaries struct {
	mu   sync.Mutex
	refs int
	dir  string
	done map[string]string // package → built path
}

// projectorBinary builds cmd/projector for the tests that use it.
func projectorBinary(t *testing.T) string {
	t.Helper()
	return buildBinary(t, "github.com/buildstate/buildstate/cmd/projector", "projector")
}

// buildBinary builds a main package once for the tests that use it at the
// same time, and removes it when the last of them ends.
func buildBinary(t *testing.T, pkg, name string) string {
	t.Helper()
	binaries.mu.Lock()
	defer binaries.mu.Unlock()
	if binaries.refs == 0 {
		dir, err := os.MkdirTemp("", "buildstate-faults-")
		if err != nil {
			t.Fatal(err)
		}
		binaries.dir, binaries.done = dir, map[string]string{}
	}
	binaries.refs++
	t.Cleanup(func() {
		binaries.mu.Lock()
		defer binaries.mu.Unlock()
		binaries.refs--
		if binaries.refs == 0 {
			os.RemoveAll(binaries.dir)
		}
	})
	if path, ok := binaries.done[pkg]; ok {
		return path
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	path := filepath.Join(binaries.dir, name)
	if out, err := exec.Command(goBin, "build", "-o", path, pkg).CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	binaries.done[pkg] = path
	return path
}

// proc is one run of the projector binary.
type proc struct {
	cmd    *exec.Cmd
	stderr *testenv.SyncBuffer
	done   chan struct{}
	err    error // Wait's error, once done is closed
}

// startBinary runs `projector run` against r, JSON logs to a buffer.
func startBinary(t *testing.T, bin string, r *rig, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"run"}, args...)...)
	cmd.Env = append(os.Environ(),
		"DATABASE_URL="+r.dbURL, "NATS_URL="+r.natsURL, "PROJECTOR_HTTP_ADDR=127.0.0.1:0",
		"BUILDS_STREAM="+stream, "BUILDS_SUBJECT_PREFIX="+prefix, "PROJECTOR_DURABLE="+durable)
	p := &proc{cmd: cmd, stderr: &testenv.SyncBuffer{}, done: make(chan struct{})}
	cmd.Stdout = io.Discard
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // no-op once it exited
		<-p.done
	})
	return p
}

// signal sends sig and waits (up to limit) for the process to exit.
func (p *proc) signal(t *testing.T, sig syscall.Signal, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(limit):
		t.Fatalf("projector did not exit %s after %v\n%s", limit, sig, p.stderr.String())
	}
	return time.Since(start)
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// httpAddr waits for the JSON start line and returns its "http" field.
func (p *proc) httpAddr(t *testing.T) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		for _, line := range strings.Split(p.stderr.String(), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "projector consuming" {
				return fmt.Sprint(m["http"])
			}
		}
		if p.exited() || time.Now().After(deadline) {
			t.Fatalf("no start line from the projector (exited: %v, %v)\n%s", p.exited(), p.err, p.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// logLines returns the JSON log lines whose msg is msg.
func logLines(logs, msg string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(logs, "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}
