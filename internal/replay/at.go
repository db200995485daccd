package replay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
	"github.com/buildstate/buildstate/internal/projection"
)

// At is a point of the log: the messages up to stream sequence Seq, or those
// stored at or before Time. The zero value is the end of the log.
type At struct {
	Seq  uint64
	Time time.Time
}

// ProjectView is a project as it was at a point of the log.
type ProjectView struct {
	View    fsm.View
	Last    Position // the project's last event that counted (zero if none)
	Through uint64   // the point's sequence bound: the stream's last sequence, or At.Seq
	Counts  Counts   // what the fold did with the project's messages
	History History  // the stream when it was read
}

// ProjectAt replays only project's messages (an ordered consumer filtered on
// <prefix>.<project>.*) up to the point at, and folds them in memory with
// Fold. It needs no database. A stream whose history is not whole still
// answers; ProjectView.History tells (History.Whole).
//
// Two rules look beyond one project (a build id claimed by another project
// first, an event id used by another project first); the fold sees only
// this project's messages, so in those rare conflicts it may count an event
// that the projector refused.
func ProjectAt(ctx context.Context, log Log, project string, at At) (ProjectView, error) {
	if !events.ValidProjectID(project) {
		return ProjectView{}, fmt.Errorf("project id %q must match ^[A-Za-z0-9_-]{1,128}$", project)
	}
	h, err := log.History(ctx)
	if err != nil {
		return ProjectView{}, err
	}
	to := h.Last
	if at.Seq > 0 {
		to = min(at.Seq, h.Last)
	}
	f := NewFold(log.Prefix)
	span := Span{Filters: log.Layout.ProjectSubjects(log.Prefix, project, log.Former...), To: to, Until: at.Time, Batch: 1000}
	err = log.Read(ctx, span, func(msgs []projection.Message) error {
		for _, m := range msgs {
			if _, err := f.Add(m.Seq, m.Subject, m.Data, m.StoredAt); err != nil && !errors.Is(err, events.ErrInvalid) {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return ProjectView{}, err
	}
	return ProjectView{View: f.View(project), Last: f.Last(project), Through: to, Counts: f.Counts(), History: h}, nil
}
