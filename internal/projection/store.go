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
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/events"
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
type Message struct {
	Seq      uint64
	Subject  string
	Data     []byte
	StoredAt time.Time
}

// Result counts what one Apply did.
type Result struct {
	Applied      int // events that were new and valid
	Duplicates   int // events whose id was already applied (same content)
	DeadLettered int // messages kept as dead letters
	Dropped      int // optional measurements left out of applied events (events.Decode)
}

func (r *Result) add(o Result) {
	r.Applied += o.Applied
	r.Duplicates += o.Duplicates
	r.DeadLettered += o.DeadLettered
	r.Dropped += o.Dropped
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
}

// Store applies messages to the read model reached through its pool (whose
// search_path selects the live or a shadow schema).
type Store struct {
	pool *pgxpool.Pool
	opts Options
}

// ConfigurePool sets what the store's connections need: a custom plan for
// every execution (the batch statements take arrays whose sizes vary and
// tables that grow fast from empty; a generic plan made while a table was
// small would scan it whole for ever), and no JIT (it compiled these short
// statements for longer than they ran).
func ConfigurePool(cfg *pgxpool.Config) {
	cfg.ConnConfig.RuntimeParams["plan_cache_mode"] = "force_custom_plan"
	cfg.ConnConfig.RuntimeParams["jit"] = "off"
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
	return &Store{pool: pool, opts: opts}
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
func (s *Store) Apply(ctx context.Context, msgs []Message) (Result, error) {
	return s.applyIsolating(ctx, msgs, nil)
}

// applyIsolating applies msgs (re-driven dead letters with their new retry
// counts in retries, nil for live messages); when the database refuses
// their content, it applies each half on its own, in sequence order (a
// batch acts as if applied one by one in that order, so halves applied one
// after the other give the same rows), down to the single messages it
// refuses, which it keeps as dead letters.
func (s *Store) applyIsolating(ctx context.Context, msgs []Message, retries map[uint64]int) (Result, error) {
	res, err := s.apply(ctx, msgs, retries)
	if err == nil || !Refused(err) {
		return res, err
	}
	if len(msgs) == 1 {
		s.opts.Logger.Warn("message refused by the database; kept as a dead letter",
			zap.Uint64("stream_seq", msgs[0].Seq), zap.Error(err))
		return s.reject(ctx, msgs[0], err, retries)
	}
	sorted := slices.Clone(msgs)
	slices.SortFunc(sorted, func(a, b Message) int { return cmp.Compare(a.Seq, b.Seq) })
	var total Result
	for _, half := range [][]Message{sorted[:len(sorted)/2], sorted[len(sorted)/2:]} {
		r, err := s.applyIsolating(ctx, half, retries)
		if err != nil {
			return Result{}, err
		}
		total.add(r)
	}
	return total, nil
}

// reject keeps msg, which the database refused with err, as a dead letter.
func (s *Store) reject(ctx context.Context, msg Message, cause error, retries map[uint64]int) (Result, error) {
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
	if s.opts.Gate {
		wb.Queue(`SELECT pg_advisory_xact_lock_shared($1::int4, $2::int4)`, gateClass, gateID)
	}
	wb.Queue(`DELETE FROM projector_dead_letters WHERE stream_seq = $1`, int64(msg.Seq))
	queueDeadLetters(wb, []Refusal{{Msg: msg, Reason: events.ReasonRejectedByDatabase, Detail: detail}}, s.opts.Prefix, retries)
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return tx.SendBatch(ctx, wb).Close() })
	if err != nil {
		return Result{}, fmt.Errorf("keep refused message %d: %w", msg.Seq, err)
	}
	return Result{DeadLettered: 1}, nil
}

