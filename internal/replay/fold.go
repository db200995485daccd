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

	"github.com/buildstate/buildstate/internal/fold"
	"github.com/buildstate/buildstate/internal/fsm"
	"github.com/buildstate/buildstate/internal/projection"
)

// ErrOutOfOrder is returned by Fold.Add for a message whose sequence is not
// greater than the last one added: the fold's first-wins rules need stream
// order.
var ErrOutOfOrder = errors.New("message out of stream order")

// Fold is the read model of a part of the log computed in memory with the
// projector's rules, the live store's own (fold.Partition, which holds
// them): one partition holding every project, started empty, fed in stream
// order. This wrapper adds what a replay needs around it: the order check,
// decoding on every core, and the model as rows for projection.Loader.
//
// It holds no database and no connection: feed it messages in stream order
// with Add, read a project with View. When it is fed only one project's
// subjects (as ProjectAt does), the two cross-project rules see only that
// project's events.
type Fold struct {
	prefix  string
	lastSeq uint64
	p       *fold.Partition

	// Applied, if set, is called with each event id that counts, at its
	// first sequence, in stream order: the projector_applied rows, final
	// as soon as they are made (a bulk replay streams them to the shadow
	// while it reads the log).
	Applied func(projection.Applied)
}

// Position is a message's place in the log.
type Position = fold.Position

// Counts says what a fold did with the messages it was given.
type Counts = fold.Counts

// NewFold returns an empty fold of messages published under prefix.
func NewFold(prefix string) *Fold {
	f := &Fold{prefix: prefix, p: fold.NewPartition()}
	f.p.Applied = func(a fold.Applied) {
		if f.Applied != nil {
			f.Applied(a)
		}
	}
	return f
}

// Add folds one message in. It returns whether the message counted as a new
// event, nil for a duplicate, an error matching events.ErrInvalid (with its
// events.Reason) for a message the projector would dead-letter, and
// ErrOutOfOrder for a sequence not after the previous one.
func (f *Fold) Add(seq uint64, subject string, data []byte, storedAt time.Time) (bool, error) {
	d := fold.Decode(f.prefix, projection.Message{Seq: seq, Subject: subject, Data: data, StoredAt: storedAt})
	return f.add(&d)
}

func (f *Fold) add(d *fold.Decoded) (bool, error) {
	if d.Msg.Seq <= f.lastSeq {
		return false, fmt.Errorf("%w: %d after %d", ErrOutOfOrder, d.Msg.Seq, f.lastSeq)
	}
	out, err := f.p.Add(d)
	if errors.Is(err, fold.ErrSealed) {
		return false, err
	}
	f.lastSeq = d.Msg.Seq
	return out == fold.Counted, err
}

// AddBatch folds msgs in, in order: AddDecoded(Decode(msgs, Decoded{})).
func (f *Fold) AddBatch(msgs []projection.Message) error {
	return f.AddDecoded(f.Decode(msgs, Decoded{}))
}

// Decoded is a batch of messages decoded by Fold.Decode.
type Decoded struct {
	dec []fold.Decoded
}

// Len is the number of messages in the batch.
func (b Decoded) Len() int { return len(b.dec) }

// Decode decodes msgs on up to GOMAXPROCS goroutines, into reuse's memory
// when it has room (a batch already folded in; zero for none). It reads no
// state of the fold that folding changes, so the next batch may be decoded
// while this one is folded in.
func (f *Fold) Decode(msgs []projection.Message, reuse Decoded) Decoded {
	b := Decoded{dec: reuse.dec[:0]}
	if cap(b.dec) < len(msgs) {
		b.dec = make([]fold.Decoded, len(msgs))
	}
	b.dec = b.dec[:len(msgs)]
	workers := min(runtime.GOMAXPROCS(0), max(1, len(msgs)/256))
	chunk := (len(msgs) + workers - 1) / workers
	var wg sync.WaitGroup
	for lo := 0; lo < len(msgs); lo += chunk {
		hi := min(len(msgs), lo+chunk)
		wg.Go(func() {
			for i := lo; i < hi; i++ {
				b.dec[i] = fold.Decode(f.prefix, msgs[i])
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
	for i := range b.dec {
		if _, err := f.add(&b.dec[i]); errors.Is(err, ErrOutOfOrder) || errors.Is(err, fold.ErrSealed) {
			return err
		}
	}
	return nil
}

// View is what the read model holds for project after the messages added so
// far: its row (nil while it has no visible build) and its metrics rows.
func (f *Fold) View(project string) fsm.View { return f.p.View(project) }

// Last is the last message that counted for project (the zero Position if none).
func (f *Fold) Last(project string) Position {
	if pr := f.p.Project(project); pr != nil {
		return pr.Last
	}
	return Position{}
}

// LastSeq is the sequence of the last message added.
func (f *Fold) LastSeq() uint64 { return f.lastSeq }

// Counts says what the fold did so far.
func (f *Fold) Counts() Counts { return f.p.Counts() }

// Projects lists the projects with at least one counted event, in no order.
func (f *Fold) Projects() []string {
	var out []string
	for pr := range f.p.Projects() {
		out = append(out, pr.ID)
	}
	return out
}

// Seal ends the fold: it drops what only further messages would need (the
// ids seen, the biggest part of a long log's fold) before its model is
// written. Add after Seal fails.
func (f *Fold) Seal() { f.p.Seal() }

// Bulk is the fold's read model as rows for projection.Loader.Finish. The
// fold must not change while they are read; they may be read by several
// goroutines at once.
func (f *Fold) Bulk() projection.Bulk {
	return projection.Bulk{
		Projects: f.p.Projects(),
		Dead:     slices.Values(f.p.Refusals()),
		Prefix:   f.prefix,
	}
}
