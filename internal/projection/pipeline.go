package projection

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
)

// Pending is a batch Store.Begin started under a fence: read, folded on the
// fence's memory, its writes (the compare-and-set first) sent in one
// pipeline; a goroutine of its own reads their results and commits the
// moment they are in (or rolls back), and Finish waits for that outcome.
//
// This is how the writer overlaps its work with Postgres's (docs/engine.md,
// step 4): while Postgres executes batch N's writes, the writer folds batch
// N+1 on the memory as batch N left it. Batch N+1's compare-and-set waits on
// the partitions' rows, which batch N's transaction holds, so the two commit
// in order; their reads take no locks. N commits as soon as its results are
// in, not once the writer is done folding N+1, so N+1's statements do not
// wait for the writer either. If batch N does not commit, what batch N+1 was
// folded on is wrong: N+1's goroutine, which commits only after N's did,
// rolls it back, N's Finish forgets the memory, and N+1's Finish applies it
// again as Apply does. The caller finishes pendings in the order it began
// them, on one goroutine (the fence's).
//
// Batch N+1's pipeline is sent only once batch N's compare-and-set has
// answered (headDone): two pipelines sent on two connections run in no
// given order, and had N+1's taken the partitions' rows first, N's would
// wait for N+1's commit, which waits for N's, until Postgres ended N+1's
// session idle in transaction (5 s; measured at live rates before this
// rule).
type Pending struct {
	s     *Store
	f     *Fence
	msgs  []Message
	conn  *pgxpool.Conn // its transaction's, begun by the pipeline's first statement
	br    pgx.BatchResults
	check fenceCheck // the compare-and-set's outcome
	// head is how many statements come first, the compare-and-set last;
	// headDone is closed once their results were read (headErr).
	head     int
	headDone chan struct{}
	headErr  error
	// done is closed once the transaction committed (err nil) or rolled
	// back (err says why).
	done  chan struct{}
	err   error
	res   Result
	drops []droppedField
	// again: nothing is in flight; Finish applies the batch as Apply does.
	again bool
}

// errPredecessor is a pending batch rolled back because the one begun
// before it did not commit (it was folded on that one's writes).
var errPredecessor = errors.New("the batch begun before did not commit")

// errHeadFenced marks a pending batch whose compare-and-set missed
// partitions (Finish turns it into the fence's FencedError).
var errHeadFenced = errors.New("fenced")

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
	if prev != nil && (prev.again || !s.overlap) {
		// The batch before was not sent, so the memory lacks it: this
		// one waits for it too. Or the pool has one connection, which
		// the batch before holds until it finishes.
		return p
	}
	if err := p.send(ctx, prev); err != nil {
		if !errors.Is(err, errPredecessor) {
			s.opts.Logger.Debug("batch not begun; applied at finish", zap.Error(err))
		}
		return p
	}
	p.again = false
	return p
}

// send reads what the memory misses (outside the transaction: the fence's
// writer is the partitions' only one, and a rebuild's swap in between fails
// the compare-and-set), folds, and sends the transaction in one pipeline:
// BEGIN, the rebuild gate, the compare-and-set, the writes; settle reads
// their results and commits. Once sent, the memory keeps the batch.
//
// It folds while Postgres executes the batch before (prev), on the memory as
// that one left it, and sends only once prev's compare-and-set answered
// (errPredecessor if prev will not commit: the fold is dropped). Postgres
// sends a pipeline's results at its end (its Sync), so that answer comes
// once all of prev's statements ran: folding only after it, as this did
// before, left Postgres idle while the writer folded and the writer idle
// while Postgres wrote (docs/performance.md, "Folding while Postgres
// writes").
func (p *Pending) send(ctx context.Context, prev *Pending) error {
	s := p.s
	b := s.prepare(p.msgs, nil)
	b.fence = p.f
	part, res, drops, ch, _, err := s.foldBatch(ctx, s.pool, b, false)
	if err != nil {
		return err
	}
	if prev != nil {
		if <-prev.headDone; prev.headErr != nil || !prev.check.held() {
			return errPredecessor // the batch before will not commit: this one waits for it
		}
	}
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	wb := &pgx.Batch{}
	wb.Queue(`BEGIN`)
	p.head = 1 + s.queueHead(wb, s.opts.Gate, p.f, b.dec, &p.check)
	s.queueWrite(wb, ch, nil)
	p.conn, p.br = conn, conn.SendBatch(ctx, wb)
	p.res, p.drops = res, drops
	p.f.mem.Keep(part, projectsOf(b.dec))
	p.headDone, p.done = make(chan struct{}), make(chan struct{})
	go p.settle(context.WithoutCancel(ctx), prev) // owner: Finish, which waits for done
	return nil
}

