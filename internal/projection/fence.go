package projection

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fold"
)

// ErrFenced is a batch written under a fence whose epoch is no longer its
// partition's: another instance acquired the partition since. Nothing of the
// batch was written; the caller does not ack it and drops the fence.
var ErrFenced = errors.New("partition acquired by another instance")

// Fence is an instance's hold on a partition of a layout (a row of
// projector_partitions): the epoch its Acquire set. Store.Apply proves it at
// commit (docs/engine.md §3).
type Fence struct {
	Layout     string
	Partition  int
	Epoch      int64
	AppliedSeq uint64 // the partition's checkpoint when it was acquired

	// mem is the single writer's state of the partition (fold.Memory),
	// filled by Acquire with the projects the store holds and by every
	// batch committed under the fence; nil applies as an unfenced store does
	// (reading everything a batch names).
	mem *fold.Memory
	// open is the batch begun last under the fence (Store.Begin) and not
	// finished yet.
	open *Pending
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

// acquireSQL raises the partition's epoch (creating its row if it has none)
// and returns the new epoch and the checkpoint. The row lock serialises it
// with the previous owner's batch: if that batch ran its compare-and-set, the
// acquire waits for its commit and reads the applied_seq it wrote.
const acquireSQL = `
INSERT INTO projector_partitions AS p (layout, partition, epoch, owner, acquired_at)
VALUES ($1, $2, 1, $3, now())
ON CONFLICT (layout, partition) DO UPDATE SET epoch = p.epoch + 1, owner = EXCLUDED.owner, acquired_at = now()
RETURNING epoch, applied_seq`

// fenceSQL is the compare-and-set every fenced batch sends first (after the
// rebuild gate), in the same transaction as its rows: it updates no row when
// the epoch moved on. The checkpoint is the batch's highest stream sequence,
// and never goes back: with one partition the rules are order-independent
// and the event-id marks catch every duplicate, so a batch need not be
// contiguous with the checkpoint, and a redelivered batch of older messages
// (nak'ed by a fenced owner) still commits. Contiguity and redelivery by
// sequence come with the gap fill (docs/engine.md §3), which step 3 leaves
// out.
const fenceSQL = `
UPDATE projector_partitions SET applied_seq = greatest(applied_seq, $4)
WHERE layout = $1 AND partition = $2 AND epoch = $3
RETURNING epoch`

// acquireLockTimeout bounds how long one acquire waits for the partition's
// row (held by the previous owner's batch); the acquire is then retried, and
// logged, until ctx ends.
const acquireLockTimeout = "2s"

// storedProjectsSQL lists the projects the store holds rows for: every
// project with a counted event claimed its build (projector_roles would miss
// a project whose builds have only completions or metrics so far: they hold
// no role). An index-only scan of projector_builds_project_idx.
const storedProjectsSQL = `SELECT DISTINCT project_id FROM projector_builds`

// Acquire takes layout's partition for owner (an instance id, for logs and
// status) in its own transaction: the epoch is raised, which fences every
// earlier holder at its next commit. It retries while the row is locked
// (lock_timeout 2 s each time) until ctx ends.
//
// The fence starts an empty memory of the partition (fold.Memory, bounded
// by Options.Memory) that knows which projects the store holds, read in the
// same transaction once the epoch is raised: no earlier holder can commit
// after that, so what the memory learns from then on is only this fence's
// own commits.
func (s *Store) Acquire(ctx context.Context, layout string, partition int, owner string) (Fence, error) {
	f := Fence{Layout: layout, Partition: partition}
	l, err := events.ParseLayout(layout)
	if err != nil {
		return Fence{}, fmt.Errorf("acquire: %w", err)
	}
	for attempt := 1; ; attempt++ {
		var applied int64
		mem := fold.NewMemory(s.opts.Memory)
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT set_config('lock_timeout', $1, true)`, acquireLockTimeout); err != nil {
				return err
			}
			if err := tx.QueryRow(ctx, acquireSQL, layout, partition, owner).Scan(&f.Epoch, &applied); err != nil {
				return err
			}
			rows, _ := tx.Query(ctx, storedProjectsSQL)
			var project string
			_, err := pgx.ForEachRow(rows, []any{&project}, func() error {
				if events.Partition(project, l.N()) == partition { // the partition's own projects only
					mem.InStore(project)
				}
				return nil
			})
			return err
		})
		if err == nil {
			f.AppliedSeq = uint64(applied)
			f.mem = mem
			return f, nil
		}
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "55P03" { // lock_not_available
			return Fence{}, fmt.Errorf("acquire %s/%d: %w", layout, partition, err)
		}
		s.opts.Logger.Warn("acquire waits for the partition's row",
			zap.String("layout", layout), zap.Int("partition", partition), zap.Int("attempt", attempt))
		select {
		case <-ctx.Done():
			return Fence{}, fmt.Errorf("acquire %s/%d: %w", layout, partition, ctx.Err())
		case <-time.After(50*time.Millisecond + rand.N(100*time.Millisecond)):
		}
	}
}

// queueFence queues, on a batch of statements, the compare-and-set of f with
// checkpoint seq; ok is set to whether it held.
func queueFence(b *pgx.Batch, f *Fence, seq uint64, ok *bool) {
	b.Queue(fenceSQL, f.Layout, f.Partition, f.Epoch, int64(seq)).Query(func(rows pgx.Rows) error {
		*ok = false
		for rows.Next() {
			*ok = true
		}
		return rows.Err()
	})
}

// fenced is the error of a batch whose compare-and-set updated nothing.
func fenced(f *Fence) error {
	return fmt.Errorf("%w: %s/%d at epoch %d", ErrFenced, f.Layout, f.Partition, f.Epoch)
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
