package fsm_test

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
)

// row is a projects row of project "p" for the Derive table.
func row(s fsm.Status, current *string, started, completed *time.Time, framework *string) *fsm.Row {
	return &fsm.Row{ProjectID: "p", Status: s, CurrentBuildID: current, LastBuildStarted: started,
		LastBuildCompleted: completed, Framework: framework}
}

func tp(sec int) *time.Time { return ptr(at(sec)) }

// mrow is a metrics row of project "p"; change sets the other columns.
func mrow(build, status string, queuedAt *time.Time, startedAt int, completedAt *time.Time, change ...func(*fsm.MetricsRow)) fsm.MetricsRow {
	m := fsm.MetricsRow{BuildID: build, ProjectID: "p", Status: status, QueuedAt: queuedAt, StartedAt: at(startedAt), CompletedAt: completedAt}
	for _, c := range change {
		c(&m)
	}
	return m
}

func metricsOf(rows ...fsm.MetricsRow) map[string]fsm.MetricsRow {
	out := map[string]fsm.MetricsRow{}
	for _, m := range rows {
		out[m.BuildID] = m
	}
	return out
}

func TestDerive(t *testing.T) {
	t.Parallel()
	ok, failed, canceled := events.OutcomeSucceeded, events.OutcomeFailed, events.OutcomeCanceled
	fw := func(s string) events.Data { return events.Data{Framework: ptr(s)} }
	tests := []struct {
		name string
		evs  []events.Event
		want fsm.View
	}{
		{"nothing", nil, fsm.View{}},

		// Per build and event type, the latest occurred_at counts; ties to the greater id.
		{"latest occurred_at wins", []events.Event{
			e(events.KindStarted, "b1", "s-late", 20, fw("astro")), e(events.KindStarted, "b1", "s-early", 10, fw("nextjs")),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(20), nil, ptr("astro"))}},
		{"latest occurred_at wins whatever the id", []events.Event{
			e(events.KindStarted, "b1", "z-early", 10, fw("nextjs")), e(events.KindStarted, "b1", "a-late", 20, fw("astro")),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(20), nil, ptr("astro"))}},
		{"tie to the greater id (byte order)", []events.Event{
			e(events.KindStarted, "b1", "b", 10, fw("lower-b")), e(events.KindStarted, "b1", "B", 10, fw("upper-B")),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(10), nil, ptr("lower-b"))}},
		{"tie to the greater id, other arrival order", []events.Event{
			e(events.KindStarted, "b1", "B", 10, fw("upper-B")), e(events.KindStarted, "b1", "b", 10, fw("lower-b")),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(10), nil, ptr("lower-b"))}},
		{"corrected outcome", []events.Event{
			queued("b1", 0), e(events.KindCompleted, "b1", "c2", 70, events.Data{Outcome: failed}), completed("b1", 60, ok),
		}, fsm.View{Row: row(fsm.StatusFailed, nil, nil, nil, nil)}},

		// Visibility and the newest build.
		{"queued only", []events.Event{queued("b1", 0)}, fsm.View{Row: row(fsm.StatusQueued, nil, nil, nil, nil)}},
		{"requested at queued time even if started earlier", []events.Event{
			queued("b1", 50), started("b1", 5), queued("b2", 30), started("b2", 40),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(5), nil, nil)}},
		{"requested at started time without queued", []events.Event{
			queued("b1", 0), started("b2", 10),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(10), nil, nil)}},
		{"requested time tie to the greater build_id", []events.Event{
			queued("b2", 0), queued("b1", 0), started("b1", 10),
		}, fsm.View{Row: row(fsm.StatusQueued, nil, tp(10), nil, nil)}},
		{"invisible build with only metrics", []events.Event{metrics("b1", 30)},
			fsm.View{Metrics: metricsOf(mrow("b1", "building", nil, 30, nil))}},
		{"invisible build with metrics and completion", []events.Event{metrics("b1", 30), completed("b1", 40, ok)},
			fsm.View{Metrics: metricsOf(mrow("b1", "succeeded", nil, 30, tp(40)))}},
		{"invisible build with only completion", []events.Event{completed("b1", 40, ok)}, fsm.View{}},
		{"invisible newer build does not count", []events.Event{
			queued("b1", 0), started("b1", 10), metrics("b2", 100), completed("b2", 110, failed),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(10), nil, nil),
			Metrics: metricsOf(mrow("b2", "failed", nil, 100, tp(110)))}},

		// build_status of the newest build.
		{"building", []events.Event{queued("b1", 0), started("b1", 10)}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(10), nil, nil)}},
		{"deployed", []events.Event{queued("b1", 0), started("b1", 10), completed("b1", 20, ok)},
			fsm.View{Row: row(fsm.StatusDeployed, nil, tp(10), tp(20), nil)}},
		{"failed", []events.Event{queued("b1", 0), started("b1", 10), completed("b1", 20, failed)},
			fsm.View{Row: row(fsm.StatusFailed, nil, tp(10), tp(20), nil)}},
		{"canceled while queued", []events.Event{queued("b1", 0), completed("b1", 20, canceled)},
			fsm.View{Row: row(fsm.StatusCanceled, nil, nil, nil, nil)}},
		{"newer build resets a finished project", []events.Event{
			queued("b1", 0), started("b1", 10), completed("b1", 20, ok), queued("b2", 30),
		}, fsm.View{Row: row(fsm.StatusQueued, nil, tp(10), tp(20), nil)}},

		// last_build_started and last_build_completed.
		{"last started from the newest build that has a start", []events.Event{
			queued("b1", 0), started("b1", 10), completed("b1", 20, failed), queued("b2", 30), queued("b3", 40),
		}, fsm.View{Row: row(fsm.StatusQueued, nil, tp(10), tp(20), nil)}},
		{"last completed NULL while the started build has none", []events.Event{
			queued("b1", 0), started("b1", 10), completed("b1", 20, ok), queued("b2", 30), started("b2", 40),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(40), nil, nil)}},
		{"last completed raised to last started (skew)", []events.Event{
			queued("b1", 0), started("b1", 10), completed("b1", 5, ok),
		}, fsm.View{Row: row(fsm.StatusDeployed, nil, tp(10), tp(10), nil)}},
		{"completed of a build without start is not the last completed", []events.Event{
			queued("b1", 0), started("b1", 10), queued("b2", 30), completed("b2", 40, canceled),
		}, fsm.View{Row: row(fsm.StatusCanceled, nil, tp(10), nil, nil)}},
		{"older build started later does not count", []events.Event{
			queued("b1", 0), started("b1", 100), queued("b2", 30), started("b2", 40),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(40), nil, nil)}},

		// current_build_id.
		{"current is the newest visible build with metrics", []events.Event{
			queued("b1", 0), started("b1", 10), metrics("b1", 15), queued("b2", 30), started("b2", 40),
		}, fsm.View{Row: row(fsm.StatusBuilding, ptr("b1"), tp(40), nil, nil),
			Metrics: metricsOf(mrow("b1", "building", tp(0), 10, nil))}},
		{"current NULL without metrics", []events.Event{queued("b1", 0), started("b1", 10), completed("b1", 20, ok)},
			fsm.View{Row: row(fsm.StatusDeployed, nil, tp(10), tp(20), nil)}},
		{"current skips an invisible build's metrics", []events.Event{
			queued("b1", 0), metrics("b1", 5), metrics("b2", 50),
		}, fsm.View{Row: row(fsm.StatusQueued, ptr("b1"), nil, nil, nil),
			Metrics: metricsOf(mrow("b1", "building", tp(0), 5, nil), mrow("b2", "building", nil, 50, nil))}},
		{"current moves to the newer build once it has metrics", []events.Event{
			queued("b1", 0), metrics("b1", 5), started("b2", 40), metrics("b2", 45),
		}, fsm.View{Row: row(fsm.StatusBuilding, ptr("b2"), tp(40), nil, nil),
			Metrics: metricsOf(mrow("b1", "building", tp(0), 5, nil), mrow("b2", "building", nil, 40, nil))}},

		// project_build_metrics.
		{"metrics started_at falls back to the metrics time", []events.Event{queued("b1", 0), metrics("b1", 25)},
			fsm.View{Row: row(fsm.StatusQueued, ptr("b1"), nil, nil, nil), Metrics: metricsOf(mrow("b1", "building", tp(0), 25, nil))}},
		{"metrics started_at is the started time", []events.Event{started("b1", 10), metrics("b1", 25)},
			fsm.View{Row: row(fsm.StatusBuilding, ptr("b1"), tp(10), nil, nil), Metrics: metricsOf(mrow("b1", "building", nil, 10, nil))}},
		{"metrics completed_at raised to started_at", []events.Event{started("b1", 10), metrics("b1", 25), completed("b1", 3, failed)},
			fsm.View{Row: row(fsm.StatusFailed, ptr("b1"), tp(10), tp(10), nil), Metrics: metricsOf(mrow("b1", "failed", nil, 10, tp(10)))}},
		{"metrics completed_at raised to the metrics time without start", []events.Event{
			queued("b1", 0), metrics("b1", 25), completed("b1", 20, ok),
		}, fsm.View{Row: row(fsm.StatusDeployed, ptr("b1"), nil, nil, nil), Metrics: metricsOf(mrow("b1", "succeeded", tp(0), 25, tp(25)))}},
		{"metrics columns from the events' data", []events.Event{
			queued("b1", 0),
			e(events.KindStarted, "b1", "s", 10, fw("nextjs")),
			e(events.KindMetricsRecorded, "b1", "m", 20, events.Data{NodeVersion: ptr("22"), PackageManager: ptr("pnpm"), Attempt: ptr(int64(2))}),
			e(events.KindCompleted, "b1", "c", 80, events.Data{Outcome: failed, DurationMS: ptr(int64(70000)), Error: ptr("exit 1")}),
		}, fsm.View{Row: row(fsm.StatusFailed, ptr("b1"), tp(10), tp(80), ptr("nextjs")),
			Metrics: metricsOf(mrow("b1", "failed", tp(0), 10, tp(80), func(m *fsm.MetricsRow) {
				m.Framework, m.NodeVersion, m.PackageManager = ptr("nextjs"), ptr("22"), ptr("pnpm")
				m.Attempt, m.DurationMS, m.Error = ptr(int64(2)), ptr(int64(70000)), ptr("exit 1")
			}))}},
		{"metrics framework wins over started framework", []events.Event{
			e(events.KindStarted, "b1", "s", 10, fw("nextjs")), e(events.KindMetricsRecorded, "b1", "m", 20, fw("astro")),
		}, fsm.View{Row: row(fsm.StatusBuilding, ptr("b1"), tp(10), nil, ptr("astro")),
			Metrics: metricsOf(mrow("b1", "building", nil, 10, nil, func(m *fsm.MetricsRow) { m.Framework = ptr("astro") }))}},

		// projects.framework (not in §2; the code's rule): the newest visible build that reports one.
		{"framework from the newest build that has one", []events.Event{
			e(events.KindStarted, "b1", "s1", 10, fw("nextjs")), e(events.KindStarted, "b2", "s2", 20, events.Data{}),
		}, fsm.View{Row: row(fsm.StatusBuilding, nil, tp(20), nil, ptr("nextjs"))}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.want.Metrics == nil {
				tt.want.Metrics = map[string]fsm.MetricsRow{}
			}
			got := derive(tt.evs...)
			if !sameView(got, tt.want) {
				t.Errorf("Derive(%v) =\n  %s\nwant\n  %s", showEvents(tt.evs), showView(got), showView(tt.want))
			}
			// Any arrival order of the same events gives the same view.
			rng := rand.New(rand.NewPCG(uint64(len(tt.evs)), 7))
			for range 20 {
				evs := slices.Clone(tt.evs)
				rng.Shuffle(len(evs), func(i, j int) { evs[i], evs[j] = evs[j], evs[i] })
				builds := fold(evs...)
				rng.Shuffle(len(builds), func(i, j int) { builds[i], builds[j] = builds[j], builds[i] })
				if got := fsm.Derive("p", builds); !sameView(got, tt.want) {
					t.Fatalf("Derive(%v) =\n  %s\nwant\n  %s", showEvents(evs), showView(got), showView(tt.want))
				}
			}
		})
	}
}

