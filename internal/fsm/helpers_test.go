package fsm_test

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
)

// t0 is the origin of the test timelines; at(n) is n seconds after it.
var t0 = time.Date(2026, 11, 26, 20, 0, 0, 0, time.UTC)

func at(sec int) time.Time { return t0.Add(time.Duration(sec) * time.Second) }

func ptr[T any](v T) *T { return &v }

// e is an event of project "p" with an explicit id.
func e(kind events.Kind, build, id string, sec int, d events.Data) events.Event {
	ev := events.New(kind, "p", build, at(sec), d)
	ev.ID = id
	return ev
}

func queued(build string, sec int) events.Event {
	return e(events.KindQueued, build, build+"-q", sec, events.Data{})
}

func started(build string, sec int) events.Event {
	return e(events.KindStarted, build, build+"-s", sec, events.Data{})
}

func metrics(build string, sec int) events.Event {
	return e(events.KindMetricsRecorded, build, build+"-m", sec, events.Data{})
}

func completed(build string, sec int, o events.Outcome) events.Event {
	return e(events.KindCompleted, build, build+"-c", sec, events.Data{Outcome: o})
}

// fold merges events, in the order given, into builds (sorted by id).
func fold(evs ...events.Event) []*fsm.Build {
	byID := map[string]*fsm.Build{}
	for _, ev := range evs {
		b := byID[ev.BuildID]
		if b == nil {
			b = &fsm.Build{ID: ev.BuildID, ProjectID: ev.ProjectID}
			byID[ev.BuildID] = b
		}
		b.Merge(ev)
	}
	out := make([]*fsm.Build, 0, len(byID))
	for _, b := range byID {
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func derive(evs ...events.Event) fsm.View { return fsm.Derive("p", fold(evs...)) }

// sameView reports whether two views hold the same rows.
func sameView(a, b fsm.View) bool {
	if !fsm.SameRow(a.Row, b.Row) || len(a.Metrics) != len(b.Metrics) {
		return false
	}
	for id, m := range a.Metrics {
		o, ok := b.Metrics[id]
		if !ok || !fsm.SameMetrics(m, o) {
			return false
		}
	}
	return true
}

func showView(v fsm.View) string {
	var sb strings.Builder
	if v.Row == nil {
		sb.WriteString("row <nil>")
	} else {
		r := v.Row
		fmt.Fprintf(&sb, "row{%s %s current=%s started=%s completed=%s framework=%s}", r.ProjectID, r.Status,
			showStr(r.CurrentBuildID), showTime(r.LastBuildStarted), showTime(r.LastBuildCompleted), showStr(r.Framework))
	}
	ids := make([]string, 0, len(v.Metrics))
	for id := range v.Metrics {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		sb.WriteString(" " + showMetrics(v.Metrics[id]))
	}
	return sb.String()
}

func showMetrics(m fsm.MetricsRow) string {
	return fmt.Sprintf("metrics{%s/%s %s queued=%s started=%s completed=%s dur=%s fw=%s node=%s pm=%s attempt=%s err=%s}",
		m.ProjectID, m.BuildID, m.Status, showTime(m.QueuedAt), showTime(&m.StartedAt), showTime(m.CompletedAt), showInt(m.DurationMS),
		showStr(m.Framework), showStr(m.NodeVersion), showStr(m.PackageManager), showInt(m.Attempt), showStr(m.Error))
}

func showStr(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}

func showInt(n *int64) string {
	if n == nil {
		return "<nil>"
	}
	return fmt.Sprint(*n)
}

// showTime prints a time as seconds after t0, the unit of the test timelines.
func showTime(t *time.Time) string {
	if t == nil {
		return "<nil>"
	}
	return fmt.Sprintf("t0%+gs", t.Sub(t0).Seconds())
}
