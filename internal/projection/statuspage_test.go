package projection_test

import (
	"context"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
)

func TestStuckCounts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t, projection.Options{})
	now := time.Now()
	ago := func(d time.Duration) time.Time { return now.Add(-d) }
	canceled := events.Data{Outcome: events.OutcomeCanceled}
	evs := []events.Event{
		events.New(events.KindQueued, "p-1", "queued-2h", ago(2*time.Hour), events.Data{}),             // stuck queued
		events.New(events.KindQueued, "p-2", "queued-30m", ago(30*time.Minute), events.Data{}),         // not yet
		events.New(events.KindQueued, "p-3", "started-2h", ago(2*time.Hour), events.Data{}),            // started, under 3 h
		events.New(events.KindStarted, "p-3", "started-2h", ago(2*time.Hour), events.Data{}),           //
		events.New(events.KindStarted, "p-4", "started-4h", ago(4*time.Hour), events.Data{}),           // stuck started
		events.New(events.KindStarted, "p-5", "done-4h", ago(4*time.Hour), events.Data{}),              // completed
		events.New(events.KindCompleted, "p-5", "done-4h", ago(3*time.Hour), canceled),                 //
		events.New(events.KindQueued, "p-6", "canceled-in-queue", ago(2*time.Hour), events.Data{}),     // completed, never started
		events.New(events.KindCompleted, "p-6", "canceled-in-queue", ago(90*time.Minute), canceled),    //
		events.New(events.KindMetricsRecorded, "p-7", "metrics-only", ago(5*time.Hour), events.Data{}), // neither queued nor started
	}
	if _, err := s.Apply(ctx, nil, msgs(t, 1, evs...)); err != nil {
		t.Fatal(err)
	}
	got, err := s.StuckCounts(ctx, projection.DefaultStuckLimits, now)
	if err != nil {
		t.Fatal(err)
	}
	if want := (projection.StuckCounts{Queued: 1, Started: 1}); got != want {
		t.Errorf("StuckCounts = %+v; want %+v", got, want)
	}
	if got.Total() != 2 {
		t.Errorf("Total = %d; want 2", got.Total())
	}
	// Three hours on, the build queued 30 min ago and the one started 2 h ago are stuck too.
	later, err := s.StuckCounts(ctx, projection.DefaultStuckLimits, now.Add(3*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if want := (projection.StuckCounts{Queued: 2, Started: 2}); later != want {
		t.Errorf("StuckCounts(+3h) = %+v; want %+v", later, want)
	}
}
