// Package projection is the Postgres read model: it applies batches of log
// messages to the projects and project_build_metrics tables, keeps the
// projector's own bookkeeping (facts, applied ids, dead letters) in the same
// transactions, and answers the queries the commands need.
package projection

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"sort"
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
}

// Observer hears about write retries (for metrics).
type Observer interface {
	WriteRetried(sqlstate, constraint string)
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

// New returns a Store over pool.
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
// A retryable write error is retried in a fresh transaction with backoff; any
// other error leaves nothing written, and the caller redelivers the batch.
func (s *Store) Apply(ctx context.Context, msgs []Message) (Result, error) {
	return s.apply(ctx, msgs, batch{})
}

func (s *Store) apply(ctx context.Context, msgs []Message, b batch) (Result, error) {
	s.prepare(&b, msgs)
	var res Result
	var err error
	for attempt := 1; ; attempt++ {
		res, err = s.applyOnce(ctx, b)
		if err == nil {
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

// candidate is a decoded message that passed the contract's stateless rules.
type candidate struct {
	msg    Message
	seq    uint64
	ev     events.Event
	digest []byte
}

type deadLetter struct {
	msg    Message
	reason events.Reason
	detail string
}

type batch struct {
	cands []candidate
	dead  []deadLetter
	dups  int // repeats inside the batch

	redrive []int64        // dead letters to take out first (a retry)
	retries map[uint64]int // their retry counts, kept if they die again
}

// prepare decodes the batch and settles what needs no database: invalid
// bodies, and repeats or id conflicts inside the batch (the lower sequence wins).
func (s *Store) prepare(b *batch, msgs []Message) {
	sorted := append([]Message(nil), msgs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Seq < sorted[j].Seq })
	seen := map[string][]byte{}
	for _, m := range sorted {
		ev, err := events.Decode(s.opts.Prefix, m.Subject, m.Data, m.StoredAt)
		if err != nil {
			b.dead = append(b.dead, deadLetter{msg: m, reason: events.ReasonOf(err), detail: err.Error()})
			continue
		}
		d := ev.Digest()
		if prev, ok := seen[ev.ID]; ok {
			if string(prev) == string(d[:]) {
				b.dups++
			} else {
				b.dead = append(b.dead, deadLetter{msg: m, reason: events.ReasonIDConflict,
					detail: fmt.Sprintf("id %q was seen earlier in the log with different content", ev.ID)})
			}
			continue
		}
		seen[ev.ID] = d[:]
		b.cands = append(b.cands, candidate{msg: m, seq: m.Seq, ev: ev, digest: d[:]})
	}
}

func (s *Store) applyOnce(ctx context.Context, b batch) (Result, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit this is a no-op
	res := Result{Duplicates: b.dups}
	dead := append([]deadLetter(nil), b.dead...)
	if err := s.lock(ctx, tx, b.cands); err != nil {
		return Result{}, err
	}
	if len(b.redrive) > 0 {
		if _, err := tx.Exec(ctx, `DELETE FROM projector_dead_letters WHERE stream_seq = ANY($1)`, b.redrive); err != nil {
			return Result{}, fmt.Errorf("take out dead letters: %w", err)
		}
	}
	cands, conflicts, err := claimBuilds(ctx, tx, b.cands)
	if err != nil {
		return Result{}, err
	}
	dead = append(dead, conflicts...)
	cands, dups, conflicts, err := markApplied(ctx, tx, cands)
	if err != nil {
		return Result{}, err
	}
	res.Duplicates += dups
	dead = append(dead, conflicts...)
	res.Applied = len(cands)
	res.DeadLettered = len(dead)

	plans, facts, err := s.decide(ctx, tx, cands)
	if err != nil {
		return Result{}, err
	}
	wb := &pgx.Batch{}
	queueFacts(wb, facts)
	queueDeadLetters(wb, dead, b.retries)
	queuePlans(wb, plans)
	if err := tx.SendBatch(ctx, wb).Close(); err != nil {
		return Result{}, fmt.Errorf("write: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return Result{}, fmt.Errorf("commit: %w", err)
	}
	return res, nil
}

// lock takes the rebuild gate (shared) and one advisory lock per project, in
// key order so that concurrent projectors cannot deadlock on them.
func (s *Store) lock(ctx context.Context, tx pgx.Tx, cands []candidate) error {
	keys := make([]int64, 0, len(cands))
	seen := map[string]bool{}
	for _, c := range cands {
		if !seen[c.ev.ProjectID] {
			seen[c.ev.ProjectID] = true
			keys = append(keys, lockKey(c.ev.ProjectID))
		}
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	lb := &pgx.Batch{}
	if s.opts.Gate {
		lb.Queue(`SELECT pg_advisory_xact_lock_shared($1::int4, $2::int4)`, gateClass, gateID)
	}
	if len(keys) > 0 {
		lb.Queue(`SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS k`, keys)
	}
	if lb.Len() == 0 {
		return nil
	}
	if err := tx.SendBatch(ctx, lb).Close(); err != nil {
		return fmt.Errorf("lock projects: %w", err)
	}
	return nil
}

func lockKey(projectID string) int64 {
	h := fnv.New64a()
	h.Write([]byte(projectID))
	return int64(h.Sum64())
}

const claimBuildsSQL = `
INSERT INTO projector_builds (build_id, project_id)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (build_id) DO NOTHING`

const buildOwnersSQL = `SELECT build_id, project_id FROM projector_builds WHERE build_id = ANY($1::text[])`

// claimBuilds records the owner of each new build and refuses events that
// name a build already owned by another project.
func claimBuilds(ctx context.Context, tx pgx.Tx, cands []candidate) ([]candidate, []deadLetter, error) {
	if len(cands) == 0 {
		return nil, nil, nil
	}
	owner := map[string]string{} // first claim in sequence order, inside the batch
	for _, c := range cands {
		if _, ok := owner[c.ev.BuildID]; !ok {
			owner[c.ev.BuildID] = c.ev.ProjectID
		}
	}
	ids := make([]string, 0, len(owner))
	for id := range owner {
		ids = append(ids, id)
	}
	sort.Strings(ids) // one insertion order for every projector
	projects := make([]string, len(ids))
	for i, id := range ids {
		projects[i] = owner[id]
	}
	if _, err := tx.Exec(ctx, claimBuildsSQL, ids, projects); err != nil {
		return nil, nil, fmt.Errorf("claim builds: %w", err)
	}
	rows, err := tx.Query(ctx, buildOwnersSQL, ids)
	if err != nil {
		return nil, nil, fmt.Errorf("read build owners: %w", err)
	}
	stored := map[string]string{}
	var id, project string
	if _, err := pgx.ForEachRow(rows, []any{&id, &project}, func() error {
		stored[id] = project
		return nil
	}); err != nil {
		return nil, nil, fmt.Errorf("read build owners: %w", err)
	}
	var ok []candidate
	var dead []deadLetter
	for _, c := range cands {
		if p := stored[c.ev.BuildID]; p != c.ev.ProjectID {
			dead = append(dead, deadLetter{msg: c.message(), reason: events.ReasonBuildProjectClash,
				detail: fmt.Sprintf("build %q belongs to project %q, not %q", c.ev.BuildID, p, c.ev.ProjectID)})
			continue
		}
		ok = append(ok, c)
	}
	return ok, dead, nil
}

const markAppliedSQL = `
INSERT INTO projector_applied (event_id, digest, stream_seq)
SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[])
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id`

const appliedDigestsSQL = `SELECT event_id, digest FROM projector_applied WHERE event_id = ANY($1::text[])`

// markApplied records each event id as applied; an id applied before is a
// duplicate when its content matches and a conflict when it does not.
func markApplied(ctx context.Context, tx pgx.Tx, cands []candidate) (fresh []candidate, dups int, dead []deadLetter, err error) {
	if len(cands) == 0 {
		return nil, 0, nil, nil
	}
	sorted := append([]candidate(nil), cands...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].ev.ID < sorted[j].ev.ID })
	ids := make([]string, len(sorted))
	digests := make([][]byte, len(sorted))
	seqs := make([]int64, len(sorted))
	for i, c := range sorted {
		ids[i], digests[i], seqs[i] = c.ev.ID, c.digest, int64(c.seq)
	}
	rows, err := tx.Query(ctx, markAppliedSQL, ids, digests, seqs)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("mark applied: %w", err)
	}
	inserted, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, 0, nil, fmt.Errorf("mark applied: %w", err)
	}
	isNew := make(map[string]bool, len(inserted))
	for _, id := range inserted {
		isNew[id] = true
	}
	var old []string
	for _, c := range cands {
		if isNew[c.ev.ID] {
			fresh = append(fresh, c)
		} else {
			old = append(old, c.ev.ID)
		}
	}
	if len(old) == 0 {
		return fresh, 0, nil, nil
	}
	rows, err = tx.Query(ctx, appliedDigestsSQL, old)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("read applied digests: %w", err)
	}
	stored := map[string][]byte{}
	var id string
	var digest []byte
	if _, err := pgx.ForEachRow(rows, []any{&id, &digest}, func() error {
		stored[id] = append([]byte(nil), digest...)
		return nil
	}); err != nil {
		return nil, 0, nil, fmt.Errorf("read applied digests: %w", err)
	}
	for _, c := range cands {
		if isNew[c.ev.ID] {
			continue
		}
		if string(stored[c.ev.ID]) == string(c.digest) {
			dups++
			continue
		}
		dead = append(dead, deadLetter{msg: c.message(), reason: events.ReasonIDConflict,
			detail: fmt.Sprintf("id %q was applied before with different content", c.ev.ID)})
	}
	return fresh, dups, dead, nil
}

