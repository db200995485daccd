// Package projection is the Postgres read model: it applies batches of log
// messages to the projects and project_build_metrics tables, keeps the
// projector's own bookkeeping (facts, applied ids, dead letters) in the same
// transactions, and answers the queries the commands need.
package projection

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fold"
	"github.com/buildstate/buildstate/internal/fsm"
)

// ErrRetriesExhausted wraps the last error of a batch whose writes still hit
// a constraint, serialization failure or deadlock after every retry; the
// caller redelivers the messages later.
var ErrRetriesExhausted = errors.New("write retries exhausted")

// retryable SQLSTATEs: check and foreign key violations (the seed's two),
// serialization failure, deadlock.
var retryable = map[string]bool{"23514": true, "23503": true, "40001": true, "40P01": true}

// ExpectedRetries are the (SQLSTATE, constraint) pairs a write retry can
// report with the schema's constraints: metrics start every pair at zero.
var ExpectedRetries = [][2]string{
	{"23514", "projects_build_timing_logical"},
	{"23514", "project_build_metrics_timing_logical"},
	{"23503", "projects_current_build_fk"},
	{"40001", ""},
	{"40P01", ""},
}

// Message is one log message as the store sees it.
type Message = fold.Message

// Result counts what one Apply did.
type Result struct {
	Applied      int // events that were new and valid
	Duplicates   int // events whose id was already applied (same content)
	DeadLettered int // messages kept as dead letters
	Dropped      int // optional measurements left out of applied events (events.Decode)
	Redone       int // times the batch was folded again: a concurrent claim, or (fenced) its memory took a claimed build or an applied id for new
}

func (r *Result) add(o Result) {
	r.Applied += o.Applied
	r.Duplicates += o.Duplicates
	r.DeadLettered += o.DeadLettered
	r.Dropped += o.Dropped
	r.Redone += o.Redone
}

// droppedField is an optional measurement left out of an applied event.
type droppedField struct {
	msg  Message
	id   string
	drop events.Drop
}

// Observer hears about write retries and dropped fields (for metrics).
type Observer interface {
	WriteRetried(sqlstate, constraint string)
	// FieldDropped hears of each optional measurement (data.<field>) left
	// out of an applied event because its value was out of range.
	FieldDropped(field string)
}

// Options configure a Store.
type Options struct {
	Prefix   string      // subject prefix, default "builds"
	Gate     bool        // take the rebuild gate (shared) in every apply: true for the live model
	Retries  int         // write attempts for retryable SQLSTATEs, default 5
	Logger   *zap.Logger // default no-op
	Observer Observer    // may be nil
	Memory   fold.Limits // bounds of a fence's memory (Acquire); zero: fold.DefaultLimits
}

// Store applies messages to the read model reached through its pool (whose
// search_path selects the live or a shadow schema).
type Store struct {
	pool *pgxpool.Pool
	opts Options
	// overlap: the pool has room for two batches in flight (Begin).
	overlap bool
}

// ConfigurePool sets what the store's connections need: a custom plan for
// every execution (the batch statements take arrays whose sizes vary and
// tables that grow fast from empty; a generic plan made while a table was
// small would scan it whole for ever), no JIT (it compiled these short
// statements for longer than they ran), and the cost of a random page read
// for data in memory or on SSD (1.1, not the default 4, which is a spinning
// disk's): at 4 the planner scanned the whole projector_facts for the few
// hundred primary keys of closeFactsSQL, 26–41 ms of a 60 ms batch at 150,000
// facts, where the index probes take 4 ms (auto_explain, docs/performance.md).
// A session setting, as a role's or database's would need an administrator;
// a DATABASE_URL that sets it (…?random_page_cost=2) wins.
func ConfigurePool(cfg *pgxpool.Config) {
	cfg.ConnConfig.RuntimeParams["plan_cache_mode"] = "force_custom_plan"
	cfg.ConnConfig.RuntimeParams["jit"] = "off"
	if _, set := cfg.ConnConfig.RuntimeParams["random_page_cost"]; !set {
		cfg.ConnConfig.RuntimeParams["random_page_cost"] = "1.1"
	}
}

