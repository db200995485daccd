// Package web is the projector's read-only status page: every project with
// its build status (GET /), one project with its builds and lifecycle
// (GET /projects/{id}), and a shields-style badge per project
// (GET /badge/{id}.svg). Pages are rendered on the server with html/template
// from embedded templates and assets, so they read without JavaScript; a
// small script refreshes the live part of the page every second by fetching
// it again with ?partial=1.
package web

import (
	"bytes"
	"context"
	"embed"
	"errors"
	"html/template"
	"io/fs"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/when"
)

//go:embed templates/*.html
var templateFiles embed.FS

//go:embed assets
var assetFiles embed.FS

// DefaultPageSize is how many projects a page of GET / shows.
const DefaultPageSize = 50

// overviewTTL bounds how often the counts above the table (dead letters,
// stuck builds) are read from Postgres, however many pages poll.
const overviewTTL = 5 * time.Second

// Stats are the live figures of the projector process.
type Stats struct {
	Lag             float64 // messages the durable consumer has not acknowledged
	EventsPerSecond float64 // events applied per second, lately
}

// Options configure the pages.
type Options struct {
	Store    *projection.Store
	Stats    func() Stats           // nil: shown as unknown
	Location *time.Location         // times are shown in it; nil: time.Local
	Now      func() time.Time       // nil: time.Now
	PageSize int                    // 0: DefaultPageSize
	Stuck    projection.StuckLimits // what counts as stuck; zero: projection.DefaultStuckLimits
	Logger   *zap.Logger
}

// Handler serves the pages.
type Handler struct {
	opts    Options
	index   *template.Template
	project *template.Template
	mux     *http.ServeMux

	mu       sync.Mutex // guards overview and readAt
	overview overview
	readAt   time.Time
}

