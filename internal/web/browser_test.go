package web_test

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/internal/when"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// live is a projector running against its own database and JetStream.
type live struct {
	base  string // http://127.0.0.1:port
	store *projection.Store
	js    jetstream.JetStream
	pub   *emitter.Publisher
}

func startProjector(t *testing.T) live {
	t.Helper()
	dbURL := testenv.Database(t)
	natsURL, js := testenv.JetStream(t)
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- projector.Run(ctx, projector.Config{DatabaseURL: dbURL, NATS: natsjs.Client{URL: natsURL}, HTTPAddr: "127.0.0.1:0",
			Ready: func(addr string) { ready <- addr }})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("projector.Run = %v", err)
		}
	})
	var addr string
	select {
	case addr = <-ready:
	case err := <-done:
		t.Fatalf("projector.Run = %v before it was ready", err)
	}
	pool, err := projector.OpenPool(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return live{base: "http://" + addr, store: projection.New(pool, projection.Options{}), js: js,
		pub: emitter.New(js, emitter.Options{})}
}

// seedDemo publishes a few projects' builds like the demo's, each in a
// different state, through JetStream, and waits until they are projected.
func seedDemo(t *testing.T, l live, now time.Time) {
	t.Helper()
	ctx := context.Background()
	ms := func(d time.Duration) *int64 { n := d.Milliseconds(); return &n }
	type step func() (uint64, error)
	build := func(p, b string, queued time.Time, framework string, metrics bool, outcome events.Outcome, took time.Duration, errText string) []step {
		s := []step{func() (uint64, error) { return l.pub.Queued(ctx, p, b, queued) }}
		started := queued.Add(20 * time.Second)
		s = append(s, func() (uint64, error) { return l.pub.Started(ctx, p, b, started, framework) })
		if metrics {
			s = append(s, func() (uint64, error) {
				return l.pub.MetricsRecorded(ctx, p, b, started.Add(5*time.Second),
					emitter.Metrics{Framework: framework, NodeVersion: "22.11", PackageManager: "pnpm", Attempt: 1})
			})
		}
		if outcome != "" {
			s = append(s, func() (uint64, error) {
				return l.pub.Completed(ctx, p, b, started.Add(took), emitter.Completion{Outcome: outcome, DurationMS: ms(took), Error: errText})
			})
		}
		return s
	}
	var steps []step
	steps = append(steps, build("p-web", "b-web-7", now.Add(-42*time.Minute), "nextjs", true, events.OutcomeSucceeded, 61*time.Second, "")...)
	steps = append(steps, build("p-api", "b-api-3", now.Add(-25*time.Minute), "go", true, events.OutcomeFailed, 48*time.Second, "exit status 1: go test ./...")...)
	steps = append(steps, build("p-docs", "b-docs-1", now.Add(-3*time.Hour), "astro", true, events.OutcomeSucceeded, 90*time.Second, "")...)
	steps = append(steps, build("p-docs", "b-docs-2", now.Add(-2*time.Minute), "astro", false, "", 0, "")...)
	steps = append(steps, func() (uint64, error) { return l.pub.Queued(ctx, "p-shop", "b-shop-1", now.Add(-30*time.Second)) })
	steps = append(steps, build("p-blog", "b-blog-4", now.Add(-6*time.Hour), "hugo", true, events.OutcomeCanceled, 5*time.Second, "")...)
	steps = append(steps, build("p-edge", "b-edge-9", now.Add(-4*time.Hour), "remix", true, "", 0, "")...)
	for _, s := range steps {
		if _, err := s(); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the demo's 6 projects", func() bool {
		page, err := l.store.ProjectPage(ctx, projection.ProjectPageQuery{Limit: 100})
		return err == nil && page.Total == 6 && rowOf(page, "p-docs").BuildStatus == "building"
	})
}

func rowOf(page projection.ProjectPage, id string) projection.ProjectRow {
	for _, r := range page.Rows {
		if r.ProjectID == id {
			return r
		}
	}
	return projection.ProjectRow{}
}

// waitFor polls cond until it holds; a minute without is a failure.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// saveScreenshot keeps a PNG in the test's temp dir and, when
// BUILDSTATE_SCREENSHOT_DIR is set, there too (that is how
// docs/status-page.png is made).
func saveScreenshot(t *testing.T, dir, name string, png []byte) {
	t.Helper()
	for _, d := range []string{dir, os.Getenv("BUILDSTATE_SCREENSHOT_DIR")} {
		if d == "" {
			continue
		}
		path := filepath.Join(d, name)
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s", path)
	}
}

