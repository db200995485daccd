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
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
	"github.com/buildstate/buildstate/internal/projection"
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
	prefix   string
	lastSeq  uint64
	ids      map[string]mark                  // event id -> its first valid copy
	builds   map[string]*projection.BulkBuild // build id -> build, under the project of its first claim
	projects map[string]*foldProject          // project -> its builds and last position
	refused  []projection.Refusal             // the messages the projector would dead-letter
	counts   Counts
}

// mark is the first valid copy of an event id.
type mark struct {
	digest [32]byte
	seq    uint64
}

type foldProject struct {
	bulk projection.BulkProject
	last Position
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
		prefix:   prefix,
		ids:      map[string]mark{},
		builds:   map[string]*projection.BulkBuild{},
		projects: map[string]*foldProject{},
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
	m := projection.Message{Seq: seq, Subject: subject, Data: data, StoredAt: storedAt}
	ev, err := events.Decode(f.prefix, subject, data, storedAt)
	return f.add(m, ev, err)
}

// AddBatch folds msgs in, in order, decoding them on up to GOMAXPROCS
// goroutines first. Messages the projector would dead-letter are kept
// (Bulk.Dead); it fails only with ErrOutOfOrder.
func (f *Fold) AddBatch(msgs []projection.Message) error {
	decoded := make([]decoded, len(msgs))
	workers := min(runtime.GOMAXPROCS(0), max(1, len(msgs)/256))
	chunk := (len(msgs) + workers - 1) / workers
	var wg sync.WaitGroup
	for lo := 0; lo < len(msgs); lo += chunk {
		hi := min(len(msgs), lo+chunk)
		wg.Go(func() {
			for i := lo; i < hi; i++ {
				m := msgs[i]
				decoded[i].ev, decoded[i].err = events.Decode(f.prefix, m.Subject, m.Data, m.StoredAt)
			}
		})
	}
	wg.Wait()
	for i, m := range msgs {
		if m.Seq <= f.lastSeq {
			return fmt.Errorf("%w: %d after %d", ErrOutOfOrder, m.Seq, f.lastSeq)
		}
		_, _ = f.add(m, decoded[i].ev, decoded[i].err)
	}
	return nil
}

type decoded struct {
	ev  events.Event
	err error
}

// add folds in message m, decoded as ev or refused with err by Decode.
func (f *Fold) add(m projection.Message, ev events.Event, err error) (bool, error) {
	f.lastSeq = m.Seq
	if err != nil {
		return false, f.refuse(m, err)
	}
	// As the projector does, event by event: a build named under another
	// project than the one that claimed it is refused; then a repeated id is
	// a duplicate or a conflict; only an event that counts claims its build.
	b, claimed := f.builds[ev.BuildID]
	if claimed && b.ProjectID != ev.ProjectID {
		return false, f.refuse(m, events.Conflict(events.ReasonBuildProjectClash,
			"build %q belongs to project %q, not %q", ev.BuildID, b.ProjectID, ev.ProjectID))
	}
	d := ev.Digest()
	if prev, ok := f.ids[ev.ID]; ok {
		if prev.digest == d {
			f.counts.Duplicates++
			return false, nil
		}
		return false, f.refuse(m, events.Conflict(events.ReasonIDConflict,
			"id %q was applied before with different content", ev.ID))
	}
	f.ids[ev.ID] = mark{digest: d, seq: m.Seq}
	p := f.projects[ev.ProjectID]
	if p == nil {
		p = &foldProject{bulk: projection.BulkProject{ID: ev.ProjectID}}
		f.projects[ev.ProjectID] = p
	}
	if !claimed {
		b = &projection.BulkBuild{Build: fsm.Build{ID: ev.BuildID, ProjectID: p.bulk.ID}}
		f.builds[ev.BuildID] = b
		p.bulk.Builds = append(p.bulk.Builds, b)
	}
	if b.Merge(ev) {
		b.Seqs[projection.KindSlot(ev.Kind())] = m.Seq
	}
	p.last = Position{Seq: m.Seq, StoredAt: m.StoredAt}
	f.counts.Applied++
	return true, nil
}

func (f *Fold) refuse(m projection.Message, err error) error {
	f.counts.Refused++
	f.refused = append(f.refused, projection.RefusalOf(m, err))
	return err
}

// View is what the read model holds for project after the messages added so
// far: its row (nil while it has no visible build) and its metrics rows.
func (f *Fold) View(project string) fsm.View {
	p := f.projects[project]
	if p == nil {
		return fsm.Derive(project, nil)
	}
	list := make([]*fsm.Build, len(p.bulk.Builds))
	for i, b := range p.bulk.Builds {
		list[i] = &b.Build
	}
	return fsm.Derive(project, list)
}

// Last is the last message that counted for project (the zero Position if none).
func (f *Fold) Last(project string) Position {
	if p := f.projects[project]; p != nil {
		return p.last
	}
	return Position{}
}

// LastSeq is the sequence of the last message added.
func (f *Fold) LastSeq() uint64 { return f.lastSeq }

// Counts says what the fold did so far.
func (f *Fold) Counts() Counts { return f.counts }

// Projects lists the projects with at least one counted event, in no order.
func (f *Fold) Projects() []string {
	out := make([]string, 0, len(f.projects))
	for p := range f.projects {
		out = append(out, p)
	}
	return out
}

// Bulk is the fold's read model as rows for projection.Shadow.Load. The
// fold must not change while they are read; they may be read by several
// goroutines at once.
func (f *Fold) Bulk() projection.Bulk {
	return projection.Bulk{
		Projects: func(yield func(*projection.BulkProject) bool) {
			for _, p := range f.projects {
				if !yield(&p.bulk) {
					return
				}
			}
		},
		Applied: func(yield func(projection.Applied) bool) {
			for id, m := range f.ids {
				if !yield(projection.Applied{EventID: id, Digest: m.digest, Seq: m.seq}) {
					return
				}
			}
		},
		Dead: slices.Values(f.refused),
	}
}