// New builds the pages' handler.
func New(opts Options) *Handler {
	if opts.Location == nil {
		opts.Location = time.Local
	}
	if opts.Stuck == (projection.StuckLimits{}) {
		opts.Stuck = projection.DefaultStuckLimits
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.PageSize <= 0 {
		opts.PageSize = DefaultPageSize
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	h := &Handler{opts: opts, mux: http.NewServeMux()}
	funcs := template.FuncMap{
		"time":         func(t time.Time) string { return when.Format(t, h.opts.Location) },
		"ago":          func(t time.Time) string { return when.Ago(t, h.opts.Now()) },
		"rfc":          func(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) },
		"tone":         Tone,
		"duration":     func(ms int64) string { return (time.Duration(ms) * time.Millisecond).String() },
		"hours":        func(d time.Duration) string { return strings.TrimSuffix(d.String(), "0m0s") },
		"events_per_s": func(f float64) string { return strconv.FormatFloat(f, 'f', 1, 64) },
	}
	h.index = template.Must(template.New("index").Funcs(funcs).ParseFS(templateFiles, "templates/base.html", "templates/index.html"))
	h.project = template.Must(template.New("project").Funcs(funcs).ParseFS(templateFiles, "templates/base.html", "templates/project.html"))
	assets, _ := fs.Sub(assetFiles, "assets")
	h.mux.HandleFunc("GET /{$}", h.serveIndex)
	h.mux.HandleFunc("GET /projects/{id}", h.serveProject)
	h.mux.HandleFunc("GET /badge/{file}", h.serveBadge)
	h.mux.Handle("GET /assets/", http.StripPrefix("/assets/", http.FileServerFS(assets)))
	return h
}

// Register adds the pages' routes to mux: /, /projects/, /badge/, /assets/.
func (h *Handler) Register(mux *http.ServeMux) {
	for _, p := range []string{"GET /{$}", "GET /projects/", "GET /badge/", "GET /assets/"} {
		mux.Handle(p, h.mux)
	}
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// Tone is the colour class of a status word, a project's build_status or a
// build's metrics status: ok, bad, busy, off, or unknown (no row).
func Tone(status string) string {
	if status == string(events.OutcomeSucceeded) {
		return "ok"
	}
	switch fsm.Status(status) {
	case fsm.StatusDeployed:
		return "ok"
	case fsm.StatusFailed:
		return "bad"
	case fsm.StatusQueued, fsm.StatusBuilding:
		return "busy"
	case fsm.StatusCanceled:
		return "off"
	}
	return "unknown"
}

// overview is what the page shows above the table.
type overview struct {
	Stats       *Stats // nil: not known to this process
	DeadLetters int
	Stuck       projection.StuckCounts
	StuckQueued time.Duration
	StuckRun    time.Duration
}

func (h *Handler) readOverview(ctx context.Context) (overview, error) {
	now := h.opts.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.readAt.IsZero() || now.Sub(h.readAt) >= overviewTTL || now.Before(h.readAt) {
		dead, err := h.opts.Store.DeadLetterCount(ctx)
		if err != nil {
			return overview{}, err
		}
		stuck, err := h.opts.Store.StuckCounts(ctx, h.opts.Stuck, now)
		if err != nil {
			return overview{}, err
		}
		h.overview = overview{DeadLetters: dead, Stuck: stuck,
			StuckQueued: h.opts.Stuck.QueuedFor, StuckRun: h.opts.Stuck.BuildingFor}
		h.readAt = now
	}
	ov := h.overview
	if h.opts.Stats != nil {
		s := h.opts.Stats()
		ov.Stats = &s
	}
	return ov, nil
}

type indexView struct {
	Title     string
	Overview  overview
	Search    string
	Page      projection.ProjectPage
	PageNo    int
	Pages     int
	From, To  int
	Prev      string
	Next      string
	PageQuery string
}

func (h *Handler) serveIndex(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	search := strings.TrimSpace(q.Get("q"))
	pageNo, err := strconv.Atoi(q.Get("page"))
	if err != nil || pageNo < 1 {
		pageNo = 1
	}
	ov, err := h.readOverview(r.Context())
	if err != nil {
		h.fail(w, err)
		return
	}
	size := h.opts.PageSize
	page, err := h.opts.Store.ProjectPage(r.Context(), projection.ProjectPageQuery{Search: search, Offset: (pageNo - 1) * size, Limit: size})
	if err != nil {
		h.fail(w, err)
		return
	}
	v := indexView{Title: "buildstate", Overview: ov, Search: search, Page: page, PageNo: pageNo}
	v.Pages = max(1, (page.Total+size-1)/size)
	if len(page.Rows) > 0 {
		v.From, v.To = (pageNo-1)*size+1, (pageNo-1)*size+len(page.Rows)
	}
	link := func(n int) string {
		u := url.Values{}
		if search != "" {
			u.Set("q", search)
		}
		if n > 1 {
			u.Set("page", strconv.Itoa(n))
		}
		if len(u) == 0 {
			return "/"
		}
		return "/?" + u.Encode()
	}
	if pageNo > 1 {
		v.Prev = link(min(pageNo-1, v.Pages))
	}
	if pageNo < v.Pages {
		v.Next = link(pageNo + 1)
	}
	h.render(w, r, h.index, v)
}

type projectView struct {
	Title    string
	Overview overview
	Row      projection.ProjectRow
	Notes    []string
	Builds   []projection.MetricsRow
	Timeline []projection.TimelineEntry
}

// Recent builds and lifecycle events shown on a project's page.
const (
	projectBuilds   = 20
	projectTimeline = 100
)

func (h *Handler) serveProject(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	ctx := r.Context()
	row, err := h.opts.Store.Project(ctx, id)
	if errors.Is(err, pgx.ErrNoRows) {
		http.Error(w, "no project "+strconv.Quote(id)+" (it has no visible build)", http.StatusNotFound)
		return
	}
	if err != nil {
		h.fail(w, err)
		return
	}
	ov, err := h.readOverview(ctx)
	if err != nil {
		h.fail(w, err)
		return
	}
	newest, err := h.opts.Store.NewestBuild(ctx, id)
	if err != nil {
		h.fail(w, err)
		return
	}
	builds, err := h.opts.Store.RecentBuilds(ctx, id, projectBuilds)
	if err != nil {
		h.fail(w, err)
		return
	}
	tl, err := h.opts.Store.Timeline(ctx, id, projectTimeline)
	if err != nil {
		h.fail(w, err)
		return
	}
	h.render(w, r, h.project, projectView{Title: id + " · buildstate", Overview: ov, Row: row,
		Notes: Explain(row, newest), Builds: builds, Timeline: tl})
}

// render writes the whole page, or with ?partial=1 only its live part (the
// script on the page swaps it in).
func (h *Handler) render(w http.ResponseWriter, r *http.Request, t *template.Template, v any) {
	name := "page"
	if r.URL.Query().Get("partial") == "1" {
		name = "live"
	}
	var buf bytes.Buffer
	if err := t.ExecuteTemplate(&buf, name, v); err != nil {
		h.fail(w, err)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(buf.Bytes())
}

func (h *Handler) fail(w http.ResponseWriter, err error) {
	h.opts.Logger.Warn("status page", zap.Error(err))
	http.Error(w, "the read model cannot be read just now", http.StatusServiceUnavailable)
}

// Explain says in words what a project's row means where it can surprise:
// build_status is the newest build's, while the current build is the newest
// build with a metrics row, so the two can be different builds; and the
// project's words are not the build's (deployed is a build that succeeded).
// newest is the project's newest build ("" if unknown).
func Explain(row projection.ProjectRow, newest string) []string {
	var notes []string
	cur := ""
	if row.CurrentBuildID != nil {
		cur = *row.CurrentBuildID
	}
	switch {
	case cur == "" && newest != "":
		notes = append(notes, "status is that of the newest build, "+newest+
			"; there is no current build yet: the current build is the newest build with a metrics row, and none has one")
	case cur == "":
		notes = append(notes, "there is no current build yet: the current build is the newest build with a metrics row, and none has one")
	case newest != "" && newest != cur:
		notes = append(notes, "status is that of the newest build, "+newest+", which has no metrics row yet; the current build, "+
			cur+", is the newest build with a metrics row")
	}
	switch fsm.Status(row.BuildStatus) {
	case fsm.StatusDeployed:
		notes = append(notes, "deployed: the newest build completed with outcome succeeded")
	case fsm.StatusBuilding:
		notes = append(notes, "building: the newest build has started and not completed")
	case fsm.StatusQueued:
		notes = append(notes, "queued: the newest build is queued and has not started")
	}
	return notes
}
