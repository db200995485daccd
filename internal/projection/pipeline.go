package projection

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// Pending is a batch Store.Begin started under a fence: read, folded on the
// fence's memory, its writes (the compare-and-set first) sent in one
// pipeline and not waited for. Finish waits for them and commits.
//
// This is how the partition's writer overlaps its work with Postgres's
// (docs/engine.md, step 4): while Postgres executes batch N's writes, the
// writer folds batch N+1 on the memory as batch N left it. Batch N+1's
// compare-and-set waits on the partition's row, which batch N's transaction
// holds, so the two commit in order; their reads take no locks. If batch N
// does not commit, what batch N+1 was folded on is wrong: N's Finish forgets
// the memory, rolls N+1 back, and N+1's Finish applies it again as Apply
// does. The caller finishes pendings in the order it began them, on one
// goroutine (the fence's).
//
// Batch N+1's pipeline is sent only once batch N's compare-and-set has
// answered (waitHead): two pipelines sent on two connections run in no
// given order, and had N+1's taken the partition's row first, N's would
// wait for N+1's commit while the client waits for N's results, until
// Postgres ended N+1's session idle in transaction (5 s; measured at live
// rates before this rule).
type Pending struct {
	s     *Store
	f     *Fence
	msgs  []Message
	tx    pgx.Tx
	br    pgx.BatchResults
	check fenceCheck // the compare-and-set's outcome
	raced bool       // a claim or id was there already (errRaced)
	// head is how many statements come first, the compare-and-set last;
	// waited says they were read (waitHead), headErr what that read got.
	head    int
	waited  bool
	headErr error
	res     Result
	drops   []droppedField
	// again: nothing is in flight; Finish applies the batch as Apply does.
	again bool
	next  *Pending // begun after this one while this one was open
}

// Begin starts msgs under the fence f (see Pending). Without a fence, or
// with a fence without memory, the batch is applied at Finish (Apply).
// Begin never fails: what goes wrong is found, and retried, by Finish.
func (s *Store) Begin(ctx context.Context, f *Fence, msgs []Message) *Pending {
	p := &Pending{s: s, f: f, msgs: msgs, again: true}
	if f == nil || f.mem == nil || len(msgs) == 0 {
		return p
	}
	prev := f.open
	f.open = p
	if prev != nil {
		prev.next = p
		if prev.again || !s.overlap {
			// The batch before was not sent, so the memory lacks it: this
			// one waits for it too. Or the pool has one connection, which
			// the batch before holds until it finishes.
			return p
		}
		if prev.waitHead(); prev.headErr != nil || !prev.check.held() {
			return p // the batch before will not commit: this one waits for it
		}
	}
	if err := p.send(ctx); err != nil {
		s.opts.Logger.Debug("batch not begun; applied at finish", zap.Error(err))
		return p
	}
	p.again = false
	return p
}

// send begins the transaction, reads what the memory misses (taking the
// rebuild gate if anything is read), folds, and sends the rebuild gate (if
// not taken), the compare-and-set and the writes in one pipeline; once sent,
// the memory keeps the batch.
func (p *Pending) send(ctx context.Context) error {
	s := p.s
	b := s.prepare(p.msgs, nil)
	b.fence = p.f
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	part, res, drops, ch, gated, err := s.foldBatch(ctx, tx, b, s.opts.Gate)
	if err != nil {
		_ = tx.Rollback(ctx)
		return err
	}
	wb := &pgx.Batch{}
	p.head = s.queueHead(wb, s.opts.Gate && !gated, p.f, b.dec, &p.check)
	s.queueWrite(wb, ch, nil, &p.raced)
	p.tx, p.br = tx, tx.SendBatch(ctx, wb)
	p.res, p.drops = res, drops
	p.f.mem.Keep(part, projectsOf(b.dec))
	return nil
}

// waitHead reads the results of the batch's first statements, up to its
// compare-and-set (which then holds the partition's row until the batch
// ends, if it held), once.
func (p *Pending) waitHead() {
	if p.waited {
		return
	}
	p.waited = true
	for range p.head - 1 {
		if _, err := p.br.Exec(); err != nil {
			p.headErr = err
			return
		}
	}
	rows, err := p.br.Query()
	if err != nil {
		p.headErr = err
		return
	}
	p.headErr = p.check.read(rows)
}

// Finish waits for the batch's writes and commits them, or applies the batch
// again as Apply does when they failed or were never sent. It returns what
// Apply returns (ErrFenced when the fence no longer holds).
func (p *Pending) Finish(ctx context.Context) (Result, error) {
	f := p.f
	if f != nil && f.open == p {
		f.open = nil
	}
	if p.again {
		return p.s.Apply(ctx, f, p.msgs)
	}
	err := p.headErr
	if cerr := p.br.Close(); err == nil {
		err = cerr
	}
	switch {
	case err != nil:
		err = fmt.Errorf("write: %w", err)
	case !p.check.held():
		err = p.check.fenced()
	case p.raced:
		err = errRaced
	default:
		if err = p.tx.Commit(ctx); err == nil {
			p.s.reportDropped(p.drops)
			return p.res, nil
		}
		err = fmt.Errorf("commit: %w", err)
	}
	_ = p.tx.Rollback(ctx)
	// The memory kept this batch, and the one begun after it was folded on
	// that: both are wrong now (lost partitions were dropped by fenced).
	f.mem.Forget()
	if n := p.next; n != nil && !n.again {
		n.abort(ctx)
	}
	if errors.Is(err, ErrFenced) {
		return Result{}, err
	}
	// A retryable write error is counted and logged as Apply's are, the
	// begun attempt being the first; Apply then makes its own attempts.
	if !p.s.noteRetry(err, 0) {
		p.s.opts.Logger.Debug("begun batch applied again", zap.Error(err))
	}
	res, err := p.s.Apply(ctx, f, p.msgs)
	res.Redone++
	return res, err
}

// abort rolls back a batch sent on a memory that turned out wrong (its
// predecessor did not commit); its Finish applies it again.
func (p *Pending) abort(ctx context.Context) {
	// Its statements run once the predecessor's locks go; a retryable
	// error they hit is counted as a retry.
	if err := p.br.Close(); err != nil {
		p.s.noteRetry(err, 0)
	}
	_ = p.tx.Rollback(ctx)
	p.again = true
}