// New returns a Store over pool (configured with ConfigurePool).
func New(pool *pgxpool.Pool, opts Options) *Store {
	if opts.Prefix == "" {
		opts.Prefix = "builds"
	}
	if opts.Retries < 1 {
		opts.Retries = 5
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	return &Store{pool: pool, opts: opts, overlap: pool.Config().MaxConns >= 2}
}

// Pool is the store's pool.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// rebuildGate is the advisory lock (two-int key space) that every live apply
// holds shared and a rebuild's swap holds exclusive.
const gateClass, gateID = 0x6273, 1

// Apply applies a batch in one transaction: valid new events change the
// read model, repeats are ignored, invalid messages become dead letters.
// A retryable write error is retried in a fresh transaction with backoff. A
// message whose content the database refuses (Refused) is found by
// splitting the batch and kept as a dead letter (rejected_by_database); the
// rest of the batch applies. Any other error leaves nothing written, and the
// caller tries the batch again later.
//
// With a fence (the live projector's: Acquire), every transaction first
// proves that the fence still holds the partition and moves its checkpoint
// (fenceSQL); if another instance acquired it since, the transaction rolls
// back and Apply returns an error wrapping ErrFenced: nothing of the batch is
// written. nil applies without a fence: the tests, a rebuild's replay and
// its catch-up under the exclusive gate, `dead-letters retry`.
func (s *Store) Apply(ctx context.Context, f *Fence, msgs []Message) (Result, error) {
	if len(msgs) == 0 {
		return Result{}, nil
	}
	return s.applyIsolating(ctx, f, msgs, nil)
}

// applyIsolating applies msgs (re-driven dead letters with their new retry
// counts in retries, nil for live messages) under the fence f (may be nil);
// when the database refuses their content, it applies each half on its own,
// in sequence order (a batch acts as if applied one by one in that order, so
// halves applied one after the other give the same rows), down to the single
// messages it refuses, which it keeps as dead letters.
func (s *Store) applyIsolating(ctx context.Context, f *Fence, msgs []Message, retries map[uint64]int) (Result, error) {
	res, err := s.apply(ctx, f, msgs, retries)
	if err == nil || !Refused(err) {
		return res, err
	}
	if len(msgs) == 1 {
		s.opts.Logger.Warn("message refused by the database; kept as a dead letter",
			zap.Uint64("stream_seq", msgs[0].Seq), zap.Error(err))
		return s.reject(ctx, f, msgs[0], err, retries)
	}
	sorted := slices.Clone(msgs)
	slices.SortFunc(sorted, func(a, b Message) int { return cmp.Compare(a.Seq, b.Seq) })
	var total Result
	for _, half := range [][]Message{sorted[:len(sorted)/2], sorted[len(sorted)/2:]} {
		r, err := s.applyIsolating(ctx, f, half, retries)
		if err != nil {
			return Result{}, err
		}
		total.add(r)
	}
	return total, nil
}

// reject keeps msg, which the database refused with err, as a dead letter.
func (s *Store) reject(ctx context.Context, f *Fence, msg Message, cause error, retries map[uint64]int) (Result, error) {
	var pgErr *pgconn.PgError
	errors.As(cause, &pgErr)
	detail := fmt.Sprintf("SQLSTATE %s: %s", pgErr.Code, pgErr.Message)
	if pgErr.ConstraintName != "" {
		detail += " (constraint " + pgErr.ConstraintName + ")"
	}
	if pgErr.Detail != "" {
		detail += ": " + pgErr.Detail
	}
	wb := &pgx.Batch{}
	var c fenceCheck
	s.queueHead(wb, s.opts.Gate, f, []fold.Decoded{fold.Decode(s.opts.Prefix, msg)}, &c)
	wb.Queue(`DELETE FROM projector_dead_letters WHERE stream_seq = $1`, int64(msg.Seq))
	queueDeadLetters(wb, []Refusal{{Msg: msg, Reason: events.ReasonRejectedByDatabase, Detail: detail}}, s.opts.Prefix, retries)
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		err := tx.SendBatch(ctx, wb).Close()
		if err == nil && f != nil && !c.held() {
			return c.fenced()
		}
		return err
	})
	if errors.Is(err, ErrFenced) {
		return Result{}, err
	}
	if err != nil {
		return Result{}, fmt.Errorf("keep refused message %d: %w", msg.Seq, err)
	}
	return Result{DeadLettered: 1}, nil
}