func (s *Store) apply(ctx context.Context, msgs []Message, retries map[uint64]int) (Result, error) {
	b := batch{retries: retries}
	s.prepare(&b, msgs)
	var res Result
	var err error
	for attempt := 1; ; attempt++ {
		var drops []droppedField
		res, drops, err = s.applyOnce(ctx, b)
		if err == nil {
			s.reportDropped(drops)
			return res, nil
		}
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || !retryable[pgErr.Code] {
			return Result{}, err
		}
		if s.opts.Observer != nil {
			s.opts.Observer.WriteRetried(pgErr.Code, pgErr.ConstraintName)
		}
		s.opts.Logger.Warn("write retried",
			zap.String("sqlstate", pgErr.Code), zap.String("constraint", pgErr.ConstraintName),
			zap.Int("attempt", attempt), zap.Error(err))
		if attempt >= s.opts.Retries {
			return Result{}, fmt.Errorf("%w after %d attempts: %w", ErrRetriesExhausted, attempt, err)
		}
		wait := time.Duration(10<<attempt)*time.Millisecond + rand.N(10*time.Millisecond)
		select {
		case <-ctx.Done():
			return Result{}, ctx.Err()
		case <-time.After(wait):
		}
	}
}

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

// candidate is a decoded message that passed the contract's stateless rules.
type candidate struct {
	msg    Message
	ev     events.Event
	digest []byte
}

type batch struct {
	rounds [][]candidate // candidates, each id at most once a round
	dead   []Refusal     // refused by Decode

	redrive []int64        // the batch's re-driven dead letters, taken out first (a retry)
	retries map[uint64]int // re-driven dead letters and their new retry counts
}

// prepare decodes the batch and settles what needs no database: invalid
// bodies, and repeats or id conflicts inside the batch (the lower sequence wins).
func (s *Store) prepare(b *batch, msgs []Message) {
	sorted := append([]Message(nil), msgs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Seq < sorted[j].Seq })
	type last struct {
		round   int
		project string
	}
	byID := map[string]int{}     // round+1 of the last event with that id
	byBuild := map[string]last{} // round and project of the last event naming that build
	for _, m := range sorted {
		if _, ok := b.retries[m.Seq]; ok {
			b.redrive = append(b.redrive, int64(m.Seq))
		}
		ev, err := events.Decode(s.opts.Prefix, m.Subject, m.Data, m.StoredAt)
		if err != nil {
			b.dead = append(b.dead, RefusalOf(m, err))
			continue
		}
		d := ev.Digest()
		// Rounds make a batch act as if its messages were applied one by one,
		// in sequence order. A repeat of an id goes to a later round than the
		// id's last copy, so it sees whether that one was applied. An event
		// naming a build goes to no earlier round than the last event before
		// it naming that build, and to a later one if that event named another
		// project, so each round claims a build for one project, in sequence
		// order, and a refused claim is undone before the next claim is tried.
		n := byID[ev.ID]
		if l, ok := byBuild[ev.BuildID]; ok {
			if l.project == ev.ProjectID {
				n = max(n, l.round)
			} else {
				n = max(n, l.round+1)
			}
		}
		byID[ev.ID] = n + 1
		byBuild[ev.BuildID] = last{round: n, project: ev.ProjectID}
		if n == len(b.rounds) {
			b.rounds = append(b.rounds, nil)
		}
		b.rounds[n] = append(b.rounds[n], candidate{msg: m, ev: ev, digest: d[:]})
	}
}

