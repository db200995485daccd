package projection

import (
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

	"github.com/buildstate/buildstate/internal/fold"
	"github.com/buildstate/buildstate/internal/fsm"
)

// The writes of one batch, sent in one round trip in this order: facts, dead
// letters, then every plan's phase 1, metrics rows, phase 2. Each plan's own
// actions are already in that order, so grouping them by kind keeps it.

// The facts the fold (internal/fold, fsm's winner rule) decided win over
// the stored ones: the statements do not decide again, so the rule has one
// place. A new fact (no stored fact of its build and kind, fold.Fact's
// Replaces) is a plain insert, which costs Postgres a third less than an
// upsert (no speculative insertion: measured 2.9–3.5 µs a row against
// 4.4–5.1 µs); if the store holds one after all (a memory that took the
// build for new) the key refuses it and the batch is folded again on what
// the store holds (errRaced). A replacing fact is an upsert.
const (
	factInsert = `
INSERT INTO projector_facts (build_id, kind, project_id, event_id, occurred_at, stream_seq,
    framework, node_version, package_manager, attempt, outcome, duration_ms, error, timed_out)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::bigint[],
    $7::text[], $8::text[], $9::text[], $10::bigint[], $11::text[], $12::bigint[], $13::text[], $14::bool[])`
	insertFactsSQL  = factInsert
	replaceFactsSQL = factInsert + `
ON CONFLICT (build_id, kind) DO UPDATE
SET event_id = excluded.event_id, occurred_at = excluded.occurred_at, stream_seq = excluded.stream_seq,
    framework = excluded.framework, node_version = excluded.node_version,
    package_manager = excluded.package_manager, attempt = excluded.attempt, outcome = excluded.outcome,
    duration_ms = excluded.duration_ms, error = excluded.error, timed_out = excluded.timed_out`
)

// factCols are the columns of facts, for one statement.
type factCols struct {
	builds, kinds, projects, ids               []string
	ats                                        []time.Time
	seqs                                       []int64
	frameworks, nodes, managers, errs, outcome []*string
	attempts, durations                        []*int64
	timedOut                                   []bool
}

func (c *factCols) add(f *fold.Fact) {
	d := f.Step.Data
	c.builds, c.kinds = append(c.builds, f.Build.ID), append(c.kinds, string(f.Kind))
	c.projects, c.ids = append(c.projects, f.Build.ProjectID), append(c.ids, f.Step.EventID)
	c.ats, c.seqs = append(c.ats, f.Step.At), append(c.seqs, int64(f.Seq))
	c.frameworks, c.nodes, c.managers = append(c.frameworks, d.Framework), append(c.nodes, d.NodeVersion), append(c.managers, d.PackageManager)
	c.errs, c.attempts, c.durations = append(c.errs, d.Error), append(c.attempts, d.Attempt), append(c.durations, d.DurationMS)
	c.timedOut = append(c.timedOut, d.TimedOut)
	var o *string
	if d.Outcome != "" {
		s := string(d.Outcome)
		o = &s
	}
	c.outcome = append(c.outcome, o)
}

func (c *factCols) queue(b *pgx.Batch, sql string) *pgx.QueuedQuery {
	if len(c.builds) == 0 {
		return nil
	}
	return b.Queue(sql, c.builds, c.kinds, c.projects, c.ids, c.ats, c.seqs, c.frameworks, c.nodes, c.managers,
		c.attempts, c.outcome, c.durations, c.errs, c.timedOut)
}

func queueFacts(b *pgx.Batch, facts []fold.Fact) {
	var fresh, replacing factCols
	for i := range facts {
		if facts[i].Replaces {
			replacing.add(&facts[i])
		} else {
			fresh.add(&facts[i])
		}
	}
	fresh.queue(b, insertFactsSQL)
	replacing.queue(b, replaceFactsSQL)
}

// The builds waiting on their worker (projector_open_builds, migration
// 007; fsm.Build.Waiting decides): those whose wait began or changed, and
// those whose wait ended.
const (
	openBuildsSQL = `
INSERT INTO projector_open_builds AS o (build_id, project_id, state, since)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
ON CONFLICT (build_id) DO UPDATE SET state = excluded.state, since = excluded.since`
	closeBuildsSQL = `DELETE FROM projector_open_builds WHERE build_id = ANY($1::text[])`
)

