// Package workload generates reproducible build event histories: the input of
// `emitter load`, the benchmarks and the property tests. The same seed and
// Config always give the same events, ids included.
//
// Each project gets a run of builds, each with a realistic history (queued,
// started, metrics_recorded, completed), plus the irregularities a real fleet
// of build workers produces: lost events (no queued, no started, no
// metrics), unfinished builds, overlapping builds, corrections (the same step
// re-sent later under a new id: the "latest occurred_at wins" rule) and
// producer clock skew (completed before started). Exact duplicates are added
// on top, and the whole may be shuffled.
package workload

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/oklog/ulid/v2"

	"github.com/buildstate/buildstate/internal/events"
)

// Span is the time range the events of one workload lie in: every
// occurred_at is in [Start, Start+Span).
const Span = 24 * time.Hour

// Chances of each irregularity, per build (Config.Clean turns them all off).
const (
	pNoQueued   = 0.10 // the queued event is lost: the build is requested at its start
	pNoStarted  = 0.03 // the started event is lost (with pNoQueued: a build that is not visible)
	pNoMetrics  = 0.10 // no metrics_recorded event: no metrics row, not current
	pUnfinished = 0.10 // the history stops early: no completed, maybe no metrics or start
	pSkew       = 0.03 // the worker's clock puts completed before started
	pCorrection = 0.05 // one step is re-sent later under a new id, maybe with new data
	pOverlap    = 0.15 // the next build is queued before this one completes
)

// Config shapes a workload. The zero value of each field has a default.
type Config struct {
	// Projects is the number of projects, named ProjectPrefix + index.
	Projects int
	// BuildsPerProject is the number of builds of each project (default 3),
	// or the least number when MaxBuildsPerProject is greater.
	BuildsPerProject int
	// MaxBuildsPerProject, when greater than BuildsPerProject, gives each
	// project a number of builds drawn uniformly from
	// [BuildsPerProject, MaxBuildsPerProject].
	MaxBuildsPerProject int
	// DupRate is the number of exact duplicates (same id, same content) added,
	// as a fraction of the distinct events: 0.05 adds 5 copies per 100 events.
	// Copies are drawn with replacement, so an event may be copied twice.
	DupRate float64
	// Shuffle puts the events, duplicates included, in a random order.
	// Unshuffled, they come project by project, build by build, each build's
	// steps in lifecycle order, with the duplicates at the end.
	Shuffle bool
	// Start is the earliest occurred_at. The default, time.Now().Add(-Span)
	// truncated to the millisecond, keeps every event in the past; it also
	// makes the output depend on the clock: set Start for identical events
	// from one run to the next. A Start later than now-Span+1h gives events
	// that events.Validate refuses as occurring in the future.
	Start time.Time
	// ProjectPrefix starts every project id (default "p-"). It must keep the
	// id within ^[A-Za-z0-9_-]{1,128}$.
	ProjectPrefix string
	// Clean turns off every irregularity but duplicates and shuffling: each
	// build has its four steps, in order, once (overlapping builds aside).
	Clean bool
}

func (c Config) withDefaults() Config {
	if c.BuildsPerProject <= 0 {
		c.BuildsPerProject = 3
	}
	if c.MaxBuildsPerProject < c.BuildsPerProject {
		c.MaxBuildsPerProject = c.BuildsPerProject
	}
	if c.DupRate < 0 || math.IsNaN(c.DupRate) {
		c.DupRate = 0
	}
	if c.Start.IsZero() {
		c.Start = time.Now().Add(-Span)
	}
	c.Start = c.Start.UTC().Truncate(time.Millisecond)
	if c.ProjectPrefix == "" {
		c.ProjectPrefix = "p-"
	}
	return c
}

