package projector

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
)

// DefaultStuckEvery is how often `projector run` counts the stuck builds
// (and, with TimeOutStuck, times them out).
const DefaultStuckEvery = time.Minute

// timeOut is the time-out of stuck build b under l.
func timeOut(l projection.StuckLimits, b projection.StuckBuild) events.TimeOut {
	t := events.TimeOut{ProjectID: b.ProjectID, BuildID: b.BuildID, Since: b.Since, After: l.QueuedFor}
	if b.State == projection.StuckBuilding {
		t.Started, t.After = true, l.BuildingFor
	}
	return t
}

// TimedOut is a time-out published for a stuck build.
type TimedOut struct {
	Build   projection.StuckBuild
	EventID string
	Seq     uint64 // stream sequence of the stored copy (an earlier one, if JetStream had it already)
}

// PublishTimeOuts publishes, through pub, the time-out completion of each
// build (events.TimeOut.Event): the same build and limits give the same
// event, so publishing again, or from another process, stores nothing new.
// It stops at the first error and returns what it published before it.
func PublishTimeOuts(ctx context.Context, pub *emitter.Publisher, l projection.StuckLimits, builds []projection.StuckBuild) ([]TimedOut, error) {
	var out []TimedOut
	for _, b := range builds {
		ev := timeOut(l, b).Event()
		seq, err := pub.Publish(ctx, ev)
		if err != nil {
			return out, fmt.Errorf("time out build %s of %s: %w", b.BuildID, b.ProjectID, err)
		}
		out = append(out, TimedOut{Build: b, EventID: ev.ID, Seq: seq})
	}
	return out, nil
}

// watchStuck counts the stuck builds into the gauge every interval (the
// first time at once) and, if pub is not nil, times them out. It returns
// when ctx is done.
func watchStuck(ctx context.Context, store *projection.Store, pub *emitter.Publisher, l projection.StuckLimits, every time.Duration, tel *Telemetry, log *zap.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if err := checkStuck(ctx, store, pub, l, tel, log); err != nil && ctx.Err() == nil {
			log.Warn("stuck builds", zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func checkStuck(ctx context.Context, store *projection.Store, pub *emitter.Publisher, l projection.StuckLimits, tel *Telemetry, log *zap.Logger) error {
	stuck, err := store.Stuck(ctx, l, time.Now())
	if err != nil {
		return err
	}
	n := map[string]int{projection.StuckQueued: 0, projection.StuckBuilding: 0}
	for _, b := range stuck {
		n[b.State]++
	}
	for state, c := range n {
		tel.Stuck.WithLabelValues(state).Set(float64(c))
	}
	if pub == nil || len(stuck) == 0 {
		return nil
	}
	done, err := PublishTimeOuts(ctx, pub, l, stuck)
	for _, d := range done {
		log.Info("timed out a stuck build", zap.String("build", d.Build.BuildID), zap.String("project", d.Build.ProjectID),
			zap.String("state", d.Build.State), zap.Time("since", d.Build.Since), zap.String("event", d.EventID), zap.Uint64("seq", d.Seq))
	}
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return nil
	}
	return err
}
