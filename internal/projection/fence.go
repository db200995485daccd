package projection

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fold"
)

// ErrFenced is a batch written under a fence that no longer holds one of its
// partitions: another instance acquired it since. Nothing of the batch was
// written; the caller does not ack it. The error is a *FencedError, which
// names the partitions lost; the fence no longer holds them.
var ErrFenced = errors.New("partition acquired by another instance")

// FencedError is ErrFenced with the partitions a batch found lost.
type FencedError struct {
	Layout     string
	Partitions []int
}

func (e *FencedError) Error() string {
	return fmt.Sprintf("%s: %s %v", ErrFenced, e.Layout, e.Partitions)
}

func (e *FencedError) Unwrap() error { return ErrFenced }

// Fence is a writer's hold on partitions of one layout (rows of
// projector_partitions): the epoch each Acquire set. Store.Apply proves, at
// commit, every one its batch writes to (docs/engine.md §3). One fence, one
// memory: the instance's partitions are written by one engine, one
// transaction a batch for all of them (§6), and a project belongs to one
// partition, so their states do not mix. A fence is used by one goroutine at
// a time (its writer's).
type Fence struct {
	Layout string
	layout events.Layout
	holds  map[int]Hold

	// mem is the single writer's state of its partitions (fold.Memory),
	// filled by Acquire with the projects the store holds and by every
	// batch committed under the fence; nil applies as an unfenced store does
	// (reading everything a batch names).
	mem *fold.Memory
	// open is the batch begun last under the fence (Store.Begin) and not
	// finished yet.
	open *Pending
}

// Hold is one partition a fence holds: its epoch, and its checkpoint when it
// was acquired.
type Hold struct {
	Partition  int
	Epoch      int64
	AppliedSeq uint64
}

// NewFence returns a fence of layout that holds nothing yet (Acquire adds).
func (s *Store) NewFence(layout string) (*Fence, error) {
	l, err := events.ParseLayout(layout)
	if err != nil {
		return nil, fmt.Errorf("fence: %w", err)
	}
	return &Fence{Layout: layout, layout: l, holds: map[int]Hold{}, mem: fold.NewMemory(s.opts.Memory)}, nil
}

// Holds reports whether f holds partition k.
func (f *Fence) Holds(k int) bool {
	_, ok := f.holds[k]
	return ok
}

// Hold returns f's hold on partition k.
func (f *Fence) Hold(k int) (Hold, bool) {
	h, ok := f.holds[k]
	return h, ok
}

// Count is how many partitions f holds.
func (f *Fence) Count() int { return len(f.holds) }