// settle reads the batch's results, the head first (closing headDone), and
// commits once they are all in and the batch before (prev) committed, or
// rolls back. It touches nothing but the pending's own fields: what a
// failure means for the fence and its memory, Finish does.
func (p *Pending) settle(ctx context.Context, prev *Pending) {
	defer close(p.done)
	for range p.head - 1 {
		if _, err := p.br.Exec(); err != nil {
			p.headErr = err
			break
		}
	}
	if p.headErr == nil {
		rows, err := p.br.Query()
		if err == nil {
			err = p.check.read(rows)
		}
		p.headErr = err
	}
	close(p.headDone)
	err := p.headErr
	if cerr := p.br.Close(); err == nil {
		err = cerr
	}
	switch {
	case raced(err):
		err = errRaced
	case err != nil:
		err = fmt.Errorf("write: %w", err)
	case !p.check.held():
		err = errHeadFenced
	}
	if err == nil && prev != nil {
		if <-prev.done; prev.err != nil {
			err = errPredecessor
		}
	}
	end := "COMMIT"
	if err != nil {
		end = "ROLLBACK"
	}
	if _, cerr := p.conn.Exec(ctx, end); cerr != nil {
		if err == nil {
			err = fmt.Errorf("commit: %w", cerr)
		}
		// The session's state is unknown: it leaves the pool.
		_ = p.conn.Conn().Close(ctx)
	} else if err == nil && p.conn.Conn().PgConn().TxStatus() != 'I' {
		err = fmt.Errorf("commit: the session is still in a transaction (status %c)", p.conn.Conn().PgConn().TxStatus())
		_ = p.conn.Conn().Close(ctx)
	}
	p.conn.Release()
	p.err = err
}

// Finish waits for the batch's commit, or applies the batch again as Apply
// does when it did not commit or was never sent. It returns what Apply
// returns (ErrFenced when the fence no longer holds).
func (p *Pending) Finish(ctx context.Context) (Result, error) {
	f := p.f
	if f != nil && f.open == p {
		f.open = nil
	}
	if p.again {
		return p.s.Apply(ctx, f, p.msgs)
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		// Its goroutine commits or rolls back all the same; the caller's
		// retry applies the batch again (its ids then duplicates).
		f.mem.Forget()
		return Result{}, ctx.Err()
	}
	err := p.err
	if err == nil {
		p.s.reportDropped(p.drops)
		return p.res, nil
	}
	// The memory kept this batch, and the one begun after it was folded on
	// that: both are wrong now (the one after rolls itself back).
	f.mem.Forget()
	switch {
	case errors.Is(err, errHeadFenced):
		return Result{}, p.check.fenced()
	case errors.Is(err, errPredecessor):
		// Not this batch's failure: applied again, as if never begun.
	case !p.s.noteRetry(err, 0):
		// A retryable write error is counted and logged as Apply's are,
		// the begun attempt being the first; Apply then makes its own.
		p.s.opts.Logger.Debug("begun batch applied again", zap.Error(err))
	}
	res, err := p.s.Apply(ctx, f, p.msgs)
	res.Redone++
	return res, err
}