// Generate returns the workload of seed and cfg. Project i's histories
// depend only on (seed, i, cfg), so a workload with more projects extends
// one with fewer.
func Generate(seed int64, cfg Config) []events.Event {
	cfg = cfg.withDefaults()
	var evs []events.Event
	for i := range max(cfg.Projects, 0) {
		g := &generator{
			rng:     rand.New(rand.NewPCG(uint64(seed), uint64(i)+1)),
			cfg:     cfg,
			project: fmt.Sprintf("%s%d", cfg.ProjectPrefix, i),
		}
		evs = g.builds(evs)
	}
	// Stream 0 of the seed decides the duplicates and the order.
	rng := rand.New(rand.NewPCG(uint64(seed), 0))
	if n := len(evs); n > 0 {
		dups := int(math.Round(float64(n) * cfg.DupRate))
		for range dups {
			evs = append(evs, evs[rng.IntN(n)])
		}
	}
	if cfg.Shuffle {
		rng.Shuffle(len(evs), func(i, j int) { evs[i], evs[j] = evs[j], evs[i] })
	}
	return evs
}

// Natural returns a copy of evs without exact duplicates (a repeated id is
// kept once) in the order a single well-behaved producer would have sent
// them: by occurred_at, then lifecycle order, then project, build and id.
// Corrections (new ids) stay. Producer clock skew means a completed event may
// come before its build's start; use Config.Clean to avoid that.
func Natural(evs []events.Event) []events.Event {
	seen := make(map[string]bool, len(evs))
	out := make([]events.Event, 0, len(evs))
	for _, ev := range evs {
		if seen[ev.ID] {
			continue
		}
		seen[ev.ID] = true
		out = append(out, ev)
	}
	slices.SortFunc(out, func(a, b events.Event) int {
		return cmp.Or(
			a.OccurredAt.Compare(b.OccurredAt),
			cmp.Compare(kindRank(a.Kind()), kindRank(b.Kind())),
			cmp.Compare(a.ProjectID, b.ProjectID),
			cmp.Compare(a.BuildID, b.BuildID),
			cmp.Compare(a.ID, b.ID),
		)
	})
	return out
}

func kindRank(k events.Kind) int { return slices.Index(events.Kinds, k) }

var (
	frameworks      = []string{"nextjs", "vite", "remix", "astro", "sveltekit", "nuxt", "gatsby"}
	nodeVersions    = []string{"18.20.4", "20.17.0", "22.11.0"}
	packageManagers = []string{"npm", "pnpm", "yarn", "bun"}
	buildErrors     = []string{
		"build script exited with code 1",
		"JavaScript heap out of memory",
		"dependency install failed: ETIMEDOUT",
		"type check failed",
	}
)

// generator makes one project's events from the project's own rng.
type generator struct {
	rng     *rand.Rand
	cfg     Config
	project string
}

// chance reports true with probability p, never in a clean workload.
func (g *generator) chance(p float64) bool {
	return !g.cfg.Clean && g.rng.Float64() < p
}

// frac is a random duration between lo and hi times d, to the millisecond.
func (g *generator) frac(d time.Duration, lo, hi float64) time.Duration {
	f := lo + g.rng.Float64()*(hi-lo)
	return max(time.Duration(float64(d)*f).Truncate(time.Millisecond), time.Millisecond)
}

func pick[T any](rng *rand.Rand, xs []T) T { return xs[rng.IntN(len(xs))] }

// builds appends the project's builds to evs. Every build fits in a budget
// of at most an hour, and the builds of a project in half of Span; the first
// is queued in the first 11 hours, so everything ends before Start+Span.
func (g *generator) builds(evs []events.Event) []events.Event {
	n := g.cfg.BuildsPerProject
	if extra := g.cfg.MaxBuildsPerProject - n; extra > 0 {
		n += g.rng.IntN(extra + 1)
	}
	budget := min(time.Hour, Span/2/time.Duration(n))
	t := g.cfg.Start.Add(g.frac(11*time.Hour, 0, 1))
	for b := range n {
		build := fmt.Sprintf("%s-b%d", g.project, b+1)
		var end time.Time
		evs, end = g.build(evs, build, t, budget)
		if g.chance(pOverlap) {
			t = t.Add(g.frac(end.Sub(t), 0.05, 0.95))
		} else {
			t = end.Add(g.frac(budget, 0.05, 0.3))
		}
	}
	return evs
}

