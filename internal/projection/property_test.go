package projection_test

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fold"
	"github.com/buildstate/buildstate/internal/projection"
)

// The property of issue 2's "Done when": the read model is a function of the
// set of valid events. Random multi-build histories, applied in random
// orders with random exact duplicates and random batch sizes, give the rows
// of an independent model of the rules of §2, written below from the issue's
// text (it does not call fsm.Derive). Every store counts the retried writes
// by SQLSTATE; a check (23514) or foreign key (23503) violation fails the test.

// countingObserver counts retried writes by SQLSTATE and constraint, and
// dropped fields by name.
type countingObserver struct {
	mu      sync.Mutex
	n       map[string]int // "sqlstate constraint" -> count
	dropped map[string]int // field -> count
}

func (o *countingObserver) FieldDropped(field string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.dropped == nil {
		o.dropped = map[string]int{}
	}
	o.dropped[field]++
}

// droppedFields is the count of each field dropped so far.
func (o *countingObserver) droppedFields() map[string]int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return cloneCounts(o.dropped)
}

func (o *countingObserver) WriteRetried(sqlstate, constraint string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.n == nil {
		o.n = map[string]int{}
	}
	o.n[sqlstate+" "+constraint]++
}

// constraintErrors is the number of retries caused by 23514 or 23503.
func (o *countingObserver) constraintErrors() (int, map[string]int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	total := 0
	for k, n := range o.n {
		if strings.HasPrefix(k, "23514 ") || strings.HasPrefix(k, "23503 ") {
			total += n
		}
	}
	return total, cloneCounts(o.n)
}