func (s *Store) apply(ctx context.Context, f *Fence, msgs []Message, retries map[uint64]int) (Result, error) {
	b := s.prepare(msgs, retries)
	b.fence = f
	raced := 0
	for attempt := 1; ; {
		res, drops, err := s.applyOnce(ctx, b)
		if err == nil {
			s.reportDropped(drops)
			res.Redone = raced
			return res, nil
		}
		if errors.Is(err, errRaced) {
			// Not a failure: the batch is folded again on what the other
			// projector committed, or (under a fence) on everything the
			// store holds of what the batch names, which its memory did not.
			b.full = true
			if raced++; raced >= maxRaced {
				return Result{}, fmt.Errorf("%w after %d attempts: %w", ErrRetriesExhausted, raced, err)
			}
			s.opts.Logger.Debug("batch folded again after a concurrent claim", zap.Int("attempt", raced))
			continue
		}
		if !s.noteRetry(err, attempt) {
			return Result{}, err
		}
		if attempt >= s.opts.Retries {
			return Result{}, fmt.Errorf("%w after %d attempts: %w", ErrRetriesExhausted, attempt, err)
		}
		wait := time.Duration(10<<attempt)*time.Millisecond + rand.N(10*time.Millisecond)
		attempt++
		select {
		case <-ctx.Done():
			return Result{}, ctx.Err()
		case <-time.After(wait):
		}
	}
}

// noteRetry reports whether err is a retryable write error (retryable), and
// if so counts and logs its retry as attempt.
func (s *Store) noteRetry(err error, attempt int) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || !retryable[pgErr.Code] {
		return false
	}
	if s.opts.Observer != nil {
		s.opts.Observer.WriteRetried(pgErr.Code, pgErr.ConstraintName)
	}
	s.opts.Logger.Warn("write retried",
		zap.String("sqlstate", pgErr.Code), zap.String("constraint", pgErr.ConstraintName),
		zap.Int("attempt", attempt), zap.Error(err))
	return true
}

// errRaced is a batch's write finding a claim or an applied id that a
// concurrent transaction committed after the batch read them: the fold
// decided without it, so the transaction rolls back and the batch is read
// and folded again.
var errRaced = errors.New("a concurrent projector claimed a build or applied an id of the batch first")

// maxRaced bounds how often one batch is folded again after races (each
// means another projector committed, so the log moves on meanwhile).
const maxRaced = 20

// reportDropped counts and logs the measurements left out of the events a
// committed batch applied: once per applied event (a duplicate, or a batch
// that did not commit, reports nothing).
func (s *Store) reportDropped(drops []droppedField) {
	for _, d := range drops {
		if s.opts.Observer != nil {
			s.opts.Observer.FieldDropped(d.drop.Field)
		}
		s.opts.Logger.Warn("optional measurement out of range left out of the event",
			zap.String("id", d.id), zap.String("field", "data."+d.drop.Field), zap.Int64("value", d.drop.Value),
			zap.String("subject", d.msg.Subject), zap.Uint64("seq", d.msg.Seq))
	}
}

