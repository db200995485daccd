package web_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/internal/web"
)

// newStore gives a test its own migrated database with the given events
// applied.
func newStore(t *testing.T, evs ...events.Event) *projection.Store {
	t.Helper()
	ctx := context.Background()
	pool, err := projector.OpenPool(ctx, testenv.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if err := projector.MigratePool(ctx, pool); err != nil {
		t.Fatal(err)
	}
	s := projection.New(pool, projection.Options{})
	msgs := make([]projection.Message, len(evs))
	for i, ev := range evs {
		body, err := ev.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		msgs[i] = projection.Message{Seq: uint64(i + 1), Subject: events.Subject("builds", ev.ProjectID, ev.Kind()), Data: body, StoredAt: time.Now()}
	}
	if _, err := s.Apply(ctx, nil, msgs); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestPagesWithoutJavaScript reads the server's HTML as a browser without
// JavaScript gets it: paging, search, the live fragment, a missing project.
func TestPagesWithoutJavaScript(t *testing.T) {
	t.Parallel()
	t0 := time.Now().Add(-time.Hour)
	var evs []events.Event
	for i, p := range []string{"alpha", "beta", "gamma", "delta", "a_b"} {
		evs = append(evs, events.New(events.KindQueued, p, "b-"+p, t0.Add(time.Duration(i)*time.Minute), events.Data{}))
	}
	h := web.New(web.Options{Store: newStore(t, evs...), PageSize: 2, Location: time.UTC})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)

	tests := []struct {
		path     string
		code     int
		projects []string // in order
		contains []string
	}{
		{"/", 200, []string{"a_b", "alpha"}, []string{"<html", "projects 1–2 of 5", `href="/?page=2"`, "page 1 of 3", `name="q"`}},
		{"/?page=2", 200, []string{"beta", "delta"}, []string{"projects 3–4 of 5", `href="/?page=3"`}},
		{"/?page=3", 200, []string{"gamma"}, []string{"projects 5–5 of 5", "page 3 of 3"}},
		{"/?page=9", 200, nil, []string{"no projects on this page (5 in all)", `href="/?page=3"`}},
		{"/?q=ALP", 200, []string{"alpha"}, []string{"projects 1–1 of 1", "matching “ALP”"}},
		{"/?q=a_", 200, []string{"a_b"}, []string{"of 1"}}, // _ matches itself, not any character
		{"/?q=zzz", 200, nil, []string{"no projects"}},
		{"/projects/beta", 200, []string{"beta"}, []string{"queued: the newest build is queued", "there is no current build yet", `data-kind="queued"`}},
		{"/projects/nobody", 404, nil, []string{"no project"}},
	}
	for _, tt := range tests {
		res, body := get(t, srv.URL+tt.path, "")
		if res.StatusCode != tt.code {
			t.Errorf("GET %s = %d; want %d", tt.path, res.StatusCode, tt.code)
			continue
		}
		if got := projectsIn(body); strings.Join(got, ",") != strings.Join(tt.projects, ",") {
			t.Errorf("GET %s shows projects %v; want %v", tt.path, got, tt.projects)
		}
		for _, c := range tt.contains {
			if !strings.Contains(body, c) {
				t.Errorf("GET %s: no %q in\n%s", tt.path, c, body)
			}
		}
	}
	// The live fragment is the page's <main> content only.
	_, full := get(t, srv.URL+"/?page=2", "")
	_, part := get(t, srv.URL+"/?page=2&partial=1", "")
	if strings.Contains(part, "<html") || !strings.Contains(full, `<main id="live" aria-live="polite">`+part+`</main>`) {
		t.Errorf("partial of /?page=2 is not the page's live part:\n%s", part)
	}
	for _, asset := range []string{"/assets/style.css", "/assets/live.js"} {
		if res, body := get(t, srv.URL+asset, ""); res.StatusCode != 200 || len(body) < 100 {
			t.Errorf("GET %s = %d, %d bytes; want the embedded file", asset, res.StatusCode, len(body))
		}
	}
}

// projectsIn lists the data-project attributes of body, in order.
func projectsIn(body string) []string {
	var out []string
	for _, part := range strings.Split(body, `data-project="`)[1:] {
		out = append(out, part[:strings.IndexByte(part, '"')])
	}
	return out
}

func TestExplain(t *testing.T) {
	s := func(v string) *string { return &v }
	tests := []struct {
		status  string
		current *string
		newest  string
		want    []string
	}{
		{"deployed", s("b-1"), "b-1", []string{"deployed: the newest build completed with outcome succeeded"}},
		{"building", s("b-1"), "b-2", []string{"status is that of the newest build, b-2, which has no metrics row yet; the current build, b-1, is the newest build with a metrics row",
			"building: the newest build has started and not completed"}},
		{"queued", nil, "b-1", []string{"status is that of the newest build, b-1; there is no current build yet: the current build is the newest build with a metrics row, and none has one",
			"queued: the newest build is queued and has not started"}},
		{"failed", s("b-3"), "b-3", nil},
	}
	for _, tt := range tests {
		got := web.Explain(projection.ProjectRow{BuildStatus: tt.status, CurrentBuildID: tt.current}, tt.newest)
		if fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("Explain(%s, current %v, newest %s) = %q; want %q", tt.status, tt.current, tt.newest, got, tt.want)
		}
	}
}

func TestBadgeIfNoneMatchList(t *testing.T) {
	t.Parallel()
	h := web.New(web.Options{Store: newStore(t, events.New(events.KindQueued, "p-1", "b-1", time.Now().Add(-time.Minute), events.Data{}))})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	res, body := get(t, srv.URL+"/badge/p-1.svg", "")
	if res.StatusCode != 200 || !strings.Contains(body, ">queued</text>") {
		t.Fatalf("badge = %d %q; want queued", res.StatusCode, body)
	}
	etag := res.Header.Get("ETag")
	for _, inm := range []string{`"other", ` + etag, "W/" + etag, "*"} {
		if res, _ := get(t, srv.URL+"/badge/p-1.svg", inm); res.StatusCode != http.StatusNotModified {
			t.Errorf("If-None-Match %s = %d; want 304", inm, res.StatusCode)
		}
	}
	if res, _ := get(t, srv.URL+"/badge/p-1.svg", `"other"`); res.StatusCode != 200 {
		t.Errorf("If-None-Match of another tag = %d; want 200", res.StatusCode)
	}
}