func queueOpen(b *pgx.Batch, open []fold.Open, closed []string) {
	if n := len(open); n > 0 {
		builds, projects, states, since := make([]string, n), make([]string, n), make([]string, n), make([]time.Time, n)
		for i, o := range open {
			builds[i], projects[i], states[i], since[i] = o.BuildID, o.ProjectID, o.For, o.Since
		}
		b.Queue(openBuildsSQL, builds, projects, states, since)
	}
	if len(closed) > 0 {
		b.Queue(closeBuildsSQL, closed)
	}
}

const upsertRolesSQL = `
INSERT INTO projector_roles (project_id, newest_build, started_build, current_build, framework_build)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
ON CONFLICT (project_id) DO UPDATE
SET newest_build = excluded.newest_build, started_build = excluded.started_build,
    current_build = excluded.current_build, framework_build = excluded.framework_build`

func queueRoles(b *pgx.Batch, roles map[string]fsm.Roles) {
	if len(roles) == 0 {
		return
	}
	var projects []string
	for p := range roles {
		projects = append(projects, p)
	}
	slices.Sort(projects)
	n := len(projects)
	newest, started, current, fw := make([]*string, n), make([]*string, n), make([]*string, n), make([]*string, n)
	for i, p := range projects {
		r := roles[p]
		newest[i], started[i], current[i], fw[i] = orNull(r.Newest), orNull(r.Started), orNull(r.Current), orNull(r.Framework)
	}
	b.Queue(upsertRolesSQL, projects, newest, started, current, fw)
}