func cloneCounts(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// newCountedStore gives the test its own migrated database and a store whose
// retried writes are counted; when the test ends, it fails if any was a
// constraint violation.
func newCountedStore(t *testing.T) (*projection.Store, *countingObserver) {
	t.Helper()
	return newCountedStoreWith(t, projection.Options{Gate: true})
}

// newCountedStoreWith is newCountedStore with opts (its Observer replaced).
func newCountedStoreWith(t *testing.T, opts projection.Options) (*projection.Store, *countingObserver) {
	t.Helper()
	obs := &countingObserver{}
	opts.Observer = obs
	s := newStore(t, opts)
	t.Cleanup(func() { assertNoConstraintErrors(t, obs) })
	return s, obs
}

func assertNoConstraintErrors(t *testing.T, obs *countingObserver) {
	t.Helper()
	n, all := obs.constraintErrors()
	if n != 0 {
		t.Errorf("23514/23503 errors = %d (all retries: %v); want 0", n, all)
	} else if len(all) > 0 {
		t.Logf("retried writes (not constraint errors): %v", all)
	}
}

// --- the generator ---------------------------------------------------------

// genConfig shapes a generated history.
type genConfig struct {
	projects  int
	maxBuilds int // builds per project: 1..maxBuilds
}

// generator makes histories with every irregularity the rules must handle
// (time-out completions too, see timeOut):
// builds without queued (requested at start), without start, invisible ones
// (metrics or completion only), without metrics, unfinished, completion
// before start (skew), metrics before start, overlapping builds, builds
// requested at the same instant (tie to the greater build_id), corrections
// (later occurred_at, new id, new data), stale re-sends (earlier
// occurred_at), and re-sends at the same instant under another id (tie to the
// greater id). Event ids mix cases, digits and punctuation, so the id tie
// break is byte order, not any collation. A skewed completion often carries
// the negative duration_ms its producer computed from the two clocks, and a
// metrics event now and then attempt 0: the contract drops both (NULL) and
// applies the step. Bodies spell integers as integral floats now and then
// (respell).
type generator struct {
	rng  *rand.Rand
	ids  map[string]bool
	base time.Time
}

func newGenerator(seed uint64) *generator {
	return &generator{
		rng:  rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		ids:  map[string]bool{},
		base: time.Now().UTC().Add(-30 * 24 * time.Hour).Truncate(time.Second),
	}
}

func (g *generator) chance(p float64) bool { return g.rng.Float64() < p }

// micros is a random duration in [lo, hi) at microsecond precision.
func (g *generator) micros(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(g.rng.Int64N(int64((hi-lo)/time.Microsecond)))*time.Microsecond
}

const idChars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_.:~"

// id is a fresh event or build id.
func (g *generator) id(prefix string) string {
	for {
		var sb strings.Builder
		sb.WriteString(prefix)
		for range 4 + g.rng.IntN(8) {
			sb.WriteByte(idChars[g.rng.IntN(len(idChars))])
		}
		if s := sb.String(); !g.ids[s] {
			g.ids[s] = true
			return s
		}
	}
}

func pickStr(g *generator, xs ...string) *string {
	i := g.rng.IntN(len(xs) + 1)
	if i == len(xs) {
		return nil
	}
	return &xs[i]
}

func (g *generator) data(k events.Kind) events.Data {
	var d events.Data
	switch k {
	case events.KindStarted:
		d.Framework = pickStr(g, "nextjs", "astro", "remix")
	case events.KindMetricsRecorded:
		d.Framework = pickStr(g, "nextjs", "astro", "sveltekit")
		d.NodeVersion = pickStr(g, "20.11", "22.1")
		d.PackageManager = pickStr(g, "npm", "pnpm", "yarn")
		if g.chance(0.7) {
			n := int64(1 + g.rng.IntN(3))
			if g.chance(0.05) {
				n = -g.rng.Int64N(2) // 0 or -1: out of range, dropped
			}
			d.Attempt = &n
		}
	case events.KindCompleted:
		d.Outcome = []events.Outcome{events.OutcomeSucceeded, events.OutcomeSucceeded, events.OutcomeFailed, events.OutcomeCanceled}[g.rng.IntN(4)]
		if g.chance(0.8) {
			n := g.rng.Int64N(900_000)
			d.DurationMS = &n
		}
		if d.Outcome == events.OutcomeFailed && g.chance(0.8) {
			d.Error = pickStr(g, "exit 1", "out of memory", "timeout")
		}
	}
	return d
}

// timeOut is a time-out completion of build at at.
func (g *generator) timeOut(project, build string, at time.Time) events.Event {
	ev := events.New(events.KindCompleted, project, build, at, events.Data{
		Outcome:  []events.Outcome{events.OutcomeFailed, events.OutcomeCanceled}[g.rng.IntN(2)],
		Error:    pickStr(g, "timed out: no completion 3h after start", "timed out: no start 1h after queued"),
		TimedOut: true,
	})
	ev.ID = g.id("")
	return ev
}

func (g *generator) event(k events.Kind, project, build string, at time.Time) events.Event {
	ev := events.New(k, project, build, at, g.data(k))
	ev.ID = g.id("")
	return ev
}

// history returns the distinct events of cfg.projects projects named
// prefix-<n>.
func (g *generator) history(prefix string, cfg genConfig) []events.Event {
	var out []events.Event
	for p := range cfg.projects {
		project := fmt.Sprintf("%s-%d", prefix, p)
		cursor := g.base.Add(g.micros(0, 10*24*time.Hour))
		var prevReq time.Time
		for b := range 1 + g.rng.IntN(cfg.maxBuilds) {
			build := g.id(project + "-b")
			req := cursor
			if b > 0 && g.chance(0.1) {
				req = prevReq // requested at the same instant as the previous build
			}
			prevReq = req
			// Overlapping builds: the next one may be requested before this one ends.
			cursor = cursor.Add(g.micros(time.Second, 20*time.Minute))

			hasQ, hasS := !g.chance(0.2), !g.chance(0.2)
			hasM, hasC := g.chance(0.7), g.chance(0.7)
			if !hasQ && !hasS && g.chance(0.5) {
				hasM = true // an invisible build with a metrics row
			}
			sAt := req.Add(g.micros(0, 5*time.Minute))
			if !hasQ {
				sAt = req
			}
			mAt := sAt.Add(g.micros(time.Microsecond, 5*time.Minute))
			if g.chance(0.1) {
				mAt = sAt.Add(-g.micros(time.Microsecond, time.Minute)) // metrics before start (skew)
			}
			cAt := sAt.Add(g.micros(10*time.Second, 15*time.Minute))
			skewed := g.chance(0.15)
			if skewed {
				cAt = sAt.Add(-g.micros(time.Microsecond, 5*time.Minute)) // completion before start (skew)
			}
			for _, st := range []struct {
				k  events.Kind
				ok bool
				at time.Time
			}{
				{events.KindQueued, hasQ, req}, {events.KindStarted, hasS, sAt},
				{events.KindMetricsRecorded, hasM, mAt}, {events.KindCompleted, hasC, cAt},
			} {
				if !st.ok {
					continue
				}
				ev := g.event(st.k, project, build, st.at)
				if st.k == events.KindCompleted && skewed && g.chance(0.7) {
					// The producer's duration from its two clocks: negative.
					n := -1 - int64(sAt.Sub(cAt)/time.Millisecond)
					ev.Data.DurationMS = &n
				}
				out = append(out, ev)
				if g.chance(0.12) { // correction: later, new id, new data
					out = append(out, g.event(st.k, project, build, st.at.Add(g.micros(time.Microsecond, 3*time.Minute))))
				}
				if g.chance(0.08) { // stale re-send: earlier, loses
					out = append(out, g.event(st.k, project, build, st.at.Add(-g.micros(time.Microsecond, 3*time.Minute))))
				}
				if g.chance(0.1) { // same instant, another id: the greater id wins
					out = append(out, g.event(st.k, project, build, st.at))
				}
			}
			// Time-outs (projector stuck --time-out): a completion with
			// timed_out, before or after the real one if any, sometimes two
			// (from two limits) or two at one instant.
			if g.chance(0.2) {
				for range 1 + g.rng.IntN(2) {
					tAt := sAt.Add(g.micros(-10*time.Minute, 30*time.Minute))
					out = append(out, g.timeOut(project, build, tAt))
					if g.chance(0.1) {
						out = append(out, g.timeOut(project, build, tAt))
					}
				}
			}
		}
	}
	return out
}

// delivery is the events in a random order with random exact duplicates
// (0..dupRate copies per event on average).
func (g *generator) delivery(evs []events.Event, dupRate float64) (out []events.Event, dups int) {
	out = slices.Clone(evs)
	for range int(float64(len(evs)) * dupRate) {
		out = append(out, evs[g.rng.IntN(len(evs))])
		dups++
	}
	g.rng.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out, dups
}

// integral matches the integers of a canonical body that respell rewrites.
var integral = regexp.MustCompile(`"(spec_version|attempt|duration_ms)":(-?[0-9]+)`)

// respell rewrites about a third of the messages' bodies with their
// integers spelled as integral floats (61000.0, 61e3, 6.1e4), as Python and
// many JSON libraries write them: the same events, so the same rows, and a
// respelled copy of an applied event is a duplicate.
func (g *generator) respell(ms []projection.Message) []projection.Message {
	for i := range ms {
		if !g.chance(0.33) {
			continue
		}
		ms[i].Data = integral.ReplaceAllFunc(ms[i].Data, func(m []byte) []byte {
			sub := integral.FindSubmatch(m)
			n := string(sub[2])
			switch g.rng.IntN(4) {
			case 0:
				n += ".0"
			case 1:
				n += "e0"
			case 2:
				n += ".000E+0"
			default:
				if trimmed := strings.TrimRight(n, "0"); trimmed != n && trimmed != "" && trimmed != "-" {
					n = fmt.Sprintf("%se%d", trimmed, len(n)-len(trimmed)) // 61000 -> 61e3
				} else {
					n += ".0"
				}
			}
			return []byte(`"` + string(sub[1]) + `":` + n)
		})
	}
	return ms
}

// outOfRange counts the optional measurements of evs the contract drops.
func outOfRange(evs []events.Event) map[string]int {
	n := map[string]int{}
	for _, ev := range evs {
		switch d := ev.Data; ev.Kind() {
		case events.KindMetricsRecorded:
			if d.Attempt != nil && *d.Attempt < 1 {
				n["attempt"]++
			}
		case events.KindCompleted:
			if d.DurationMS != nil && *d.DurationMS < 0 {
				n["duration_ms"]++
			}
		}
	}
	return n
}

// batches cuts n items into consecutive random sizes in [1, max].
func (g *generator) batches(n, max int) [][2]int {
	var out [][2]int
	for i := 0; i < n; {
		j := min(n, i+1+g.rng.IntN(max))
		out = append(out, [2]int{i, j})
		i = j
	}
	return out
}

// --- the independent model ------------------------------------------------

// modelBuild is what counts of one build: the winning event of each kind.
type modelBuild struct {
	id, project string
	q, s, m, c  *events.Event
}

// later is §2's winner rule: the later occurred_at; ties to the greater id.
// Issue 9 §3 comes first: a completion with timed_out loses to one without
// it, whatever their times.
func later(a, b events.Event) bool {
	if a.Data.TimedOut && !b.Data.TimedOut {
		return false
	}
	if b.Data.TimedOut && !a.Data.TimedOut {
		return true
	}
	if a.OccurredAt.Equal(b.OccurredAt) {
		return a.ID > b.ID
	}
	return a.OccurredAt.After(b.OccurredAt)
}

// modelBuilds is every build with its winning events.
func modelBuilds(evs []events.Event) map[string]*modelBuild {
	type key struct {
		build string
		kind  events.Kind
	}
	win := map[key]events.Event{}
	for _, ev := range evs {
		k := key{ev.BuildID, ev.Kind()}
		if old, ok := win[k]; !ok || later(ev, old) {
			win[k] = ev
		}
	}
	builds := map[string]*modelBuild{}
	for k, ev := range win {
		b := builds[k.build]
		if b == nil {
			b = &modelBuild{id: k.build, project: ev.ProjectID}
			builds[k.build] = b
		}
		ev := ev
		switch k.kind {
		case events.KindQueued:
			b.q = &ev
		case events.KindStarted:
			b.s = &ev
		case events.KindMetricsRecorded:
			b.m = &ev
		case events.KindCompleted:
			b.c = &ev
		}
	}
	return builds
}

// modelStuck is every build still waiting on its worker, by build id:
// queued with no start or completion, or started with no completion.
func modelStuck(evs []events.Event) map[string]projection.StuckBuild {
	out := map[string]projection.StuckBuild{}
	for id, b := range modelBuilds(evs) {
		switch {
		case b.c != nil:
		case b.s != nil:
			out[id] = projection.StuckBuild{BuildID: id, ProjectID: b.project, State: "building", Since: b.s.OccurredAt}
		case b.q != nil:
			out[id] = projection.StuckBuild{BuildID: id, ProjectID: b.project, State: "queued", Since: b.q.OccurredAt}
		}
	}
	return out
}

// model computes the rows §2 says the events give, by brute force.
func model(evs []events.Event) (map[string]projection.ProjectRow, map[string]projection.MetricsRow) {
	builds := modelBuilds(evs)
	metrics := map[string]projection.MetricsRow{}
	byProject := map[string][]*modelBuild{}
	for _, b := range builds {
		byProject[b.project] = append(byProject[b.project], b)
		if b.m == nil {
			continue
		}
		r := projection.MetricsRow{BuildID: b.id, ProjectID: b.project, Status: "building", StartedAt: b.m.OccurredAt,
			Framework: buildFramework(b), NodeVersion: b.m.Data.NodeVersion, PackageManager: b.m.Data.PackageManager}
		if a := b.m.Data.Attempt; a != nil && *a >= 1 { // the contract: an attempt below 1 is left out (NULL)
			r.Attempt = a
		}
		if b.s != nil {
			r.StartedAt = b.s.OccurredAt
		}
		if b.q != nil {
			r.QueuedAt = &b.q.OccurredAt
		}
		if b.c != nil {
			r.Status = string(b.c.Data.Outcome)
			done := b.c.OccurredAt
			if done.Before(r.StartedAt) {
				done = r.StartedAt
			}
			r.CompletedAt = &done
			r.Error = b.c.Data.Error
			if d := b.c.Data.DurationMS; d != nil && *d >= 0 { // the contract: a negative duration is left out (NULL)
				r.DurationMS = d
			}
		}
		metrics[b.id] = r
	}

	projects := map[string]projection.ProjectRow{}
	for p, bs := range byProject {
		newest := newestWhere(bs, func(*modelBuild) bool { return true })
		if newest == nil {
			continue // no visible build: no row
		}
		row := projection.ProjectRow{ProjectID: p, BuildStatus: "queued"}
		switch {
		case newest.c != nil:
			row.BuildStatus = map[events.Outcome]string{events.OutcomeSucceeded: "deployed",
				events.OutcomeFailed: "failed", events.OutcomeCanceled: "canceled"}[newest.c.Data.Outcome]
		case newest.s != nil:
			row.BuildStatus = "building"
		}
		if b := newestWhere(bs, func(b *modelBuild) bool { return b.s != nil }); b != nil {
			st := b.s.OccurredAt
			row.LastBuildStarted = &st
			if b.c != nil {
				done := b.c.OccurredAt
				if done.Before(st) {
					done = st
				}
				row.LastBuildCompleted = &done
			}
		}
		if b := newestWhere(bs, func(b *modelBuild) bool { return b.m != nil }); b != nil {
			id := b.id
			row.CurrentBuildID = &id
		}
		// Not in §2's text; the code's rule: the newest visible build that reports a framework.
		if b := newestWhere(bs, func(b *modelBuild) bool { return buildFramework(b) != nil }); b != nil {
			row.Framework = buildFramework(b)
		}
		projects[p] = row
	}
	return projects, metrics
}

// requestedAt is the build's queued time, else its started time; ok is false
// for a build that is not visible.
func requestedAt(b *modelBuild) (time.Time, bool) {
	if b.q != nil {
		return b.q.OccurredAt, true
	}
	if b.s != nil {
		return b.s.OccurredAt, true
	}
	return time.Time{}, false
}

// newestWhere is the visible build with the greatest (requested time,
// build_id) among those pred accepts, or nil.
func newestWhere(bs []*modelBuild, pred func(*modelBuild) bool) *modelBuild {
	var best *modelBuild
	var bestAt time.Time
	for _, b := range bs {
		at, ok := requestedAt(b)
		if !ok || !pred(b) {
			continue
		}
		if best == nil || at.After(bestAt) || (at.Equal(bestAt) && b.id > best.id) {
			best, bestAt = b, at
		}
	}
	return best
}

// buildFramework is the framework the build's data reports: the metrics
// event's, else the started event's.
func buildFramework(b *modelBuild) *string {
	if b.m != nil && b.m.Data.Framework != nil {
		return b.m.Data.Framework
	}
	if b.s != nil {
		return b.s.Data.Framework
	}
	return nil
}

// --- comparing rows --------------------------------------------------------

func readModel(t *testing.T, s *projection.Store) (map[string]projection.ProjectRow, map[string]projection.MetricsRow) {
	t.Helper()
	ctx := context.Background()
	ps, err := s.Projects(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ms, err := s.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	projects := map[string]projection.ProjectRow{}
	for _, p := range ps {
		projects[p.ProjectID] = p
	}
	metrics := map[string]projection.MetricsRow{}
	for _, m := range ms {
		metrics[m.BuildID] = m
	}
	return projects, metrics
}

func fmtStr(s *string) string {
	if s == nil {
		return "NULL"
	}
	return fmt.Sprintf("%q", *s)
}

func fmtTime(t *time.Time) string {
	if t == nil {
		return "NULL"
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func fmtInt(n *int64) string {
	if n == nil {
		return "NULL"
	}
	return fmt.Sprint(*n)
}

// projectLine is every column but updated_at.
func projectLine(r projection.ProjectRow) string {
	return fmt.Sprintf("status=%s current=%s started=%s completed=%s framework=%s", r.BuildStatus,
		fmtStr(r.CurrentBuildID), fmtTime(r.LastBuildStarted), fmtTime(r.LastBuildCompleted), fmtStr(r.Framework))
}

func metricsLine(m projection.MetricsRow) string {
	return fmt.Sprintf("project=%s status=%s queued=%s started=%s completed=%s duration=%s framework=%s node=%s pm=%s attempt=%s error=%s",
		m.ProjectID, m.Status, fmtTime(m.QueuedAt), fmtTime(&m.StartedAt), fmtTime(m.CompletedAt), fmtInt(m.DurationMS),
		fmtStr(m.Framework), fmtStr(m.NodeVersion), fmtStr(m.PackageManager), fmtInt(m.Attempt), fmtStr(m.Error))
}

// diffRows lists the rows that differ (at most 10 of each table).
func diffRows(gotP, wantP map[string]projection.ProjectRow, gotM, wantM map[string]projection.MetricsRow) []string {
	var out []string
	add := func(format string, args ...any) {
		if len(out) < 20 {
			out = append(out, fmt.Sprintf(format, args...))
		}
	}
	for _, id := range unionKeys(gotP, wantP) {
		g, gok := gotP[id]
		w, wok := wantP[id]
		switch {
		case !gok:
			add("projects %s missing; want %s", id, projectLine(w))
		case !wok:
			add("projects %s = %s; want no row", id, projectLine(g))
		case projectLine(g) != projectLine(w):
			add("projects %s\n    got  %s\n    want %s", id, projectLine(g), projectLine(w))
		}
	}
	for _, id := range unionKeys(gotM, wantM) {
		g, gok := gotM[id]
		w, wok := wantM[id]
		switch {
		case !gok:
			add("project_build_metrics %s missing; want %s", id, metricsLine(w))
		case !wok:
			add("project_build_metrics %s = %s; want no row", id, metricsLine(g))
		case metricsLine(g) != metricsLine(w):
			add("project_build_metrics %s\n    got  %s\n    want %s", id, metricsLine(g), metricsLine(w))
		}
	}
	return out
}

func unionKeys[V any](a, b map[string]V) []string {
	seen := map[string]bool{}
	for k := range a {
		seen[k] = true
	}
	for k := range b {
		seen[k] = true
	}
	keys := make([]string, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// checkAgainstModel fails the test if the store's rows are not the model's.
func checkAgainstModel(t *testing.T, s *projection.Store, evs []events.Event) {
	t.Helper()
	gotP, gotM := readModel(t, s)
	wantP, wantM := model(evs)
	if d := diffRows(gotP, wantP, gotM, wantM); len(d) > 0 {
		t.Errorf("read model differs from the model of §2 (%d projects, %d metrics rows expected):\n  %s",
			len(wantP), len(wantM), strings.Join(d, "\n  "))
	}
	// Every open build, whatever its age, is listed by Stuck (through the
	// open builds the store keeps, projector_open_builds).
	far := time.Now().Add(24 * time.Hour)
	stuck, err := s.Stuck(context.Background(), projection.StuckLimits{}, far)
	if err != nil {
		t.Fatal(err)
	}
	want := modelStuck(evs)
	var diffs []string
	for _, b := range stuck {
		w, ok := want[b.BuildID]
		if !ok || w.ProjectID != b.ProjectID || w.State != b.State || !w.Since.Equal(b.Since) {
			diffs = append(diffs, fmt.Sprintf("Stuck lists %+v; model: %+v (listed %v)", b, w, ok))
		}
		delete(want, b.BuildID)
	}
	for _, w := range want {
		diffs = append(diffs, fmt.Sprintf("Stuck does not list %+v", w))
	}
	if len(diffs) > 0 {
		t.Errorf("stuck builds differ from the model (%d differences):\n  %s", len(diffs), strings.Join(diffs[:min(len(diffs), 20)], "\n  "))
	}
}

// applyAll applies the messages in the given batches and sums the results.
func applyAll(t *testing.T, s *projection.Store, ms []projection.Message, cuts [][2]int) projection.Result {
	t.Helper()
	return applyFenced(t, s, ms, cuts, 0)
}

// applyFenced is applyAll as the partition's owner: with reacquire > 0 it
// acquires the partition and applies every batch under its fence (with the
// fence's memory), acquiring it again every reacquire batches (a fresh
// memory, which knows only which projects the store holds); 0 applies
// without a fence. Result.Redone sums the batches folded again.
func applyFenced(t *testing.T, s *projection.Store, ms []projection.Message, cuts [][2]int, reacquire int) projection.Result {
	t.Helper()
	ctx := context.Background()
	var sum projection.Result
	var fence *projection.Fence
	for i, c := range cuts {
		if reacquire > 0 && i%reacquire == 0 {
			f, err := s.Acquire(ctx, projection.LayoutP1, 0, "test")
			if err != nil {
				t.Fatal(err)
			}
			fence = f
		}
		res, err := s.Apply(ctx, fence, ms[c[0]:c[1]])
		if err != nil {
			t.Fatalf("Apply(messages %d..%d) = %v", c[0], c[1], err)
		}
		addResult(&sum, res)
	}
	return sum
}

// addResult adds r to sum.
func addResult(sum *projection.Result, r projection.Result) {
	sum.Applied += r.Applied
	sum.Duplicates += r.Duplicates
	sum.DeadLettered += r.DeadLettered
	sum.Dropped += r.Dropped
	sum.Redone += r.Redone
}

// applyPipelined is applyFenced (reacquire > 0) as the live writer applies:
// each batch is begun (Store.Begin: folded on the memory and sent) before
// the one before it is finished, so every batch is folded on a memory that
// holds a batch not yet committed; a batch that does not commit (folded
// again) makes the next one apply again too. The partition is acquired again
// once the batches begun are finished.
func applyPipelined(t *testing.T, s *projection.Store, ms []projection.Message, cuts [][2]int, reacquire int) projection.Result {
	t.Helper()
	ctx := context.Background()
	var sum projection.Result
	var fence *projection.Fence
	var open *projection.Pending
	var openCut [2]int
	finish := func() {
		if open == nil {
			return
		}
		res, err := open.Finish(ctx)
		if err != nil {
			t.Fatalf("Finish(messages %d..%d) = %v", openCut[0], openCut[1], err)
		}
		addResult(&sum, res)
		open = nil
	}
	for i, c := range cuts {
		if i%reacquire == 0 {
			finish()
			f, err := s.Acquire(ctx, projection.LayoutP1, 0, "test")
			if err != nil {
				t.Fatal(err)
			}
			fence = f
		}
		next := s.Begin(ctx, fence, ms[c[0]:c[1]])
		finish()
		open, openCut = next, c
	}
	finish()
	return sum
}

// smallMemory bounds a fence's memory well below the property test's
// histories, so that its batches meet every case: projects dropped and read
// again, builds claimed and ids applied that the memory does not know.
var smallMemory = fold.Limits{Projects: 20, IDs: 100}

// --- the tests -------------------------------------------------------------

func TestModelByHand(t *testing.T) {
	t.Parallel()
	// A small hand-checked history, to keep the model honest.
	t0 := time.Now().UTC().Add(-time.Hour).Truncate(time.Second)
	ev := func(k events.Kind, build, id string, sec int, d events.Data) events.Event {
		e := events.New(k, "p", build, t0.Add(time.Duration(sec)*time.Second), d)
		e.ID = id
		return e
	}
	evs := []events.Event{
		ev(events.KindQueued, "b1", "1", 0, events.Data{}),
		ev(events.KindStarted, "b1", "2", 10, events.Data{Framework: str("nextjs")}),
		ev(events.KindMetricsRecorded, "b1", "3", 20, events.Data{}),
		ev(events.KindCompleted, "b1", "4", 5, events.Data{Outcome: events.OutcomeFailed}),
		ev(events.KindCompleted, "b1", "5", 5, events.Data{Outcome: events.OutcomeSucceeded}),                 // tie, greater id
		ev(events.KindCompleted, "b1", "9", 50, events.Data{Outcome: events.OutcomeCanceled, TimedOut: true}), // a time-out loses, though later
		ev(events.KindQueued, "b2", "6", 30, events.Data{}),
		ev(events.KindMetricsRecorded, "b3", "7", 99, events.Data{}), // invisible
	}
	p, m := model(evs)
	row := p["p"]
	if got := projectLine(row); got != fmt.Sprintf("status=queued current=\"b1\" started=%s completed=%s framework=\"nextjs\"",
		t0.Add(10*time.Second).Format(time.RFC3339Nano), t0.Add(10*time.Second).Format(time.RFC3339Nano)) {
		t.Errorf("model row = %s", got)
	}
	if len(m) != 2 || m["b1"].Status != "succeeded" || !m["b3"].StartedAt.Equal(t0.Add(99*time.Second)) {
		t.Errorf("model metrics = %v", m)
	}
}

// TestAnyOrderAnyDuplicates is the property: for several seeds, a history of
// 200 projects is applied in two random orders, each with random duplicates
// and random batch sizes, to two fresh stores; both equal the model and each
// other, and the counts add up. The first store applies without a fence (as
// dead-letter retries and the tests do), the second as the partition's owner
// with a small memory (projection.Fence, fold.Memory), acquired again every 7
// batches, the third as the second but pipelined as the live writer applies
// (Store.Begin before the previous batch's Finish).
func TestAnyOrderAnyDuplicates(t *testing.T) {
	t.Parallel()
	for seed := uint64(1); seed <= 5; seed++ {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Parallel()
			g := newGenerator(seed)
			distinct := g.history(fmt.Sprintf("s%d", seed), genConfig{projects: 200, maxBuilds: 6})
			drops := outOfRange(distinct)
			if drops["duration_ms"] == 0 {
				t.Fatalf("the history has no negative duration_ms; the generator must make some")
			}
			var stores [3]*projection.Store
			var observers [3]*countingObserver
			reacquire := [3]int{0, 7, 7}
			for i := range stores {
				s, obs := newCountedStoreWith(t, projection.Options{Gate: true, Memory: smallMemory})
				stores[i], observers[i] = s, obs
				delivered, dups := g.delivery(distinct, 0.1+0.3*g.rng.Float64())
				ms := g.respell(msgs(t, 1, delivered...))
				cuts := g.batches(len(ms), 500)
				start := time.Now()
				var res projection.Result
				if i == 2 {
					res = applyPipelined(t, s, ms, cuts, reacquire[i])
				} else {
					res = applyFenced(t, s, ms, cuts, reacquire[i])
				}
				t.Logf("store %d: %d messages (%d distinct, %d duplicates, %v measurements out of range) in %d batches (%d folded again): %v",
					i, len(ms), len(distinct), dups, drops, len(cuts), res.Redone, time.Since(start).Round(time.Millisecond))
				if reacquire[i] > 0 && res.Redone == 0 {
					t.Errorf("store %d: no batch was folded again; the fenced store's memory (%+v) should have missed claims or ids", i, smallMemory)
				}
				if res.Applied != len(distinct) || res.Duplicates != dups || res.DeadLettered != 0 ||
					res.Dropped != drops["attempt"]+drops["duration_ms"] {
					t.Errorf("store %d: Apply totals = %+v; want %d applied, %d duplicates, 0 dead-lettered, %d dropped",
						i, res, len(distinct), dups, drops["attempt"]+drops["duration_ms"])
				}
				if got := obs.droppedFields(); !maps.Equal(got, drops) {
					t.Errorf("store %d: fields dropped = %v; want %v (once per distinct event)", i, got, drops)
				}
				checkAgainstModel(t, s, distinct)
			}
			p0, m0 := readModel(t, stores[0])
			p1, m1 := readModel(t, stores[1])
			if d := diffRows(p1, p0, m1, m0); len(d) > 0 {
				t.Errorf("two orders of the same events give different rows (got: 2nd order, want: 1st):\n  %s", strings.Join(d, "\n  "))
			}
			p2, m2 := readModel(t, stores[2])
			if d := diffRows(p2, p0, m2, m0); len(d) > 0 {
				t.Errorf("two orders of the same events give different rows (got: 3rd order, pipelined, want: 1st):\n  %s", strings.Join(d, "\n  "))
			}
			// Applying everything once more, spelled anew, changes nothing,
			// without a fence or with one.
			ms := g.respell(msgs(t, 1_000_000, distinct...))
			res := applyAll(t, stores[0], ms, g.batches(len(ms), 500))
			if res.Applied != 0 || res.Duplicates != len(distinct) || res.Dropped != 0 {
				t.Errorf("re-apply totals = %+v; want 0 applied, %d duplicates, 0 dropped", res, len(distinct))
			}
			res = applyFenced(t, stores[1], ms, g.batches(len(ms), 500), 7)
			if res.Applied != 0 || res.Duplicates != len(distinct) || res.Dropped != 0 {
				t.Errorf("fenced re-apply totals = %+v; want 0 applied, %d duplicates, 0 dropped", res, len(distinct))
			}
			if p, m := readModel(t, stores[1]); len(diffRows(p, p0, m, m0)) > 0 {
				t.Errorf("re-applying the same events under a fence changed the rows:\n  %s", strings.Join(diffRows(p, p0, m, m0), "\n  "))
			}
			if got := observers[0].droppedFields(); !maps.Equal(got, drops) {
				t.Errorf("fields dropped after the re-apply = %v; want still %v", got, drops)
			}
			p, m := readModel(t, stores[0])
			if d := diffRows(p, p0, m, m0); len(d) > 0 {
				t.Errorf("re-applying the same events changed the rows:\n  %s", strings.Join(d, "\n  "))
			}
			for id, r := range p {
				if !r.UpdatedAt.Equal(p0[id].UpdatedAt) {
					t.Errorf("re-applying the same events touched projects %s (updated_at %v -> %v)", id, p0[id].UpdatedAt, r.UpdatedAt)
					break
				}
			}
		})
	}
}

// TestConcurrentProjectors applies disjoint shuffled slices of one history
// (with duplicates) from several goroutines at once to one store, as several
// projectors sharing the work would; the result is the model's.
func TestConcurrentProjectors(t *testing.T) {
	t.Parallel()
	const workers = 4
	g := newGenerator(42)
	distinct := g.history("c", genConfig{projects: 150, maxBuilds: 6})
	delivered, dups := g.delivery(distinct, 0.25)
	ms := g.respell(msgs(t, 1, delivered...))
	s, _ := newCountedStore(t)

	slicesOf := make([][]projection.Message, workers)
	for _, m := range ms {
		w := g.rng.IntN(workers)
		slicesOf[w] = append(slicesOf[w], m)
	}
	cuts := make([][][2]int, workers)
	for w := range workers {
		cuts[w] = g.batches(len(slicesOf[w]), 100)
	}
	var wg sync.WaitGroup
	results := make([]projection.Result, workers)
	errs := make([]error, workers)
	start := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, c := range cuts[w] {
				res, err := s.Apply(context.Background(), nil, slicesOf[w][c[0]:c[1]])
				if err != nil {
					errs[w] = fmt.Errorf("worker %d: Apply(%d..%d) = %w", w, c[0], c[1], err)
					return
				}
				results[w].Applied += res.Applied
				results[w].Duplicates += res.Duplicates
				results[w].DeadLettered += res.DeadLettered
			}
		}()
	}
	wg.Wait()
	t.Logf("%d workers, %d messages (%d distinct, %d duplicates): %v", workers, len(ms), len(distinct), dups,
		time.Since(start).Round(time.Millisecond))
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	var sum projection.Result
	for _, r := range results {
		sum.Applied += r.Applied
		sum.Duplicates += r.Duplicates
		sum.DeadLettered += r.DeadLettered
	}
	if sum.Applied != len(distinct) || sum.Duplicates != dups || sum.DeadLettered != 0 {
		t.Errorf("Apply totals = %+v; want %d applied, %d duplicates, 0 dead-lettered", sum, len(distinct), dups)
	}
	checkAgainstModel(t, s, distinct)
}
