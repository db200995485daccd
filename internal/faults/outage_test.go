package faults

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/buildstate/buildstate/internal/testenv"
)

// readyProbe polls /readyz and keeps what it saw, with the time.
type readyProbe struct {
	mu   sync.Mutex
	seen []probeResult
	once sync.Once
	stop chan struct{}
	done chan struct{}
}

type probeResult struct {
	at   time.Time
	code int // 0: no answer
	body string
}

func probeReady(addr string, every time.Duration) *readyProbe {
	p := &readyProbe{stop: make(chan struct{}), done: make(chan struct{})}
	go func() { // owner: the test, through close
		defer close(p.done)
		for {
			code, body, _ := httpGet("http://" + addr + "/readyz")
			p.mu.Lock()
			p.seen = append(p.seen, probeResult{time.Now(), code, strings.TrimSpace(body)})
			p.mu.Unlock()
			select {
			case <-p.stop:
				return
			case <-time.After(every):
			}
		}
	}()
	return p
}

func (p *readyProbe) close() { p.once.Do(func() { close(p.stop) }); <-p.done }

// between returns the probes taken in [from, to].
func (p *readyProbe) between(from, to time.Time) []probeResult {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []probeResult
	for _, r := range p.seen {
		if !r.at.Before(from) && !r.at.After(to) {
			out = append(out, r)
		}
	}
	return out
}

func codes(rs []probeResult) map[int]int {
	m := map[int]int{}
	for _, r := range rs {
		m[r.code]++
	}
	return m
}

// waitApplied waits until at least n event ids are applied.
func waitApplied(t *testing.T, dbURL string, n int, alive func() error) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for countApplied(t, dbURL) < n {
		if err := alive(); err != nil {
			t.Fatalf("projector stopped: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %d ids applied after a minute", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPostgresOutage cuts the projector off its database for about ten
// seconds in the middle of a backlog: the database refuses new connections
// (ALLOW_CONNECTIONS false) and its sessions are terminated, again and again
// during the window. /readyz must say 503 during the outage and 200 after,
// the projector must resume by itself, nothing may be dead-lettered, and the
// rows must equal the reference run's.
func TestPostgresOutage(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	evs := backlog(202, 1000)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	p := startInProcess(t, r, 500)
	probe := probeReady(p.addr, 100*time.Millisecond)
	defer probe.close()
	waitApplied(t, r.dbURL, len(want)/10, p.alive)

	u, err := url.Parse(r.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	dbName := strings.TrimPrefix(u.Path, "/")
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, testenv.AdminURL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	exec := func(sql string, args ...any) {
		t.Helper()
		if _, err := admin.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	ident := pgx.Identifier{dbName}.Sanitize()
	allow := func(on bool) {
		t.Helper()
		v := "false"
		if on {
			v = "true"
		}
		exec("ALTER DATABASE " + ident + " ALLOW_CONNECTIONS " + v)
	}
	const terminate = `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`

	before := countApplied(t, r.dbURL)
	outageStart := time.Now()
	allow(false)
	defer allow(true) // so the database can be dropped even if the test fails
	killed := 0
	for time.Since(outageStart) < 10*time.Second {
		var n int
		if err := admin.QueryRow(ctx, terminate, dbName).Scan(&n); err != nil {
			t.Fatal(err)
		}
		killed += n
		time.Sleep(2 * time.Second)
	}
	outageEnd := time.Now()
	allow(true)
	t.Logf("outage of %v after %d of %d ids applied; %d sessions terminated", outageEnd.Sub(outageStart).Round(time.Millisecond), before, len(want), killed)

	r.waitDrained(t, 3*time.Minute, p.alive)
	recovered := time.Now()
	exposition := scrape(t, p.addr)
	time.Sleep(300 * time.Millisecond) // one more probe after the drain
	probe.close()

	// Give the first seconds of the outage to in-flight work noticing it.
	during := probe.between(outageStart.Add(2*time.Second), outageEnd)
	after := probe.between(recovered, time.Now())
	t.Logf("/readyz during the outage: %v; after: %v", codes(during), codes(after))
	if codes(during)[http.StatusServiceUnavailable] == 0 {
		t.Errorf("/readyz never answered 503 during the outage: %v", codes(during))
	}
	for _, pr := range during {
		if pr.code == http.StatusOK {
			t.Errorf("/readyz answered 200 at %v, inside the outage", pr.at.Sub(outageStart).Round(time.Millisecond))
		}
	}
	if len(after) == 0 || after[len(after)-1].code != http.StatusOK {
		t.Errorf("/readyz after recovery: %v; want 200", after)
	}
	for _, pr := range during {
		if pr.code == http.StatusServiceUnavailable {
			t.Logf("503 body during the outage: %q", pr.body)
			break
		}
	}
	if retried := logLines(p.logs.String(), "batch failed; retrying"); len(retried) == 0 {
		t.Errorf("no batch was retried during the outage; want the consumer loop's backoff")
	} else {
		var waits []string
		for _, l := range retried {
			in, _ := l["in"].(float64) // seconds
			waits = append(waits, fmt.Sprintf("%.2fs", in))
			// The loop's backoff: MaxBackoff 5s, and cenkalti/backoff's
			// ±50% jitter applies on top of the cap.
			if in > 5.0 {
				t.Errorf("batch retry waited %.2fs; want at most the 5s cap", in)
			}
		}
		t.Logf("%d batch retries, waits %v", len(retried), waits)
	}
	assertNoRetries(t, exposition)
	if err := p.alive(); err != nil {
		t.Errorf("projector stopped: %v", err)
	}
	assertSameModel(t, r.dbURL, ref, want)
	if m := readModel(t, r.dbURL); m.deadLetters != 0 {
		t.Errorf("%d dead letters after a Postgres outage; want 0", m.deadLetters)
	}
}

// TestNATSRestart restarts the JetStream server in the middle of a backlog
// (same port, same store). The projector reconnects and resumes by itself;
// the rows equal the reference run's and nothing is dead-lettered.
func TestNATSRestart(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	evs := backlog(303, 1000)
	msgs := r.publishEvents(t, evs)
	want := distinctIDs(evs)
	ref := reference(t, msgs)

	p := startInProcess(t, r, 500)
	probe := probeReady(p.addr, 50*time.Millisecond)
	waitApplied(t, r.dbURL, len(want)/10, p.alive)
	before := countApplied(t, r.dbURL)
	restartAt := time.Now()
	r.srv = testenv.RestartNATS(t, r.srv)
	restarted := time.Now()
	t.Logf("NATS restarted in %v after %d of %d ids applied", restarted.Sub(restartAt).Round(time.Millisecond), before, len(want))

	r.waitDrained(t, 3*time.Minute, p.alive)
	t.Logf("drained %v after the restart", time.Since(restarted).Round(time.Millisecond))
	exposition := scrape(t, p.addr)
	probe.close()
	t.Logf("/readyz from the restart to the drain: %v", codes(probe.between(restartAt, time.Now())))
	if n := len(logLines(p.logs.String(), "nats reconnected")); n == 0 {
		t.Errorf("the projector never logged a NATS reconnect")
	}
	assertNoRetries(t, exposition)
	if err := p.alive(); err != nil {
		t.Errorf("projector stopped: %v", err)
	}
	if err, took := p.stop(t); err != nil {
		t.Errorf("Run after stop = %v (%v); want nil", err, took)
	}
	assertSameModel(t, r.dbURL, ref, want)
	if m := readModel(t, r.dbURL); m.deadLetters != 0 {
		t.Errorf("%d dead letters after a NATS restart; want 0", m.deadLetters)
	}
}
