// Package replay rebuilds the read model from the log. It reads the BUILDS
// stream from the start with ordered consumers, in big batches, into a shadow
// copy of the read model (projection.Shadow) and swaps it in (Rebuild),
// compares such a replay with the live tables (Verify), and folds one
// project's events in memory to show the project as it was at a point of the
// log (Fold, ProjectAt).
package replay

import (
	"errors"
	"fmt"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
)

// ErrOutOfOrder is returned by Fold.Add for a message whose sequence is not
// greater than the last one added: the fold's first-wins rules need stream
// order.
var ErrOutOfOrder = errors.New("message out of stream order")

// Fold is the read model of a part of the log computed in memory, with the
// projector's rules: a message is decoded with the time the log stored it
// (events.Decode); a build belongs to the project of the first event naming
// it that counts (a later event naming it under another project is refused);
// an event id counts once, at its first sequence (a later copy with the same
// content is a duplicate, one with other content is refused, and claims no
// build); the events that count fold into each build with fsm.Build.Merge
// and into rows with fsm.Derive.
//
// It holds no database and no connection: feed it messages in stream order
// with Add, read a project with View. When it is fed only one project's
// subjects (as ProjectAt does), the two cross-project rules see only that
// project's events.
type Fold struct {
	prefix  string
	lastSeq uint64
	digests map[string][32]byte              // event id -> digest of its first valid copy
	owners  map[string]string                // build id -> project of its first claim
	builds  map[string]map[string]*fsm.Build // project -> build id -> build
	last    map[string]Position              // project -> last message that counted
	counts  Counts
}

// Position is a message's place in the log.
type Position struct {
	Seq      uint64
	StoredAt time.Time
}

// Counts says what a fold did with the messages it was given.
type Counts struct {
	Applied    int // valid events seen for the first time
	Duplicates int // repeats of an event id with the same content
	Refused    int // invalid or conflicting messages (the projector's dead letters)
}

// NewFold returns an empty fold of messages published under prefix.
func NewFold(prefix string) *Fold {
	return &Fold{
		prefix:  prefix,
		digests: map[string][32]byte{},
		owners:  map[string]string{},
		builds:  map[string]map[string]*fsm.Build{},
		last:    map[string]Position{},
	}
}

// Add folds one message in. It returns whether the message counted as a new
// event, nil for a duplicate, an error matching events.ErrInvalid (with its
// events.Reason) for a message the projector would dead-letter, and
// ErrOutOfOrder for a sequence not after the previous one.
func (f *Fold) Add(seq uint64, subject string, data []byte, storedAt time.Time) (bool, error) {
	if seq <= f.lastSeq {
		return false, fmt.Errorf("%w: %d after %d", ErrOutOfOrder, seq, f.lastSeq)
	}
	f.lastSeq = seq
	ev, err := events.Decode(f.prefix, subject, data, storedAt)
	if err != nil {
		f.counts.Refused++
		return false, err
	}
	// As the projector does, event by event: a build named under another
	// project than the one that claimed it is refused; then a repeated id is
	// a duplicate or a conflict; only an event that counts claims its build.
	owner, claimed := f.owners[ev.BuildID]
	if claimed && owner != ev.ProjectID {
		f.counts.Refused++
		return false, events.Conflict(events.ReasonBuildProjectClash, "build %q belongs to project %q, not %q", ev.BuildID, owner, ev.ProjectID)
	}
	d := ev.Digest()
	if prev, ok := f.digests[ev.ID]; ok {
		if prev == d {
			f.counts.Duplicates++
			return false, nil
		}
		f.counts.Refused++
		return false, events.Conflict(events.ReasonIDConflict, "id %q was seen earlier in the log with different content", ev.ID)
	}
	f.digests[ev.ID] = d
	if !claimed {
		f.owners[ev.BuildID] = ev.ProjectID
	}
	bs := f.builds[ev.ProjectID]
	if bs == nil {
		bs = map[string]*fsm.Build{}
		f.builds[ev.ProjectID] = bs
	}
	b := bs[ev.BuildID]
	if b == nil {
		b = &fsm.Build{ID: ev.BuildID, ProjectID: ev.ProjectID}
		bs[ev.BuildID] = b
	}
	b.Merge(ev)
	f.last[ev.ProjectID] = Position{Seq: seq, StoredAt: storedAt}
	f.counts.Applied++
	return true, nil
}

// View is what the read model holds for project after the messages added so
// far: its row (nil while it has no visible build) and its metrics rows.
func (f *Fold) View(project string) fsm.View {
	bs := f.builds[project]
	list := make([]*fsm.Build, 0, len(bs))
	for _, b := range bs {
		list = append(list, b)
	}
	return fsm.Derive(project, list)
}

// Last is the last message that counted for project (the zero Position if none).
func (f *Fold) Last(project string) Position { return f.last[project] }

// LastSeq is the sequence of the last message added.
func (f *Fold) LastSeq() uint64 { return f.lastSeq }

// Counts says what the fold did so far.
func (f *Fold) Counts() Counts { return f.counts }

// Projects lists the projects with at least one counted event, in no order.
func (f *Fold) Projects() []string {
	out := make([]string, 0, len(f.builds))
	for p := range f.builds {
		out = append(out, p)
	}
	return out
}