// applyOnce applies the batch in one transaction; drops are the
// measurements left out of the events it applied, to report once committed.
func (s *Store) applyOnce(ctx context.Context, b batch) (res Result, drops []droppedField, err error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return Result{}, nil, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit this is a no-op
	if len(b.redrive) > 0 {
		// A retry: the letters leave; those still refused are written again below.
		if _, err := tx.Exec(ctx, `DELETE FROM projector_dead_letters WHERE stream_seq = ANY($1)`, b.redrive); err != nil {
			return Result{}, nil, fmt.Errorf("take out dead letters: %w", err)
		}
	}
	res = Result{DeadLettered: len(b.dead)}
	wb := &pgx.Batch{}
	queueDeadLetters(wb, b.dead, s.opts.Prefix, b.retries)
	for i, round := range b.rounds {
		if i == 0 {
			err = s.applyRound(ctx, tx, round, b, wb, &res, &drops)
		} else {
			err = s.applyRound(ctx, tx, round, batch{retries: b.retries}, wb, &res, &drops)
		}
		if err != nil {
			return Result{}, nil, err
		}
		if err := tx.SendBatch(ctx, wb).Close(); err != nil {
			return Result{}, nil, fmt.Errorf("write: %w", err)
		}
		wb = &pgx.Batch{}
	}
	if wb.Len() > 0 {
		if err := tx.SendBatch(ctx, wb).Close(); err != nil {
			return Result{}, nil, fmt.Errorf("write: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return Result{}, nil, fmt.Errorf("commit: %w", err)
	}
	return res, drops, nil
}

// applyRound reads what the round needs, classifies its events, decides the
// plans and queues the writes on wb (sent by the caller before the next round).
func (s *Store) applyRound(ctx context.Context, tx pgx.Tx, cands []candidate, b batch, wb *pgx.Batch, res *Result,
	drops *[]droppedField) error {
	st, err := s.read(ctx, tx, cands, b)
	if err != nil {
		return err
	}
	var dead []Refusal
	var fresh []candidate
	var undo []string // ids marked applied by this round whose event is refused after all
	for _, c := range cands {
		if owner := st.owners[c.ev.BuildID]; owner != c.ev.ProjectID {
			dead = append(dead, Refusal{Msg: c.msg, Reason: events.ReasonBuildProjectClash,
				Detail: fmt.Sprintf("build %q belongs to project %q, not %q", c.ev.BuildID, owner, c.ev.ProjectID)})
			if st.marked[c.ev.ID] {
				undo = append(undo, c.ev.ID)
			}
			continue
		}
		if st.marked[c.ev.ID] {
			fresh = append(fresh, c)
			continue
		}
		if string(st.digests[c.ev.ID]) == string(c.digest) {
			res.Duplicates++
			continue
		}
		dead = append(dead, Refusal{Msg: c.msg, Reason: events.ReasonIDConflict,
			Detail: fmt.Sprintf("id %q was applied before with different content", c.ev.ID)})
	}
	// A build claimed by this round for no applied event stays unclaimed: a
	// refused event owns nothing.
	var unclaim []string
	named := map[string]bool{}
	for _, c := range fresh {
		named[c.ev.BuildID] = true
	}
	for id := range st.claimed {
		if !named[id] {
			unclaim = append(unclaim, id)
		}
	}
	res.Applied += len(fresh)
	res.DeadLettered += len(dead)
	for _, c := range fresh {
		for _, d := range c.ev.Dropped {
			*drops = append(*drops, droppedField{msg: c.msg, id: c.ev.ID, drop: d})
		}
	}
	res.Dropped = len(*drops)

	dec, err := decide(ctx, st.facts, fresh, func(ctx context.Context, projects []string) (map[string]map[string]*fsm.Build, error) {
		rows, _ := tx.Query(ctx, loadProjectsSQL, projects)
		return scanFacts(rows)
	})
	if err != nil {
		return err
	}
	if len(undo) > 0 {
		wb.Queue(`DELETE FROM projector_applied WHERE event_id = ANY($1::text[])`, undo)
	}
	if len(unclaim) > 0 {
		slices.Sort(unclaim)
		wb.Queue(`DELETE FROM projector_builds WHERE build_id = ANY($1::text[])`, unclaim)
	}
	queueFacts(wb, dec.facts)
	queueRoles(wb, dec.roles)
	queueDeadLetters(wb, dead, s.opts.Prefix, b.retries)
	queuePlans(wb, dec.plans)
	return nil
}

// state is what a batch needs to know from the database.
type state struct {
	owners  map[string]string                // build id → owning project
	claimed map[string]bool                  // builds this round claimed
	marked  map[string]bool                  // event ids this batch marked applied
	digests map[string][]byte                // digests of ids applied before
	facts   map[string]map[string]*fsm.Build // project → build id → stored facts
}

// read sends, in one round trip and in this order: the rebuild gate
// (shared) and one advisory lock per bucket of projects, in order so that
// concurrent projectors cannot deadlock on them; the removal of re-driven
// dead letters; the claim of every build (the first project to name a build
// owns it); the mark of every event id as applied; and the stored facts of
// every project the batch touches.
func (s *Store) read(ctx context.Context, tx pgx.Tx, cands []candidate, b batch) (state, error) {
	st := state{owners: map[string]string{}, claimed: map[string]bool{}, marked: map[string]bool{}, digests: map[string][]byte{}}
	projects, keys := projectsOf(cands)
	builds, owners := buildsOf(cands)
	ids, digests, seqs := idsOf(cands)

	rb := &pgx.Batch{}
	if s.opts.Gate {
		rb.Queue(`SELECT pg_advisory_xact_lock_shared($1::int4, $2::int4)`, gateClass, gateID)
	}
	if len(keys) > 0 {
		rb.Queue(`SELECT count(pg_advisory_xact_lock($1::int4, k)) FROM unnest($2::int4[]) AS k`, lockClass, keys)
	}
	if len(cands) > 0 {
		rb.Queue(claimBuildsSQL, builds, owners).Query(func(rows pgx.Rows) error {
			var id, project string
			var claimed bool
			_, err := pgx.ForEachRow(rows, []any{&id, &project, &claimed}, func() error {
				st.owners[id] = project
				if claimed {
					st.claimed[id] = true
				}
				return nil
			})
			return err
		})
		rb.Queue(markAppliedSQL, ids, digests, seqs).Query(func(rows pgx.Rows) error {
			var id string
			var digest []byte
			var inserted bool
			_, err := pgx.ForEachRow(rows, []any{&id, &digest, &inserted}, func() error {
				if inserted {
					st.marked[id] = true
				} else {
					st.digests[id] = append([]byte(nil), digest...)
				}
				return nil
			})
			return err
		})
		rb.Queue(loadViewSQL, builds, projects).Query(func(rows pgx.Rows) error {
			var err error
			st.facts, err = scanFacts(rows)
			return err
		})
	}
	if err := tx.SendBatch(ctx, rb).Close(); err != nil {
		return state{}, fmt.Errorf("read: %w", err)
	}
	// A row committed by a concurrent transaction after this statement's
	// snapshot is not returned by the statements above: read it afresh.
	var missingBuilds, missingIDs []string
	for _, id := range builds {
		if _, ok := st.owners[id]; !ok {
			missingBuilds = append(missingBuilds, id)
		}
	}
	for _, id := range ids {
		if _, ok := st.digests[id]; !ok && !st.marked[id] {
			missingIDs = append(missingIDs, id)
		}
	}
	if len(missingBuilds) > 0 {
		rows, _ := tx.Query(ctx, buildOwnersSQL, missingBuilds)
		var id, project string
		if _, err := pgx.ForEachRow(rows, []any{&id, &project}, func() error {
			st.owners[id] = project
			return nil
		}); err != nil {
			return state{}, fmt.Errorf("read build owners: %w", err)
		}
	}
	if len(missingIDs) > 0 {
		rows, _ := tx.Query(ctx, `SELECT event_id, digest FROM projector_applied WHERE event_id = ANY($1::text[])`, missingIDs)
		var id string
		var digest []byte
		if _, err := pgx.ForEachRow(rows, []any{&id, &digest}, func() error {
			st.digests[id] = append([]byte(nil), digest...)
			return nil
		}); err != nil {
			return state{}, fmt.Errorf("read applied digests: %w", err)
		}
	}
	return st, nil
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

// projectsOf lists the batch's projects and their lock buckets in order.
func projectsOf(cands []candidate) ([]string, []int32) {
	seen := map[string]bool{}
	var projects []string
	var buckets []int32
	for _, c := range cands {
		if !seen[c.ev.ProjectID] {
			seen[c.ev.ProjectID] = true
			projects = append(projects, c.ev.ProjectID)
			buckets = append(buckets, lockBucket(c.ev.ProjectID))
		}
	}
	slices.Sort(buckets)
	return projects, slices.Compact(buckets)
}

// buildsOf lists the batch's builds in id order (one insertion order for
// every projector) with the project that names each first.
func buildsOf(cands []candidate) (builds, owners []string) {
	owner := map[string]string{}
	for _, c := range cands {
		if _, ok := owner[c.ev.BuildID]; !ok {
			owner[c.ev.BuildID] = c.ev.ProjectID
			builds = append(builds, c.ev.BuildID)
		}
	}
	slices.Sort(builds)
	owners = make([]string, len(builds))
	for i, b := range builds {
		owners[i] = owner[b]
	}
	return builds, owners
}

// idsOf lists the batch's event ids in id order with digests and sequences.
func idsOf(cands []candidate) (ids []string, digests [][]byte, seqs []int64) {
	sorted := slices.Clone(cands)
	slices.SortFunc(sorted, func(a, b candidate) int { return strings.Compare(a.ev.ID, b.ev.ID) })
	ids, digests, seqs = make([]string, len(sorted)), make([][]byte, len(sorted)), make([]int64, len(sorted))
	for i, c := range sorted {
		ids[i], digests[i], seqs[i] = c.ev.ID, c.digest, int64(c.msg.Seq)
	}
	return ids, digests, seqs
}

// claimBuildsSQL claims unowned builds and returns the owner of every build
// named: the new rows from the insert, the existing ones from the table.
const claimBuildsSQL = `
WITH ins AS (
    INSERT INTO projector_builds (build_id, project_id)
    SELECT * FROM unnest($1::text[], $2::text[])
    ON CONFLICT (build_id) DO NOTHING
    RETURNING build_id, project_id)
SELECT build_id, project_id, true FROM ins
UNION ALL
SELECT b.build_id, b.project_id, false FROM projector_builds b
WHERE b.build_id = ANY($1::text[]) AND NOT EXISTS (SELECT 1 FROM ins WHERE ins.build_id = b.build_id)`

const buildOwnersSQL = `SELECT build_id, project_id FROM projector_builds WHERE build_id = ANY($1::text[])`

// markAppliedSQL marks new ids applied and returns, for ids applied before,
// their stored digest (a repeat with the same digest is a duplicate).
const markAppliedSQL = `
WITH ins AS (
    INSERT INTO projector_applied (event_id, digest, stream_seq)
    SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[])
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id)
SELECT event_id, NULL::bytea, true FROM ins
UNION ALL
SELECT a.event_id, a.digest, false FROM projector_applied a
WHERE a.event_id = ANY($1::text[]) AND NOT EXISTS (SELECT 1 FROM ins WHERE ins.event_id = a.event_id)`

// detailOf is the human part of a rejection (the reason has its own
// column), in the words of events.Plain.
func detailOf(err error) string {
	var ie *events.InvalidError
	if errors.As(err, &ie) {
		return events.PlainText(ie.Detail)
	}
	return events.Plain(err)
}

// factRow is one projector_facts row to write.
type factRow struct {
	build   *fsm.Build
	kind    events.Kind
	step    *fsm.Step
	seq     uint64
	project string
}

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

// decision is the outcome of folding a batch into its projects.
type decision struct {
	plans []fsm.Plan
	facts []factRow
	roles map[string]fsm.Roles // projects whose role holders changed
}

// loader reads whole histories of projects.
type loader func(ctx context.Context, projectIDs []string) (map[string]map[string]*fsm.Build, error)

// decide folds the new events into the stored facts of their projects and
// asks each project's machine for its plan. before holds each project's role
// holders and the batch's builds; a project where that is not enough (a
// holder was demoted) is decided again on its whole history from load.
func decide(ctx context.Context, before map[string]map[string]*fsm.Build, cands []candidate, load loader) (decision, error) {
	d := decision{roles: map[string]fsm.Roles{}}
	if len(cands) == 0 {
		return d, nil
	}
	byProject := map[string][]candidate{}
	var projectIDs []string
	for _, c := range cands {
		if _, ok := byProject[c.ev.ProjectID]; !ok {
			projectIDs = append(projectIDs, c.ev.ProjectID)
		}
		byProject[c.ev.ProjectID] = append(byProject[c.ev.ProjectID], c)
	}
	slices.Sort(projectIDs)
	var whole []string
	results := map[string]projectDecision{}
	for _, p := range projectIDs {
		pd, ok := decideProject(ctx, p, before[p], byProject[p], false)
		if !ok {
			whole = append(whole, p)
			continue
		}
		results[p] = pd
	}
	if len(whole) > 0 {
		full, err := load(ctx, whole)
		if err != nil {
			return d, err
		}
		for _, p := range whole {
			pd, _ := decideProject(ctx, p, full[p], byProject[p], true)
			results[p] = pd
		}
	}
	for _, p := range projectIDs {
		pd := results[p]
		if pd.err != nil {
			return d, pd.err
		}
		if len(pd.plan.Actions) > 0 {
			d.plans = append(d.plans, pd.plan)
		}
		d.facts = append(d.facts, pd.facts...)
		if pd.rolesChanged {
			d.roles[p] = pd.roles
		}
	}
	return d, nil
}

type projectDecision struct {
	plan         fsm.Plan
	facts        []factRow
	roles        fsm.Roles
	rolesChanged bool
	err          error
}

// decideProject merges one project's new events into its builds. With whole
// false, the builds are a subset, and ok is false when that is not enough.
func decideProject(ctx context.Context, p string, stored map[string]*fsm.Build, cands []candidate, whole bool) (projectDecision, bool) {
	beforeList := values(stored)
	rolesBefore := fsm.RolesOf(beforeList)
	after := make(map[string]*fsm.Build, len(stored)+1)
	for id, b := range stored {
		cp := *b
		after[id] = &cp
	}
	changed := map[[2]string]factRow{}
	for _, c := range cands {
		b := after[c.ev.BuildID]
		if b == nil {
			b = &fsm.Build{ID: c.ev.BuildID, ProjectID: p}
			after[c.ev.BuildID] = b
		}
		if b.Merge(c.ev) {
			k := c.ev.Kind()
			changed[[2]string{c.ev.BuildID, string(k)}] = factRow{build: b, kind: k, step: *b.Step(k), seq: c.msg.Seq, project: p}
		}
	}
	if !whole {
		for id, b := range stored {
			if rolesBefore.Holds(id) && fsm.Demoted(b, after[id]) {
				return projectDecision{}, false
			}
		}
	}
	afterList := values(after)
	pd := projectDecision{roles: fsm.RolesOf(afterList)}
	pd.rolesChanged = pd.roles != rolesBefore
	for _, f := range changed {
		pd.facts = append(pd.facts, f)
	}
	slices.SortFunc(pd.facts, func(a, b factRow) int {
		if c := strings.Compare(a.build.ID, b.build.ID); c != 0 {
			return c
		}
		return strings.Compare(string(a.kind), string(b.kind))
	})
	pd.plan, pd.err = fsm.Decide(ctx, p, fsm.Derive(p, beforeList), fsm.Derive(p, afterList))
	if pd.err != nil {
		pd.err = fmt.Errorf("decide: %w", pd.err)
	}
	return pd, true
}

func values(m map[string]*fsm.Build) []*fsm.Build {
	out := make([]*fsm.Build, 0, len(m))
	for _, b := range m {
		out = append(out, b)
	}
	return out
}

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