func (c candidate) message() Message { return c.msg }

// factRow is one projector_facts row to write.
type factRow struct {
	build   *fsm.Build
	kind    events.Kind
	step    *fsm.Step
	seq     uint64
	project string
}

const loadFactsSQL = `
SELECT build_id, kind, project_id, event_id, occurred_at, data
FROM projector_facts WHERE project_id = ANY($1::text[])`

// decide loads the facts of every project the batch touches, folds the new
// events in, and asks each project's machine for its plan.
func (s *Store) decide(ctx context.Context, tx pgx.Tx, cands []candidate) ([]fsm.Plan, []factRow, error) {
	if len(cands) == 0 {
		return nil, nil, nil
	}
	var projectIDs []string
	touched := map[string]bool{}
	for _, c := range cands {
		if !touched[c.ev.ProjectID] {
			touched[c.ev.ProjectID] = true
			projectIDs = append(projectIDs, c.ev.ProjectID)
		}
	}
	sort.Strings(projectIDs)
	before, err := loadFacts(ctx, tx, projectIDs)
	if err != nil {
		return nil, nil, err
	}
	after := map[string]map[string]*fsm.Build{}
	for p, builds := range before {
		after[p] = map[string]*fsm.Build{}
		for id, b := range builds {
			cp := *b
			after[p][id] = &cp
		}
	}
	changed := map[[2]string]factRow{}
	for _, c := range cands {
		builds := after[c.ev.ProjectID]
		if builds == nil {
			builds = map[string]*fsm.Build{}
			after[c.ev.ProjectID] = builds
		}
		b := builds[c.ev.BuildID]
		if b == nil {
			b = &fsm.Build{ID: c.ev.BuildID, ProjectID: c.ev.ProjectID}
			builds[c.ev.BuildID] = b
		}
		if b.Merge(c.ev) {
			k := c.ev.Kind()
			changed[[2]string{c.ev.BuildID, string(k)}] = factRow{build: b, kind: k, step: *b.Step(k), seq: c.seq, project: c.ev.ProjectID}
		}
	}
	facts := make([]factRow, 0, len(changed))
	for _, f := range changed {
		facts = append(facts, f)
	}
	sort.Slice(facts, func(i, j int) bool {
		if facts[i].build.ID != facts[j].build.ID {
			return facts[i].build.ID < facts[j].build.ID
		}
		return facts[i].kind < facts[j].kind
	})
	plans := make([]fsm.Plan, 0, len(projectIDs))
	for _, p := range projectIDs {
		plan, err := fsm.Decide(ctx, p, fsm.Derive(p, values(before[p])), fsm.Derive(p, values(after[p])))
		if err != nil {
			return nil, nil, fmt.Errorf("decide: %w", err)
		}
		plans = append(plans, plan)
	}
	return plans, facts, nil
}

func values(m map[string]*fsm.Build) []*fsm.Build {
	out := make([]*fsm.Build, 0, len(m))
	for _, b := range m {
		out = append(out, b)
	}
	return out
}

// loadFacts reads the stored builds of projects, by project and build id.
func loadFacts(ctx context.Context, q pgx.Tx, projectIDs []string) (map[string]map[string]*fsm.Build, error) {
	rows, err := q.Query(ctx, loadFactsSQL, projectIDs)
	if err != nil {
		return nil, fmt.Errorf("load facts: %w", err)
	}
	out := map[string]map[string]*fsm.Build{}
	var buildID, kind, projectID, eventID string
	var at time.Time
	var data []byte
	_, err = pgx.ForEachRow(rows, []any{&buildID, &kind, &projectID, &eventID, &at, &data}, func() error {
		var d events.Data
		if err := json.Unmarshal(data, &d); err != nil {
			return fmt.Errorf("fact %s/%s: %w", buildID, kind, err)
		}
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
		*b.Step(events.Kind(kind)) = &fsm.Step{EventID: eventID, At: at.UTC(), Data: d}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("load facts: %w", err)
	}
	return out, nil
}