func TestMergeReportsWins(t *testing.T) {
	t.Parallel()
	b := &fsm.Build{ID: "b1", ProjectID: "p"}
	steps := []struct {
		ev   events.Event
		wins bool
	}{
		{started("b1", 10), true},
		{started("b1", 10), false},                                      // the same event again
		{e(events.KindStarted, "b1", "b1-r", 10, events.Data{}), false}, // tie, smaller id ("b1-r" < "b1-s")
		{e(events.KindStarted, "b1", "b1-t", 10, events.Data{}), true},  // tie, greater id
		{e(events.KindStarted, "b1", "zz", 9, events.Data{}), false},    // older
		{e(events.KindStarted, "b1", "a", 11, events.Data{}), true},     // newer
		{queued("b1", 0), true},                                         // another slot
	}
	for i, st := range steps {
		if got := b.Merge(st.ev); got != st.wins {
			t.Errorf("step %d: Merge(%s at %v) = %v; want %v", i, st.ev.ID, st.ev.OccurredAt, got, st.wins)
		}
	}
	if b.Started.EventID != "a" || b.Queued.EventID != "b1-q" {
		t.Errorf("winners = %s, %s; want a, b1-q", b.Started.EventID, b.Queued.EventID)
	}
}

// TestWinnerRuleWithTimeOuts is the contract's winner rule for completions
// with data.timed_out: such a completion loses to any without it, whatever
// their times and ids; among completions of one kind (both time-outs, or
// neither) the later occurred_at wins, ties to the greater id. Each pair is
// merged in both orders: the winner does not depend on arrival.
func TestWinnerRuleWithTimeOuts(t *testing.T) {
	t.Parallel()
	c := func(id string, sec int, timedOut bool) events.Event {
		o := events.OutcomeSucceeded
		if timedOut {
			o = events.OutcomeFailed
		}
		return e(events.KindCompleted, "b1", id, sec, events.Data{Outcome: o, TimedOut: timedOut})
	}
	for _, tc := range []struct {
		name string
		a, b events.Event
		want string // the winning id
	}{
		{"real later beats time-out", c("real", 20, false), c("timeout", 10, true), "real"},
		{"real earlier beats time-out", c("real", 5, false), c("timeout", 10, true), "real"},
		{"real with smaller id at the same time beats time-out", c("a", 10, false), c("z", 10, true), "a"},
		{"two time-outs: the later", c("t1", 10, true), c("t2", 20, true), "t2"},
		{"two time-outs at one time: the greater id", c("t2", 10, true), c("t1", 10, true), "t2"},
		{"two real: the later", c("r1", 30, false), c("r2", 20, false), "r1"},
		{"two real at one time: the greater id", c("r1", 10, false), c("r2", 10, false), "r2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			for _, order := range [][2]events.Event{{tc.a, tc.b}, {tc.b, tc.a}} {
				b := &fsm.Build{ID: "b1", ProjectID: "p"}
				b.Merge(order[0])
				b.Merge(order[1])
				if got := b.Completed.EventID; got != tc.want {
					t.Errorf("Merge(%s), Merge(%s): winner %s; want %s", order[0].ID, order[1].ID, got, tc.want)
				}
			}
		})
	}
	// A build that timed out and then completed for real takes the real outcome.
	b := &fsm.Build{ID: "b1", ProjectID: "p"}
	for _, ev := range []events.Event{queued("b1", 0), started("b1", 1), c("timeout", 10800, true), c("real", 20000, false)} {
		b.Merge(ev)
	}
	v := fsm.Derive("p", []*fsm.Build{b})
	if v.Row == nil || v.Row.Status != fsm.StatusDeployed {
		t.Errorf("Derive after a time-out and a late real completion = %+v; want deployed", v.Row)
	}
}