// Held lists the partitions f holds, in order.
func (f *Fence) Held() []int {
	out := make([]int, 0, len(f.holds))
	for k := range f.holds {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// Release drops f's hold on the partitions ks (their loop stopped) and the
// projects of theirs its memory holds.
func (f *Fence) Release(ks ...int) {
	for _, k := range ks {
		delete(f.holds, k)
	}
	if f.mem != nil && len(ks) > 0 {
		f.mem.DropIf(func(project string) bool { return !f.Holds(events.Partition(project, f.layout.N())) })
	}
}

// lose drops the memory once a compare-and-set found partitions taken (the
// batch that found it may have been kept in it; fenceCheck.fenced drops the
// holds).
func (f *Fence) lose() {
	if f.mem != nil {
		f.mem.Forget()
	}
}

// Remembered is the number of projects the fence's memory holds.
func (f *Fence) Remembered() int {
	if f == nil || f.mem == nil {
		return 0
	}
	return f.mem.Len()
}

// LayoutP1 is the layout of one partition, the whole stream (step 3 of
// docs/engine.md): partition 0.
const LayoutP1 = "p1"

// acquireSQL raises the partitions' epochs (creating their rows if they have
// none) and returns the new epochs and the checkpoints. The row locks
// serialise it with the previous owner's batch: if that batch ran its
// compare-and-set, the acquire waits for its commit and reads the
// applied_seq it wrote.
//
// A partition of a retired layout (RetireLayouts) is not acquired: it
// returns no row, and AcquireHolds fails with ErrRetired.
const acquireSQL = `
INSERT INTO projector_partitions AS p (layout, partition, epoch, owner, acquired_at)
SELECT $1, k, 1, $3, now() FROM unnest($2::int[]) AS k ORDER BY k
ON CONFLICT (layout, partition) DO UPDATE SET epoch = p.epoch + 1, owner = EXCLUDED.owner, acquired_at = now()
WHERE p.owner NOT LIKE '` + retiredOwner + `%'
RETURNING partition, epoch, applied_seq`

// reacquireOwnSQL raises the epochs of the partitions whose rows still name
// the owner, or the rebuild that swapped the tables (ReacquireOwn); it makes
// no row.
const reacquireOwnSQL = `
UPDATE projector_partitions AS p SET epoch = p.epoch + 1, owner = $3, acquired_at = now()
FROM (SELECT k FROM unnest($2::int[]) AS k ORDER BY k) AS v
WHERE p.layout = $1 AND p.partition = v.k AND (p.owner = $3 OR p.owner = '` + rebuildOwner + `')
RETURNING p.partition, p.epoch, p.applied_seq`

// rebuildOwner is the owner a rebuild's swap writes in every partition row
// it carries over (Shadow.carryFences).
const rebuildOwner = "rebuild"

// retiredOwner starts the owner of a retired partition's row.
const retiredOwner = "retired: "

// ErrRetired is an acquire of a partition whose layout a repartition
// retired: an instance still running that layout must be stopped and
// started with the stream's (its writes would race the new layout's).
var ErrRetired = errors.New("the stream was repartitioned: this layout is retired; restart the projector with the stream's --partitions")

// fenceSQL is the compare-and-set every fenced batch sends first (after the
// rebuild gate), in the same transaction as its rows: it returns the
// partitions whose epoch is still the fence's, and moves their checkpoints
// to the batch's highest stream sequence in each, never back. With a
// partition's rules order-independent and the event-id marks catching every
// duplicate, a batch need not be contiguous with the checkpoint, and a
// redelivered batch of older messages (nak'ed by a fenced owner) still
// commits. Contiguity and redelivery by sequence come with the gap fill
// (docs/engine.md §3), not built.
const fenceSQL = `
UPDATE projector_partitions AS p SET applied_seq = greatest(p.applied_seq, v.seq)
FROM unnest($2::int[], $3::bigint[], $4::bigint[]) AS v(partition, epoch, seq)
WHERE p.layout = $1 AND p.partition = v.partition AND p.epoch = v.epoch
RETURNING p.partition`

// acquireLockTimeout bounds how long one acquire waits for the partitions'
// rows (held by the previous owner's batch); the acquire is then retried,
// and logged, until ctx ends.
const acquireLockTimeout = "2s"

// storedProjectsSQL lists the projects the store holds rows for: every
// project with a counted event claimed its build (projector_roles would miss
// a project whose builds have only completions or metrics so far: they hold
// no role). An index-only scan of projector_builds_project_idx.
const storedProjectsSQL = `SELECT DISTINCT project_id FROM projector_builds`

// Acquire takes layout's partition for owner in a new fence of its own
// (NewFence, then AcquireIn).
func (s *Store) Acquire(ctx context.Context, layout string, partition int, owner string) (*Fence, error) {
	f, err := s.NewFence(layout)
	if err != nil {
		return nil, err
	}
	a, err := s.AcquireHolds(ctx, layout, owner, partition)
	if err != nil {
		return nil, err
	}
	f.Add(a)
	return f, nil
}

// Acquired is what AcquireHolds took, for Fence.Add.
type Acquired struct {
	Layout string
	Holds  []Hold
	stored []string // the partitions' projects the store holds
}

// AcquireHolds takes layout's partitions ks for owner (an instance id, for
// logs and status) in one transaction: their epochs are raised, which fences
// every earlier holder at its next commit. It retries while a row is locked
// (lock_timeout 2 s each time) until ctx ends. It also lists the partitions'
// projects the store holds, read in the same transaction once the epochs are
// raised: no earlier holder can commit after that, so what the fence's
// memory learns from then on is only its own commits. It does not touch a
// fence: Add gives it one (on the fence's goroutine; the acquire may wait).
func (s *Store) AcquireHolds(ctx context.Context, layout string, owner string, ks ...int) (Acquired, error) {
	return s.acquireHolds(ctx, layout, owner, false, ks)
}

// ReacquireOwn is AcquireHolds of those of partitions ks whose rows still
// name owner or the rebuild: what a writer fenced by a rebuild's swap (which
// raises every epoch and names itself: Shadow.carryFences) takes back at once, so
// that it applies the batch it holds again, in order, instead of giving it
// back behind the messages pulled after it. A partition another instance
// acquired is not taken back.
func (s *Store) ReacquireOwn(ctx context.Context, layout string, owner string, ks ...int) (Acquired, error) {
	return s.acquireHolds(ctx, layout, owner, true, ks)
}

func (s *Store) acquireHolds(ctx context.Context, layout string, owner string, own bool, ks []int) (Acquired, error) {
	l, err := events.ParseLayout(layout)
	if err != nil {
		return Acquired{}, fmt.Errorf("acquire: %w", err)
	}
	ks = slices.Sorted(slices.Values(ks))
	for attempt := 1; ; attempt++ {
		a := Acquired{Layout: layout}
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT set_config('lock_timeout', $1, true)`, acquireLockTimeout); err != nil {
				return err
			}
			q := acquireSQL
			if own {
				q = reacquireOwnSQL
			}
			rows, _ := tx.Query(ctx, q, layout, ks, owner)
			var h Hold
			var applied int64
			if _, err := pgx.ForEachRow(rows, []any{&h.Partition, &h.Epoch, &applied}, func() error {
				h.AppliedSeq = uint64(applied)
				a.Holds = append(a.Holds, h)
				return nil
			}); err != nil {
				return err
			}
			if len(a.Holds) < len(ks) && !own {
				return fmt.Errorf("%w (layout %s)", ErrRetired, layout)
			}
			rows, _ = tx.Query(ctx, storedProjectsSQL)
			var project string
			_, err := pgx.ForEachRow(rows, []any{&project}, func() error {
				if slices.Contains(ks, events.Partition(project, l.N())) { // the partitions' own projects only
					a.stored = append(a.stored, project)
				}
				return nil
			})
			return err
		})
		if err == nil {
			return a, nil
		}
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "55P03" { // lock_not_available
			return Acquired{}, fmt.Errorf("acquire %s %v: %w", layout, ks, err)
		}
		s.opts.Logger.Warn("acquire waits for the partitions' rows",
			zap.String("layout", layout), zap.Ints("partitions", ks), zap.Int("attempt", attempt))
		select {
		case <-ctx.Done():
			return Acquired{}, fmt.Errorf("acquire %s %v: %w", layout, ks, ctx.Err())
		case <-time.After(50*time.Millisecond + rand.N(100*time.Millisecond)):
		}
	}
}

// Add gives f the holds a took: its memory learns which of their projects
// the store holds.
func (f *Fence) Add(a Acquired) {
	for _, h := range a.Holds {
		f.holds[h.Partition] = h
	}
	if f.mem != nil {
		for _, p := range a.stored {
			f.mem.InStore(p)
		}
	}
}

// seqs is, for each partition f holds that a batch writes to, the batch's
// highest stream sequence in it; foreign lists the batch's messages of
// partitions f does not hold (by index in dec).
func (f *Fence) seqs(prefix string, dec []fold.Decoded) (parts []int32, epochs, maxSeq []int64, foreign []int) {
	top := map[int]uint64{}
	for i := range dec {
		m := &dec[i].Msg
		k, ok := f.layout.SubjectPartition(prefix, m.Subject)
		if !ok || !f.Holds(k) {
			foreign = append(foreign, i)
			continue
		}
		top[k] = max(top[k], m.Seq)
	}
	for _, k := range slices.Sorted(maps.Keys(top)) {
		parts = append(parts, int32(k))
		epochs = append(epochs, f.holds[k].Epoch)
		maxSeq = append(maxSeq, int64(top[k]))
	}
	return parts, epochs, maxSeq, foreign
}

// fenceCheck is the outcome of a batch's compare-and-set.
type fenceCheck struct {
	f      *Fence
	want   []int32
	epochs []int64 // of want, as the batch checked them
	got    []int32
	err    error // the batch named partitions the fence does not hold: a *FencedError
}

// held reports whether every partition the batch writes to is still the fence's.
func (c *fenceCheck) held() bool { return c.err == nil && len(c.got) == len(c.want) }

// fenced is the error of a batch whose compare-and-set missed partitions;
// the fence drops them.
func (c *fenceCheck) fenced() error {
	if c.err != nil {
		return c.err
	}
	var lost []int
	for i, k := range c.want {
		if !slices.Contains(c.got, k) {
			lost = append(lost, int(k))
			if h, ok := c.f.holds[int(k)]; ok && h.Epoch == c.epochs[i] {
				delete(c.f.holds, int(k)) // not a hold acquired again since the batch began
			}
		}
	}
	c.f.lose()
	return &FencedError{Layout: c.f.Layout, Partitions: lost}
}

// queueFence queues, on a batch of statements, the compare-and-set of f for
// the messages of dec; c reports it.
func queueFence(b *pgx.Batch, f *Fence, prefix string, dec []fold.Decoded, c *fenceCheck) {
	parts, epochs, seqs, foreign := f.seqs(prefix, dec)
	*c = fenceCheck{f: f, want: parts, epochs: epochs}
	if len(foreign) > 0 {
		// Partitions lost or released since the caller split its batch (a
		// batch begun before the one that found them fenced, applied
		// again): fenced as well, so that the caller gives their messages
		// back. A stray of a partitioned layout counts as partition 0's.
		var ks []int
		for _, i := range foreign {
			k, _ := f.layout.SubjectPartition(prefix, dec[i].Msg.Subject)
			if !slices.Contains(ks, k) {
				ks = append(ks, k)
			}
		}
		slices.Sort(ks)
		c.err = &FencedError{Layout: f.Layout, Partitions: ks}
	}
	b.Queue(fenceSQL, f.Layout, parts, epochs, seqs).Query(c.read)
}

// read reads the compare-and-set's rows (its queued query's function, or
// Pending.waitHead, which reads them before the batch's other results).
func (c *fenceCheck) read(rows pgx.Rows) error {
	c.got = c.got[:0]
	var k int32
	for rows.Next() {
		if err := rows.Scan(&k); err != nil {
			rows.Close()
			return err
		}
		c.got = append(c.got, k)
	}
	rows.Close()
	return rows.Err()
}

// RetireLayouts fences every partition of a layout other than keep and p1
// (a repartition away from them): their epochs are raised, so that an
// instance still running the former layout commits nothing from then on.
//
// A retired row is never acquired again (ErrRetired) and stays, with its
// epoch: were it deleted, a later acquire of its layout would start again at
// epoch 1, which a stale holder could match. Keep's own rows, if a
// repartition retired them earlier (p4 → p2 → p4), are acquirable again,
// their epochs kept.
//
// from, if partitioned, is the layout being drained: its rows are made for
// every partition (one never acquired has none, and an instance still running
// from would otherwise make it at epoch 1), retired.
func (s *Store) RetireLayouts(ctx context.Context, keep string, from events.Layout) error {
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if from.Partitioned() && from.Name() != keep {
			if _, err := tx.Exec(ctx, `INSERT INTO projector_partitions (layout, partition, epoch, owner)
SELECT $1, k, 1, '' FROM generate_series(0, $2 - 1) AS k ON CONFLICT (layout, partition) DO NOTHING`, from.Name(), from.N()); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `UPDATE projector_partitions SET epoch = epoch + 1, owner = $3 || 'the stream is now ' || $1
WHERE layout <> $1 AND layout <> $2 AND owner NOT LIKE $3 || '%'`, keep, LayoutP1, retiredOwner); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE projector_partitions SET owner = '' WHERE layout = $1 AND owner LIKE $2 || '%'`, keep, retiredOwner)
		return err
	})
	if err != nil {
		return fmt.Errorf("retire layouts: %w", err)
	}
	return nil
}

// Partitions lists the rows of projector_partitions (for status and tests).
func (s *Store) Partitions(ctx context.Context) ([]PartitionRow, error) {
	rows, err := s.pool.Query(ctx, `SELECT layout, partition, epoch, owner, applied_seq, acquired_at FROM projector_partitions ORDER BY layout, partition`)
	if err != nil {
		return nil, fmt.Errorf("partitions: %w", err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[PartitionRow])
	if err != nil {
		return nil, fmt.Errorf("partitions: %w", err)
	}
	return out, nil
}

// PartitionRow is a row of projector_partitions.
type PartitionRow struct {
	Layout     string
	Partition  int
	Epoch      int64
	Owner      string
	AppliedSeq int64
	AcquiredAt *time.Time
}