func orNull(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

const insertDeadLettersSQL = `
INSERT INTO projector_dead_letters (stream_seq, subject, subject_bytes, subject_prefix, reason, detail, payload, stored_at, retries)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::text[], $7::bytea[], $8::timestamptz[], $9::int[])
ON CONFLICT (stream_seq) DO UPDATE
SET reason = excluded.reason, detail = excluded.detail`

// deadRow is a projector_dead_letters row. Its text columns hold only what
// a text column can (valid UTF-8, no NUL), so keeping a letter cannot fail
// on the message's content; the subject's exact bytes go in subjectBytes
// when its text differs (the payload is bytea already).
type deadRow struct {
	seq          int64
	subject      string
	subjectBytes []byte // nil: subject is exact
	prefix       string
	reason       string
	detail       string
	payload      []byte
	storedAt     time.Time
}

func deadRowOf(d Refusal, prefix string, now time.Time) deadRow {
	r := deadRow{seq: int64(d.Msg.Seq), subject: textSafe(d.Msg.Subject), prefix: prefix,
		reason: string(d.Reason), detail: textSafe(d.Detail), payload: nonNil(d.Msg.Data), storedAt: d.Msg.StoredAt}
	if r.subject != d.Msg.Subject {
		r.subjectBytes = []byte(d.Msg.Subject)
	}
	if r.storedAt.IsZero() {
		r.storedAt = now
	}
	return r
}

// textSafe is s as a text column can hold it: invalid UTF-8 and NUL become U+FFFD.
func textSafe(s string) string {
	if utf8.ValidString(s) && !strings.ContainsRune(s, 0) {
		return s
	}
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
}

func queueDeadLetters(b *pgx.Batch, dead []Refusal, prefix string, retries map[uint64]int) {
	if len(dead) == 0 {
		return
	}
	// One row per sequence: a redelivered batch may carry a message twice.
	seen := map[uint64]bool{}
	var seqs []int64
	var subjects, prefixes, reasons, details []string
	var subjectBytes, payloads [][]byte
	var stored []time.Time
	var counts []int32
	now := time.Now()
	for _, d := range dead {
		if seen[d.Msg.Seq] {
			continue
		}
		seen[d.Msg.Seq] = true
		r := deadRowOf(d, prefix, now)
		seqs = append(seqs, r.seq)
		subjects = append(subjects, r.subject)
		subjectBytes = append(subjectBytes, r.subjectBytes)
		prefixes = append(prefixes, r.prefix)
		reasons = append(reasons, r.reason)
		details = append(details, r.detail)
		payloads = append(payloads, r.payload)
		stored = append(stored, r.storedAt)
		counts = append(counts, int32(retries[d.Msg.Seq]))
	}
	b.Queue(insertDeadLettersSQL, seqs, subjects, subjectBytes, prefixes, reasons, details, payloads, stored, counts)
}

func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// Phase 1: status, timing and framework; a new row starts with no current build.
const writeStatusSQL = `
INSERT INTO projects (project_id, build_status, last_build_started, last_build_completed, framework, updated_at)
SELECT p, s, st, co, f, now()
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::text[]) AS u(p, s, st, co, f)
ON CONFLICT (project_id) DO UPDATE
SET build_status = excluded.build_status, last_build_started = excluded.last_build_started,
    last_build_completed = excluded.last_build_completed, framework = excluded.framework,
    updated_at = excluded.updated_at`

const writeMetricsSQL = `
INSERT INTO project_build_metrics (build_id, project_id, status, started_at, completed_at, duration_ms,
    framework, node_version, package_manager, attempt, error, queued_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::bigint[],
    $7::text[], $8::text[], $9::text[], $10::bigint[], $11::text[], $12::timestamptz[])
ON CONFLICT (build_id) DO UPDATE
SET project_id = excluded.project_id, status = excluded.status, started_at = excluded.started_at,
    completed_at = excluded.completed_at, duration_ms = excluded.duration_ms, framework = excluded.framework,
    node_version = excluded.node_version, package_manager = excluded.package_manager,
    attempt = excluded.attempt, error = excluded.error, queued_at = excluded.queued_at`

// Phase 2: the current build pointer, once its metrics row exists.
const pointCurrentSQL = `
UPDATE projects AS p SET current_build_id = u.c, updated_at = now()
FROM unnest($1::text[], $2::text[]) AS u(p, c)
WHERE p.project_id = u.p`

func queuePlans(b *pgx.Batch, plans []fsm.Plan) {
	var st statusCols
	var mc metricsCols
	var cur struct {
		projects []string
		builds   []*string
	}
	for _, p := range plans {
		for _, a := range p.Actions {
			switch a.Kind {
			case fsm.WriteStatus:
				st.add(a.Row)
			case fsm.WriteMetrics:
				mc.add(a.Metrics)
			case fsm.PointCurrent:
				cur.projects = append(cur.projects, a.Row.ProjectID)
				cur.builds = append(cur.builds, a.Row.CurrentBuildID)
			}
		}
	}
	if len(st.projects) > 0 {
		b.Queue(writeStatusSQL, st.projects, st.statuses, st.started, st.completed, st.frameworks)
	}
	if len(mc.builds) > 0 {
		b.Queue(writeMetricsSQL, mc.builds, mc.projects, mc.statuses, mc.started, mc.completed, mc.durations,
			mc.frameworks, mc.nodes, mc.managers, mc.attempts, mc.errors, mc.queued)
	}
	if len(cur.projects) > 0 {
		b.Queue(pointCurrentSQL, cur.projects, cur.builds)
	}
}

type statusCols struct {
	projects, statuses []string
	started, completed []*time.Time
	frameworks         []*string
}

func (c *statusCols) add(r *fsm.Row) {
	c.projects = append(c.projects, r.ProjectID)
	c.statuses = append(c.statuses, string(r.Status))
	c.started = append(c.started, r.LastBuildStarted)
	c.completed = append(c.completed, r.LastBuildCompleted)
	c.frameworks = append(c.frameworks, r.Framework)
}

type metricsCols struct {
	builds, projects, statuses          []string
	started                             []time.Time
	completed, queued                   []*time.Time
	durations, attempts                 []*int64
	frameworks, nodes, managers, errors []*string
}

func (c *metricsCols) add(m *fsm.MetricsRow) {
	c.builds = append(c.builds, m.BuildID)
	c.projects = append(c.projects, m.ProjectID)
	c.statuses = append(c.statuses, m.Status)
	c.started = append(c.started, m.StartedAt)
	c.completed = append(c.completed, m.CompletedAt)
	c.durations = append(c.durations, m.DurationMS)
	c.frameworks = append(c.frameworks, m.Framework)
	c.nodes = append(c.nodes, m.NodeVersion)
	c.managers = append(c.managers, m.PackageManager)
	c.attempts = append(c.attempts, m.Attempt)
	c.errors = append(c.errors, m.Error)
	c.queued = append(c.queued, m.QueuedAt)
}