// build appends one build's history, queued at t, and returns when the build
// ended (as the worker's clock had it, before skew).
func (g *generator) build(evs []events.Event, build string, queued time.Time, budget time.Duration) ([]events.Event, time.Time) {
	started := queued.Add(g.frac(budget, 0.01, 0.05))
	metricsAt := started.Add(g.frac(budget, 0.01, 0.05))
	completed := metricsAt.Add(g.frac(budget, 0.1, 0.6))
	end := completed

	framework := pick(g.rng, frameworks)
	steps := []events.Event{}
	if !g.chance(pNoQueued) {
		steps = append(steps, g.event(events.KindQueued, build, queued, events.Data{}))
	}
	if !g.chance(pNoStarted) {
		d := events.Data{}
		if g.rng.Float64() < 0.9 {
			d.Framework = &framework
		}
		steps = append(steps, g.event(events.KindStarted, build, started, d))
	}
	// An unfinished build stops after queued, started or metrics.
	stop := len(events.Kinds)
	if g.chance(pUnfinished) {
		stop = 1 + g.rng.IntN(3)
	}
	if stop > 2 && !g.chance(pNoMetrics) {
		steps = append(steps, g.event(events.KindMetricsRecorded, build, metricsAt, g.metrics(framework)))
	}
	if stop > 3 {
		var d events.Data
		if g.chance(pSkew) {
			// At most 2s, and at most 1% of the budget: still after Start.
			completed = started.Add(-g.frac(min(2*time.Second, budget/100), 0, 1))
			d = g.completion(g.frac(budget, 0.1, 0.6))
		} else {
			d = g.completion(completed.Sub(started))
		}
		steps = append(steps, g.event(events.KindCompleted, build, completed, d))
	}
	if len(steps) > 0 && g.chance(pCorrection) {
		steps = append(steps, g.correct(pick(g.rng, steps), budget))
	}
	return append(evs, steps...), end
}

// correct re-sends ev a little later under a new id; a correction of
// metrics or of the outcome may carry new data.
func (g *generator) correct(ev events.Event, budget time.Duration) events.Event {
	at := ev.OccurredAt.Add(g.frac(budget, 0.001, 0.02))
	d := ev.Data
	switch ev.Kind() {
	case events.KindMetricsRecorded:
		d = g.metrics(pick(g.rng, frameworks))
	case events.KindCompleted:
		d = g.completion(time.Duration(g.rng.Int64N(int64(budget))))
	}
	return g.event(ev.Kind(), ev.BuildID, at, d)
}

func (g *generator) metrics(framework string) events.Data {
	node, pm := pick(g.rng, nodeVersions), pick(g.rng, packageManagers)
	attempt := int64(1)
	if g.rng.Float64() < 0.1 {
		attempt += 1 + g.rng.Int64N(2)
	}
	d := events.Data{Framework: &framework, NodeVersion: &node, PackageManager: &pm, Attempt: &attempt}
	if g.rng.Float64() < 0.05 {
		d.NodeVersion = nil
	}
	return d
}

func (g *generator) completion(took time.Duration) events.Data {
	ms := took.Milliseconds()
	d := events.Data{DurationMS: &ms}
	switch r := g.rng.Float64(); {
	case r < 0.75:
		d.Outcome = events.OutcomeSucceeded
	case r < 0.93:
		d.Outcome = events.OutcomeFailed
		msg := pick(g.rng, buildErrors)
		d.Error = &msg
	default:
		d.Outcome = events.OutcomeCanceled
		if g.rng.Float64() < 0.5 {
			d.DurationMS = nil
		}
	}
	return d
}

// event makes one event with a ULID drawn from the project's rng: its time
// part is occurred_at, its entropy comes from the seed.
func (g *generator) event(kind events.Kind, build string, at time.Time, d events.Data) events.Event {
	at = at.UTC().Truncate(time.Millisecond)
	return events.Event{
		SpecVersion: events.SpecVersion,
		ID:          ulid.MustNew(ulid.Timestamp(at), entropy{g.rng}).String(),
		Type:        kind.Type(),
		ProjectID:   g.project,
		BuildID:     build,
		OccurredAt:  at,
		Data:        d,
	}
}

// entropy reads random bytes from a seeded rng.
type entropy struct{ rng *rand.Rand }

func (e entropy) Read(p []byte) (int, error) {
	var b [8]byte
	for i := 0; i < len(p); i += 8 {
		binary.LittleEndian.PutUint64(b[:], e.rng.Uint64())
		copy(p[i:], b[:])
	}
	return len(p), nil
}
