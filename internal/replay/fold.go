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
	"hash/maphash"
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
	seed     [2]maphash.Seed
	ids      map[idKey]idDigest               // event id -> digest of its first valid copy, both cut to 128 bits
	builds   map[string]*projection.BulkBuild // build id -> build, under the project of its first claim
	projects map[string]*foldProject          // project -> its builds and last position
	refused  []projection.Refusal             // the messages the projector would dead-letter
	interned map[string]*string               // one copy of each framework, node version, package manager
	counts   Counts

	// Applied, if set, is called with each event id that counts, at its
	// first sequence, in stream order: the projector_applied rows, final
	// as soon as they are made (a bulk replay streams them to the shadow
	// while it reads the log).
	Applied func(projection.Applied)
}

// maxInterned bounds Fold.interned: past it, values are kept as decoded.
const maxInterned = 4096

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
		seed:     [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()},
		ids:      map[idKey]idDigest{},
		builds:   map[string]*projection.BulkBuild{},
		projects: map[string]*foldProject{},
		interned: map[string]*string{},
	}
}

// intern returns the fold's copy of *s: the few frameworks, node versions
// and package managers repeat across a log's events, so the builds share
// them instead of holding a copy each.
func (f *Fold) intern(s *string) *string {
	if s == nil {
		return nil
	}
	if c, ok := f.interned[*s]; ok {
		return c
	}
	if len(f.interned) < maxInterned {
		f.interned[*s] = s
	}
	return s
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
	var d decoded
	d.decode(f, m)
	return f.add(m, d)
}

// AddBatch folds msgs in, in order: AddDecoded(Decode(msgs, Decoded{})).
func (f *Fold) AddBatch(msgs []projection.Message) error {
	return f.AddDecoded(f.Decode(msgs, Decoded{}))
}

// Decoded is a batch of messages decoded by Fold.Decode.
type Decoded struct {
	msgs []projection.Message
	dec  []decoded
}

// Len is the number of messages in the batch.
func (b Decoded) Len() int { return len(b.msgs) }

// Decode decodes msgs on up to GOMAXPROCS goroutines, into reuse's memory
// when it has room (a batch already folded in; zero for none). It reads no
// state of the fold that folding changes, so the next batch may be decoded
// while this one is folded in.
func (f *Fold) Decode(msgs []projection.Message, reuse Decoded) Decoded {
	b := Decoded{msgs: msgs, dec: reuse.dec[:0]}
	if cap(b.dec) < len(msgs) {
		b.dec = make([]decoded, len(msgs))
	}
	b.dec = b.dec[:len(msgs)]
	workers := min(runtime.GOMAXPROCS(0), max(1, len(msgs)/256))
	chunk := (len(msgs) + workers - 1) / workers
	var wg sync.WaitGroup
	for lo := 0; lo < len(msgs); lo += chunk {
		hi := min(len(msgs), lo+chunk)
		wg.Go(func() {
			for i := lo; i < hi; i++ {
				b.dec[i].decode(f, msgs[i])
			}
		})
	}
	wg.Wait()
	return b
}

// AddDecoded folds a decoded batch in, in order. Messages the projector
// would dead-letter are kept (Bulk.Dead); it fails only with ErrOutOfOrder,
// or after Seal.
func (f *Fold) AddDecoded(b Decoded) error {
	for i, m := range b.msgs {
		if m.Seq <= f.lastSeq {
			return fmt.Errorf("%w: %d after %d", ErrOutOfOrder, m.Seq, f.lastSeq)
		}
		if _, err := f.add(m, b.dec[i]); errors.Is(err, errSealed) {
			return err
		}
	}
	return nil
}

// idKey and idDigest are what the fold keeps of each event id: a 128-bit
// hash of the id (two seeded maphashes) and the first 128 bits of the
// digest of its first copy. Neither holds a pointer, so the garbage
// collector never scans the map, the biggest thing a fold of a long log
// holds; a collision of either among a log's ids is as unlikely as one of
// two random 128-bit numbers (~10^-26 for 10^6 ids). The full digest goes
// to projector_applied when the id is first seen (Fold.Applied).
type (
	idKey    [2]uint64
	idDigest [16]byte
)

// decoded is a message decoded, with its event's digest and id key, or
// refused.
type decoded struct {
	ev     events.Event
	digest [32]byte
	key    idKey
	err    error
}

func (d *decoded) decode(f *Fold, m projection.Message) {
	d.ev, d.err = events.Decode(f.prefix, m.Subject, m.Data, m.StoredAt)
	if d.err == nil {
		d.digest = d.ev.Digest()
		d.key = idKey{maphash.String(f.seed[0], d.ev.ID), maphash.String(f.seed[1], d.ev.ID)}
	}
}

// add folds in message m, decoded as dec.
func (f *Fold) add(m projection.Message, dec decoded) (bool, error) {
	if f.ids == nil {
		return false, errSealed
	}
	f.lastSeq = m.Seq
	if dec.err != nil {
		return false, f.refuse(m, dec.err)
	}
	ev := dec.ev
	// As the projector does, event by event: a build named under another
	// project than the one that claimed it is refused; then a repeated id is
	// a duplicate or a conflict; only an event that counts claims its build.
	b, claimed := f.builds[ev.BuildID]
	if claimed && b.ProjectID != ev.ProjectID {
		return false, f.refuse(m, events.Conflict(events.ReasonBuildProjectClash,
			"build %q belongs to project %q, not %q", ev.BuildID, b.ProjectID, ev.ProjectID))
	}
	d := dec.digest
	key := dec.key
	if prev, ok := f.ids[key]; ok {
		if prev == idDigest(d[:16]) {
			f.counts.Duplicates++
			return false, nil
		}
		return false, f.refuse(m, events.Conflict(events.ReasonIDConflict,
			"id %q was applied before with different content", ev.ID))
	}
	f.ids[key] = idDigest(d[:16])
	if f.Applied != nil {
		f.Applied(projection.Applied{EventID: ev.ID, Digest: d, Seq: m.Seq})
	}
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
	ev.Data.Framework, ev.Data.NodeVersion = f.intern(ev.Data.Framework), f.intern(ev.Data.NodeVersion)
	ev.Data.PackageManager = f.intern(ev.Data.PackageManager)
	if b.Merge(ev) {
		b.Seqs[projection.KindSlot(ev.Kind())] = m.Seq
	}
	p.last = Position{Seq: m.Seq, StoredAt: m.StoredAt}
	f.counts.Applied++
	return true, nil
}

func (f *Fold) refuse(m projection.Message, err error) error {
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
func (f *Fold) Counts() Counts {
	c := f.counts
	c.Refused = len(f.refused)
	return c
}

// Projects lists the projects with at least one counted event, in no order.
func (f *Fold) Projects() []string {
	out := make([]string, 0, len(f.projects))
	for p := range f.projects {
		out = append(out, p)
	}
	return out
}

var errSealed = errors.New("fold is sealed")

// Seal ends the fold: it drops what only further messages would need (the
// ids seen, the biggest part of a long log's fold) before its model is
// written. Add after Seal fails.
func (f *Fold) Seal() { f.ids = nil }

// Bulk is the fold's read model as rows for projection.Loader.Finish. The
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
		Dead:   slices.Values(f.refused),
		Prefix: f.prefix,
	}
}