// TestStatusPageInBrowser loads the status page in headless Chromium,
// checks its rows against the read model, publishes an event and sees the
// row change without a reload, opens a project's page and its badge.
func TestStatusPageInBrowser(t *testing.T) {
	t.Parallel()
	l := startProjector(t)
	now := time.Now()
	seedDemo(t, l, now)
	// One malformed message: a dead letter for the counter above the table.
	if _, err := l.js.Publish(context.Background(), "builds.p-web.completed", []byte(`{"spec_version":1,"type":"build.completed"`)); err != nil {
		t.Fatal(err)
	}
	ctx := testenv.Browser(t)
	shots := t.TempDir()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()

	if err := chromedp.Do(ctx, chromedp.EmulateViewport(1180, 560), chromedp.Navigate(l.base+"/"),
		chromedp.WaitVisible(`table.projects tbody tr`)); err != nil {
		t.Fatal(err)
	}

	// The rows are the read model's, in its order, with its words.
	type shown struct{ Project, Status, Tone, Current, Started string }
	rows, err := chromedp.Run(ctx, chromedp.Evaluate[[]shown](`Array.from(document.querySelectorAll("table.projects tbody tr")).map(r => ({
		Project: r.dataset.project, Status: r.querySelector(".status").textContent,
		Tone: r.querySelector(".status").className, Current: r.cells[2].textContent.trim(),
		Started: r.cells[3].querySelector("time") ? r.cells[3].querySelector("time").textContent : ""}))`))
	if err != nil {
		t.Fatal(err)
	}
	page, err := l.store.ProjectPage(context.Background(), projection.ProjectPageQuery{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != len(page.Rows) {
		t.Fatalf("page shows %d rows; the read model has %d", len(rows), len(page.Rows))
	}
	tones := map[string]string{"deployed": "ok", "failed": "bad", "building": "busy", "queued": "busy", "canceled": "off"}
	for i, want := range page.Rows {
		got := rows[i]
		cur := "–"
		if want.CurrentBuildID != nil {
			cur = *want.CurrentBuildID
		}
		started := ""
		if want.LastBuildStarted != nil {
			started = when.Format(*want.LastBuildStarted, time.Local)
		}
		if got.Project != want.ProjectID || got.Status != want.BuildStatus || got.Current != cur || got.Started != started {
			t.Errorf("row %d = %+v; want project %s, status %s, current %s, started %q", i, got, want.ProjectID, want.BuildStatus, cur, started)
		}
		if got.Tone != "status "+tones[want.BuildStatus] {
			t.Errorf("row %s: class %q; want status %s", want.ProjectID, got.Tone, tones[want.BuildStatus])
		}
	}
	// Above the table: one stuck build (p-edge started 4 h ago) and,
	// once the projector has kept it, the dead letter.
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](`document.getElementById("stuck").textContent === "1" && document.getElementById("dead").textContent === "1"`,
		chromedp.WithPollingTimeout(30*time.Second))); err != nil {
		t.Fatalf("stuck builds 1 and dead letters 1 not shown: %v", err)
	}

	// A new event changes the row in place: the marker set on the page
	// survives, so the page was not reloaded.
	if _, err := chromedp.Run(ctx, chromedp.Evaluate[chromedp.Void](`window.__notReloaded = 42`)); err != nil {
		t.Fatal(err)
	}
	if _, err := l.pub.Started(context.Background(), "p-shop", "b-shop-1", now.Add(-10*time.Second), "vite"); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](`document.querySelector('tr[data-project="p-shop"] .status').textContent === "building"`,
		chromedp.WithPollingTimeout(30*time.Second))); err != nil {
		t.Fatalf("p-shop's row did not change to building: %v", err)
	}
	if row, err := l.store.Project(context.Background(), "p-shop"); err != nil || row.BuildStatus != "building" {
		t.Fatalf("read model p-shop = %+v, %v; want building", row, err)
	}
	kept, err := chromedp.Run(ctx, chromedp.Evaluate[int](`window.__notReloaded || 0`))
	if err != nil || kept != 42 {
		t.Fatalf("window marker = %d, %v; want 42 (the page reloaded)", kept, err)
	}
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	saveScreenshot(t, shots, "status-page.png", png)

	// A project's page: its builds (every metrics column), lifecycle, the
	// note on why the current build is not the newest, and its badge.
	if err := chromedp.Do(ctx, chromedp.Navigate(l.base+"/projects/p-docs"), chromedp.WaitVisible(`section.project h1`)); err != nil {
		t.Fatal(err)
	}
	builds, err := l.store.RecentBuilds(context.Background(), "p-docs", 20)
	if err != nil {
		t.Fatal(err)
	}
	timeline, err := l.store.Timeline(context.Background(), "p-docs", 100)
	if err != nil {
		t.Fatal(err)
	}
	type projectShown struct {
		Status, Current, Notes string
		Builds, Columns        int
		Timeline               []string
	}
	ps, err := chromedp.Run(ctx, chromedp.Evaluate[projectShown](`({
		Status: document.getElementById("status").textContent, Current: document.getElementById("current").textContent,
		Notes: document.querySelector(".notes") ? document.querySelector(".notes").textContent : "",
		Builds: document.querySelectorAll("table.builds tbody tr").length,
		Columns: document.querySelectorAll("table.builds thead th").length,
		Timeline: Array.from(document.querySelectorAll(".timeline li")).map(li => li.dataset.kind)})`))
	if err != nil {
		t.Fatal(err)
	}
	if ps.Status != "building" || ps.Current != "b-docs-1" || !strings.Contains(ps.Notes, "newest build, b-docs-2") {
		t.Errorf("p-docs page = %+v; want building, current b-docs-1, a note naming the newest build b-docs-2", ps)
	}
	if ps.Builds != len(builds) || ps.Columns != 11 {
		t.Errorf("p-docs builds table: %d rows, %d columns; want %d rows (the read model's), 11 columns", ps.Builds, ps.Columns, len(builds))
	}
	var kinds []string
	for _, e := range timeline {
		kinds = append(kinds, e.Kind)
	}
	if strings.Join(ps.Timeline, ",") != strings.Join(kinds, ",") {
		t.Errorf("p-docs timeline = %v; want %v", ps.Timeline, kinds)
	}
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](`document.querySelector("img.badge").complete && document.querySelector("img.badge").naturalWidth > 0`,
		chromedp.WithPollingTimeout(10*time.Second))); err != nil {
		t.Errorf("badge image did not render: %v", err)
	}
	png, err = chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	saveScreenshot(t, shots, "project-page.png", png)

	// The badge, as a README's image fetches it.
	for _, tt := range []struct{ project, message, colour string }{
		{"p-web", "deployed", "#4c1"}, {"p-api", "failed", "#e05d44"}, {"p-shop", "building", "#dfb317"},
		{"p-blog", "canceled", "#9f9f9f"}, {"nobody", "unknown", "#9f9f9f"},
	} {
		res, body := get(t, l.base+"/badge/"+tt.project+".svg", "")
		if res.StatusCode != 200 || res.Header.Get("Content-Type") != "image/svg+xml" ||
			!strings.Contains(body, ">"+tt.message+"</text>") || !strings.Contains(body, `fill="`+tt.colour+`"`) || !strings.Contains(body, ">build</text>") {
			t.Errorf("badge of %s = %d %s %q; want an SVG saying build | %s in %s", tt.project, res.StatusCode, res.Header.Get("Content-Type"), body, tt.message, tt.colour)
		}
		etag := res.Header.Get("ETag")
		if etag == "" || !strings.Contains(res.Header.Get("Cache-Control"), "max-age=") {
			t.Errorf("badge of %s: ETag %q, Cache-Control %q; want both", tt.project, etag, res.Header.Get("Cache-Control"))
			continue
		}
		if res, body := get(t, l.base+"/badge/"+tt.project+".svg", etag); res.StatusCode != http.StatusNotModified || body != "" {
			t.Errorf("badge of %s with If-None-Match %s = %d %q; want 304, no body", tt.project, etag, res.StatusCode, body)
		}
	}
	if res, _ := get(t, l.base+"/badge/p-web", ""); res.StatusCode != http.StatusNotFound {
		t.Errorf("GET /badge/p-web = %d; want 404", res.StatusCode)
	}
}

func get(t *testing.T, url, ifNoneMatch string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ifNoneMatch != "" {
		req.Header.Set("If-None-Match", ifNoneMatch)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, string(b)
}