// dbtx is where a batch reads: its transaction, or (a begun batch under a
// fence, which reads only what its memory misses and locks nothing) the
// pool.
type dbtx interface {
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// batch is a batch of messages decoded, in sequence order.
type batch struct {
	dec []fold.Decoded

	fence *Fence // nil: applied without a fence
	full  bool   // read everything the batch names, whatever the fence's memory holds

	redrive []int64        // the batch's re-driven dead letters, taken out first (a retry)
	retries map[uint64]int // re-driven dead letters and their new retry counts
}

// prepare sorts the batch into sequence order (a batch acts as if its
// messages were applied one by one in that order) and decodes it, once for
// every attempt.
func (s *Store) prepare(msgs []Message, retries map[uint64]int) batch {
	sorted := slices.Clone(msgs)
	slices.SortStableFunc(sorted, func(a, b Message) int { return cmp.Compare(a.Seq, b.Seq) })
	b := batch{dec: make([]fold.Decoded, len(sorted)), retries: retries}
	for i, m := range sorted {
		if _, ok := retries[m.Seq]; ok {
			b.redrive = append(b.redrive, int64(m.Seq))
		}
		b.dec[i] = fold.Decode(s.opts.Prefix, m)
	}
	return b
}

// applyOnce applies the batch in one transaction: it reads what the batch's
// messages need (read), folds them with the rules (internal/fold) on it, and
// writes what changed. drops are the measurements left out of the events it
// applied, to report once committed.
func (s *Store) applyOnce(ctx context.Context, b batch) (res Result, drops []droppedField, err error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return Result{}, nil, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit this is a no-op
	gated := false
	if b.fence != nil {
		// The fence first (after the rebuild gate, which a swap holds
		// exclusive while it moves the tables), so that a stale owner fails
		// before its other statements wait on anyone's locks.
		head := &pgx.Batch{}
		var c fenceCheck
		s.queueHead(head, s.opts.Gate, b.fence, b.dec, &c)
		if err := tx.SendBatch(ctx, head).Close(); err != nil {
			return Result{}, nil, fmt.Errorf("fence: %w", err)
		}
		if !c.held() {
			return Result{}, nil, c.fenced()
		}
		gated = true
	}
	if len(b.redrive) > 0 {
		// A retry: the letters leave; those still refused are written again below.
		if _, err := tx.Exec(ctx, `DELETE FROM projector_dead_letters WHERE stream_seq = ANY($1)`, b.redrive); err != nil {
			return Result{}, nil, fmt.Errorf("take out dead letters: %w", err)
		}
	}
	p, res, drops, ch, _, err := s.foldBatch(ctx, tx, b, s.opts.Gate && !gated)
	if err != nil {
		return Result{}, nil, err
	}
	if err := s.write(ctx, tx, ch, b.retries); err != nil {
		return Result{}, nil, err
	}
	if err := tx.Commit(ctx); err != nil {
		return Result{}, nil, fmt.Errorf("commit: %w", err)
	}
	if b.fence != nil && b.fence.mem != nil {
		b.fence.mem.Keep(p, projectsOf(b.dec))
	}
	return res, drops, nil
}

// foldBatch reads in tx what the batch needs and folds it: under a fence
// with a memory, the partition's memory holds what the batch needs but for
// the projects it does not hold (misses), read with plain SELECTs, as the
// fence is the only writer; without one, everything the batch names is read
// under the advisory locks. gate takes the rebuild gate first, if anything
// is read; gated reports whether it was taken (if not, the caller takes it).
func (s *Store) foldBatch(ctx context.Context, tx dbtx, b batch, gate bool) (p *fold.Partition, res Result, drops []droppedField, ch fold.Changes, gated bool, err error) {
	var mem *fold.Memory
	if b.fence != nil {
		mem = b.fence.mem
	}
	fresh := func() (*fold.Partition, []int) {
		p := fold.NewPartition()
		if mem == nil {
			return p, nil
		}
		return p, mem.Prime(p, b.dec)
	}
	p, misses := fresh()
	names := b.dec
	if mem != nil && !b.full {
		names = make([]fold.Decoded, len(misses))
		for i, j := range misses {
			names[i] = b.dec[j]
		}
	}
	// With nothing to read (a warm memory) the gate is left to the caller's
	// next statements (Begin's pipeline): a round trip for it alone is a
	// live batch's fifth.
	st, sent, err := s.read(ctx, tx, names, gate && len(names) > 0, mem != nil)
	gated = gate && sent
	if err != nil {
		return nil, Result{}, nil, fold.Changes{}, false, err
	}
	p.Load(st)
	res, drops = foldInto(p, b)
	if whole := p.Incomplete(); len(whole) > 0 {
		// A role holder was demoted: those projects are folded again on
		// their whole history.
		rows, _ := tx.Query(ctx, loadProjectsSQL, whole)
		full, err := scanFacts(rows)
		if err != nil {
			return nil, Result{}, nil, fold.Changes{}, false, err
		}
		for _, id := range whole {
			st.Projects[id] = full[id]
			st.Whole[id] = true
		}
		p, _ = fresh()
		p.Load(st)
		res, drops = foldInto(p, b)
	}
	ch, err = p.Changes(ctx)
	if err != nil {
		return nil, Result{}, nil, fold.Changes{}, false, err
	}
	res.DeadLettered = len(ch.Refused)
	return p, res, drops, ch, gated, nil
}

// projectsOf lists the projects of the valid events of dec, without repeats.
func projectsOf(dec []fold.Decoded) []string {
	var out []string
	seen := map[string]bool{}
	for i := range dec {
		if ev, err := dec[i].Event(); err == nil && !seen[ev.ProjectID] {
			seen[ev.ProjectID] = true
			out = append(out, ev.ProjectID)
		}
	}
	return out
}

// queueHead queues what a transaction of the store sends first: the rebuild
// gate (shared) if gate (the store takes it and nothing took it before), then, with a fence, the bound on idle
// time and the compare-and-set of the partitions dec writes to (c reports it). A fenced
// transaction never waits on its client for long (its statements are
// pipelined, its commit follows their results at once), so Postgres ends a
// session idle in one for 5 s and its row locks go with it: an owner stopped
// mid-transaction (SIGSTOP) does not keep the next owner's acquire waiting.
// It returns how many statements it queued (the compare-and-set last).
func (s *Store) queueHead(b *pgx.Batch, gate bool, f *Fence, dec []fold.Decoded, c *fenceCheck) int {
	n := b.Len()
	if gate {
		b.Queue(`SELECT pg_advisory_xact_lock_shared($1::int4, $2::int4)`, gateClass, gateID)
	}
	if f != nil {
		b.Queue(`SELECT set_config('idle_in_transaction_session_timeout', '5s', true)`)
		queueFence(b, f, s.opts.Prefix, dec, c)
	}
	return b.Len() - n
}

// foldInto folds the batch's messages, in order, into p (loaded with what
// the store and the fence's memory hold of them).
func foldInto(p *fold.Partition, b batch) (Result, []droppedField) {
	var res Result
	var drops []droppedField
	for i := range b.dec {
		d := &b.dec[i]
		switch out, _ := p.Add(d); out {
		case fold.Counted:
			res.Applied++
			ev, _ := d.Event()
			for _, dr := range ev.Dropped {
				drops = append(drops, droppedField{msg: d.Msg, id: ev.ID, drop: dr})
			}
		case fold.Duplicate:
			res.Duplicates++
		}
	}
	res.Dropped = len(drops)
	return res, drops
}

// write sends what the fold changed, in one round trip (queueWrite). A
// claim, id or new fact that is there already (raced) was committed by a
// concurrent transaction after read: errRaced.
func (s *Store) write(ctx context.Context, tx pgx.Tx, ch fold.Changes, retries map[uint64]int) error {
	wb := &pgx.Batch{}
	s.queueWrite(wb, ch, retries)
	err := tx.SendBatch(ctx, wb).Close()
	if raced(err) {
		return errRaced
	}
	if err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

// queueWrite queues what the fold changed: the new claims and applied ids
// first (each in key order, so that concurrent projectors take their locks
// in one order), then facts, open builds, roles, dead letters and the plans.
// The claims, ids and new facts are plain inserts: one that is there
// already fails the batch on its key (raced).
func (s *Store) queueWrite(wb *pgx.Batch, ch fold.Changes, retries map[uint64]int) {
	if n := len(ch.Claims); n > 0 {
		builds, owners := make([]string, n), make([]string, n)
		for i, c := range ch.Claims {
			builds[i], owners[i] = c.BuildID, c.ProjectID
		}
		wb.Queue(claimBuildsSQL, builds, owners)
	}
	if n := len(ch.Applied); n > 0 {
		ids, digests, seqs := make([]string, n), make([][]byte, n), make([]int64, n)
		for i := range ch.Applied {
			a := &ch.Applied[i]
			ids[i], digests[i], seqs[i] = a.EventID, a.Digest[:], int64(a.Seq)
		}
		wb.Queue(markAppliedSQL, ids, digests, seqs)
	}
	queueFacts(wb, ch.Facts)
	queueOpen(wb, ch.Open, ch.Closed)
	queueRoles(wb, ch.Roles)
	queueDeadLetters(wb, ch.Refused, s.opts.Prefix, retries)
	queuePlans(wb, ch.Plans)
}

// read sends, in one round trip and in this order: the rebuild gate
// (shared, if gate) and, unless for a fence's memory (the fence is the only
// writer), one advisory lock per bucket of projects, in order so that
// concurrent projectors cannot deadlock on them; then, once the locks are
// held (each statement reads what was committed when it starts), the claims
// of the builds the messages of dec name, the applied ids they carry, the
// stored facts of their projects (their role holders and the named builds),
// and, for a memory, the names of every build those projects claimed
// (fold.Stored.Claimed). With nothing to send it sends nothing.
func (s *Store) read(ctx context.Context, tx dbtx, dec []fold.Decoded, gate, forMemory bool) (st fold.Stored, sent bool, err error) {
	st = fold.Stored{Projects: map[string]map[string]*fsm.Build{}, Whole: map[string]bool{},
		Claims: map[string]string{}, IDs: map[string][]byte{}, Claimed: map[string][]string{}}
	projects, keys, builds, ids := namesOf(dec)
	rb := &pgx.Batch{}
	if gate {
		rb.Queue(`SELECT pg_advisory_xact_lock_shared($1::int4, $2::int4)`, gateClass, gateID)
	}
	if !forMemory && len(keys) > 0 {
		rb.Queue(`SELECT count(pg_advisory_xact_lock($1::int4, k)) FROM unnest($2::int4[]) AS k`, lockClass, keys)
	}
	if len(builds) > 0 {
		rb.Queue(buildOwnersSQL, builds).Query(func(rows pgx.Rows) error {
			var id, project string
			_, err := pgx.ForEachRow(rows, []any{&id, &project}, func() error {
				st.Claims[id] = project
				return nil
			})
			return err
		})
		rb.Queue(appliedDigestsSQL, ids).Query(func(rows pgx.Rows) error {
			var id string
			var digest []byte
			_, err := pgx.ForEachRow(rows, []any{&id, &digest}, func() error {
				st.IDs[id] = append([]byte(nil), digest...)
				return nil
			})
			return err
		})
		rb.Queue(loadViewSQL, builds, projects).Query(func(rows pgx.Rows) error {
			var err error
			st.Projects, err = scanFacts(rows)
			return err
		})
		if forMemory {
			rb.Queue(claimedBuildsSQL, projects).Query(func(rows pgx.Rows) error {
				var project, build string
				_, err := pgx.ForEachRow(rows, []any{&project, &build}, func() error {
					st.Claimed[project] = append(st.Claimed[project], build)
					return nil
				})
				return err
			})
		}
	}
	if rb.Len() == 0 {
		return st, false, nil
	}
	if err := tx.SendBatch(ctx, rb).Close(); err != nil {
		return fold.Stored{}, true, fmt.Errorf("read: %w", err)
	}
	return st, true, nil
}

// lockBuckets is how many project locks a batch can take at most. Each
// batch serializes with concurrent ones on the projects it touches by one
// advisory lock per bucket of projects, not per project: Postgres's lock
// table is shared and small (max_locks_per_transaction × max_connections,
// 6,400 by default), and a lock per project let one batch of 20,000
// projects exhaust it (53200, "out of shared memory") for ever.
const lockBuckets = 256

// lockClass is the first key of the bucket locks (the second is the bucket).
const lockClass = 0x6275

func lockBucket(projectID string) int32 {
	h := fnv.New32a()
	h.Write([]byte(projectID))
	return int32(h.Sum32() % lockBuckets)
}

// namesOf lists what the batch's valid events name: their projects, the
// projects' lock buckets in order, their builds and their ids (each list
// without repeats; builds and ids in order).
func namesOf(dec []fold.Decoded) (projects []string, buckets []int32, builds, ids []string) {
	seen := map[string]bool{}
	for i := range dec {
		ev, err := dec[i].Event()
		if err != nil {
			continue
		}
		if !seen[ev.ProjectID] {
			seen[ev.ProjectID] = true
			projects = append(projects, ev.ProjectID)
			buckets = append(buckets, lockBucket(ev.ProjectID))
		}
		builds = append(builds, ev.BuildID)
		ids = append(ids, ev.ID)
	}
	slices.Sort(buckets)
	slices.Sort(builds)
	slices.Sort(ids)
	return projects, slices.Compact(buckets), slices.Compact(builds), slices.Compact(ids)
}

// claimBuildsSQL claims builds nobody had claimed when the batch read them
// (or its fence's memory took for new). A plain insert: a build claimed
// meanwhile by a concurrent transaction (it waits for that one's commit),
// or one the memory did not know, fails it on the key (raced).
const claimBuildsSQL = `
INSERT INTO projector_builds (build_id, project_id)
SELECT * FROM unnest($1::text[], $2::text[])`

// claimedBuildsSQL lists every build the projects claimed
// (projector_builds_project_idx).
const claimedBuildsSQL = `SELECT project_id, build_id FROM projector_builds WHERE project_id = ANY($1::text[])`

const buildOwnersSQL = `SELECT build_id, project_id FROM projector_builds WHERE build_id = ANY($1::text[])`

// markAppliedSQL marks ids applied that were not when the batch read them
// (as claimBuildsSQL).
const markAppliedSQL = `
INSERT INTO projector_applied (event_id, digest, stream_seq)
SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[])`

// raceKeys are the keys on which a batch's inserts find what it took for
// new (claimBuildsSQL, markAppliedSQL, insertFactsSQL): the rows of a
// concurrent transaction that committed after the batch read, or of one
// the fence's memory did not know.
var raceKeys = map[string]bool{"projector_builds_pkey": true, "projector_applied_pkey": true, "projector_facts_pkey": true}

// raced reports whether err is a unique violation on a raceKeys key: the
// batch is folded again on what the store holds (errRaced), never a dead
// letter.
func raced(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505" && raceKeys[pgErr.ConstraintName]
}

const appliedDigestsSQL = `SELECT event_id, digest FROM projector_applied WHERE event_id = ANY($1::text[])`

const factColumns = `f.build_id, f.kind, f.project_id, f.event_id, f.occurred_at,
       f.framework, f.node_version, f.package_manager, f.attempt, f.outcome, f.duration_ms, f.error, f.timed_out`

// loadViewSQL loads what a batch needs: the facts of its own builds ($1) and
// of the role holders of its projects ($2), each by primary key. A fact
// found by both halves comes twice; scanFacts keeps one.
const loadViewSQL = `
SELECT ` + factColumns + ` FROM projector_facts f WHERE f.build_id = ANY($1::text[])
UNION ALL
SELECT ` + factColumns + ` FROM projector_roles r
JOIN projector_facts f ON f.build_id IN (r.newest_build, r.started_build, r.current_build, r.framework_build)
WHERE r.project_id = ANY($2::text[])`

// loadProjectsSQL loads whole histories, for the rare batch that demotes a
// role holder (fsm.Demoted).
const loadProjectsSQL = `
SELECT ` + factColumns + ` FROM projector_builds b JOIN projector_facts f ON f.build_id = b.build_id
WHERE b.project_id = ANY($1::text[])`

// scanFacts reads fact rows into builds by project and build id.
func scanFacts(rows pgx.Rows) (map[string]map[string]*fsm.Build, error) {
	out := map[string]map[string]*fsm.Build{}
	var buildID, kind, projectID, eventID string
	var at time.Time
	var d events.Data
	var outcome *string
	_, err := pgx.ForEachRow(rows, []any{&buildID, &kind, &projectID, &eventID, &at,
		&d.Framework, &d.NodeVersion, &d.PackageManager, &d.Attempt, &outcome, &d.DurationMS, &d.Error, &d.TimedOut}, func() error {
		builds := out[projectID]
		if builds == nil {
			builds = map[string]*fsm.Build{}
			out[projectID] = builds
		}
		b := builds[buildID]
		if b == nil {
			b = &fsm.Build{ID: buildID, ProjectID: projectID}
			builds[buildID] = b
		}
		data := d
		data.Outcome = ""
		if outcome != nil {
			data.Outcome = events.Outcome(*outcome)
		}
		*b.Step(events.Kind(kind)) = &fsm.Step{EventID: eventID, At: at.UTC(), Data: data}
		// Fresh pointers for the next row: the scanned ones now belong to data.
		d = events.Data{}
		outcome = nil
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("load facts: %w", err)
	}
	return out, nil
}
