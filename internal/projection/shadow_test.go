package projection_test

import (
	"context"
	"errors"
	"sort"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
)

var shadowT0 = time.Now().Add(-time.Hour).UTC().Truncate(time.Millisecond)

// deployed is one build of project p, queued to completed, with metrics.
func deployed(p, b string, at time.Time) []events.Event {
	fw := "vite"
	return []events.Event{
		events.New(events.KindQueued, p, b, at, events.Data{}),
		events.New(events.KindStarted, p, b, at.Add(time.Second), events.Data{Framework: &fw}),
		events.New(events.KindMetricsRecorded, p, b, at.Add(2*time.Second), events.Data{Framework: &fw}),
		events.New(events.KindCompleted, p, b, at.Add(3*time.Second), events.Data{Outcome: events.OutcomeSucceeded}),
	}
}

func apply(t *testing.T, s *projection.Store, ms []projection.Message) projection.Result {
	t.Helper()
	res, err := s.Apply(context.Background(), nil, ms)
	if err != nil {
		t.Fatalf("Apply = %v", err)
	}
	return res
}

func projectIDs(t *testing.T, s *projection.Store) []string {
	t.Helper()
	rows, err := s.Projects(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range rows {
		ids = append(ids, r.ProjectID)
	}
	sort.Strings(ids)
	return ids
}

func schemaExists(t *testing.T, s *projection.Store, name string) bool {
	t.Helper()
	var ok bool
	if err := s.Pool().QueryRow(context.Background(), `SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)`, name).Scan(&ok); err != nil {
		t.Fatal(err)
	}
	return ok
}

func TestShadowSwap(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	live := newStore(t, projection.Options{Gate: true})
	apply(t, live, msgs(t, 1, deployed("p-1", "b-1", shadowT0)...))

	sh, err := projection.OpenShadow(ctx, live.Pool(), "bs_shadow_swap", projection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	p2 := deployed("p-2", "b-2", shadowT0)
	apply(t, sh.Store(), msgs(t, 1, p2...))

	d, err := sh.Diff(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	if d.Projects != 2 || d.Metrics != 2 || len(d.Rows) != 4 {
		t.Fatalf("Diff = %d projects, %d metrics, %d rows; want 2, 2, 4", d.Projects, d.Metrics, len(d.Rows))
	}
	if r := d.Rows[0]; r.Side != projection.SideLive || r.Project == nil || r.Project.ProjectID != "p-1" {
		t.Errorf("Diff.Rows[0] = %+v; want live p-1", r)
	}
	if r := d.Rows[1]; r.Side != projection.SideShadow || r.Project == nil || r.Project.ProjectID != "p-2" {
		t.Errorf("Diff.Rows[1] = %+v; want shadow p-2", r)
	}

	late := events.New(events.KindQueued, "p-3", "b-3", shadowT0, events.Data{})
	err = sh.Swap(ctx, func(ctx context.Context) error {
		// The gate is held exclusive: a live apply could not take it shared.
		var free bool
		if err := live.Pool().QueryRow(ctx, `SELECT pg_try_advisory_lock_shared(x'6273'::int, 1)`).Scan(&free); err != nil {
			return err
		}
		if free {
			return errors.New("rebuild gate is free during the catch-up")
		}
		_, err := sh.Store().Apply(ctx, nil, msgs(t, 5, late))
		return err
	})
	if err != nil {
		t.Fatalf("Swap = %v", err)
	}
	if got := projectIDs(t, live); len(got) != 2 || got[0] != "p-2" || got[1] != "p-3" {
		t.Errorf("live projects after swap = %v; want [p-2 p-3]", got)
	}
	if schemaExists(t, live, "bs_shadow_swap") {
		t.Errorf("shadow schema still exists after the swap")
	}
	// projector_applied came with the shadow: its events are duplicates now.
	if res := apply(t, live, msgs(t, 1, p2...)); res.Duplicates != len(p2) || res.Applied != 0 {
		t.Errorf("re-apply after swap = %+v; want %d duplicates", res, len(p2))
	}
	// And the live store keeps working on the new tables.
	if res := apply(t, live, msgs(t, 10, deployed("p-4", "b-4", shadowT0)...)); res.Applied != 4 {
		t.Errorf("apply after swap = %+v; want 4 applied", res)
	}
}

func TestSwapWaitsForLiveBatch(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	live := newStore(t, projection.Options{Gate: true})
	sh, err := projection.OpenShadow(ctx, live.Pool(), "bs_shadow_wait", projection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	// A live batch in flight holds the gate shared.
	tx, err := live.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock_shared(x'6273'::int, 1)`); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- sh.Swap(ctx, nil) }()
	select {
	case err := <-done:
		t.Fatalf("Swap returned %v while a live batch held the gate", err)
	case <-time.After(300 * time.Millisecond):
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Swap = %v", err)
	}
}

func TestOpenShadow(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	live := newStore(t, projection.Options{})
	for _, name := range []string{"", "public", "pg_temp"} {
		if _, err := projection.OpenShadow(ctx, live.Pool(), name, projection.Options{}); err == nil {
			t.Errorf("OpenShadow(%q) = nil error; want refusal", name)
		}
	}
	a, err := projection.OpenShadow(ctx, live.Pool(), "bs_shadow_open", projection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	apply(t, a.Store(), msgs(t, 1, deployed("p-1", "b-1", shadowT0)...))
	if _, err := projection.OpenShadow(ctx, live.Pool(), "bs_shadow_open", projection.Options{}); !errors.Is(err, projection.ErrShadowBusy) {
		t.Errorf("second OpenShadow = %v; want ErrShadowBusy", err)
	}
	a.Close() // leaves the schema
	if !schemaExists(t, live, "bs_shadow_open") {
		t.Fatalf("Close dropped the schema; want it left for inspection")
	}
	b, err := projection.OpenShadow(ctx, live.Pool(), "bs_shadow_open", projection.Options{})
	if err != nil {
		t.Fatalf("OpenShadow after Close = %v", err)
	}
	if got := projectIDs(t, b.Store()); len(got) != 0 {
		t.Errorf("reopened shadow has projects %v; want a fresh one", got)
	}
	if err := b.Drop(ctx); err != nil {
		t.Fatal(err)
	}
	if schemaExists(t, live, "bs_shadow_open") {
		t.Errorf("Drop left the schema")
	}
	if got := projectIDs(t, live); len(got) != 0 {
		t.Errorf("live projects = %v; want none (the shadow's writes stay in the shadow)", got)
	}
}

func TestCheck(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newStore(t, projection.Options{})
	var evs []events.Event
	evs = append(evs, deployed("p-1", "b-1", shadowT0)...)
	evs = append(evs, deployed("p-2", "b-2", shadowT0)...)
	evs = append(evs, deployed("p-3", "b-3", shadowT0)...)
	apply(t, s, msgs(t, 1, evs...))
	faults, err := s.Check(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(faults) != 0 {
		t.Fatalf("Check on a projected model = %v; want none", faults)
	}
	// Rows written while the constraints were off, as on a damaged database.
	for _, sql := range []string{
		`ALTER TABLE projects DROP CONSTRAINT projects_build_timing_logical`,
		`ALTER TABLE projects DROP CONSTRAINT projects_current_build_fk`,
		`ALTER TABLE project_build_metrics DROP CONSTRAINT project_build_metrics_timing_logical`,
		`UPDATE projects SET last_build_completed = last_build_started - interval '1 minute' WHERE project_id = 'p-1'`,
		`UPDATE projects SET current_build_id = 'b-gone' WHERE project_id = 'p-2'`,
		`UPDATE projects SET current_build_id = 'b-1' WHERE project_id = 'p-3'`,
		`UPDATE project_build_metrics SET completed_at = started_at - interval '1 second' WHERE build_id = 'b-3'`,
	} {
		if _, err := s.Pool().Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	faults, err = s.Check(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct{ check, key string }{
		{"project_build_metrics_timing_logical", "b-3"},
		{"projects_build_timing_logical", "p-1"},
		{"projects_current_build_fk", "p-2"},
		{"projects_current_build_owner", "p-3"},
	}
	if len(faults) != len(want) {
		t.Fatalf("Check = %v; want %d faults", faults, len(want))
	}
	for i, w := range want {
		if faults[i].Check != w.check || faults[i].Key != w.key || faults[i].Detail == "" {
			t.Errorf("Check()[%d] = %+v; want %s on %s", i, faults[i], w.check, w.key)
		}
	}
	if faults, err := s.Check(ctx, 2); err != nil || len(faults) != 2 {
		t.Errorf("Check(limit 2) = %d faults, %v; want 2", len(faults), err)
	}
}

// The shadow's tables are whatever the migrations create: a table added by
// a later migration is swapped in with the rest.
func TestSwapMovesEveryTable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	live := newStore(t, projection.Options{Gate: true})
	sh, err := projection.OpenShadow(ctx, live.Pool(), "bs_shadow_tables", projection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Close()
	list := func() []string {
		rows, err := live.Pool().Query(ctx, `SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY 1`, "bs_shadow_tables")
		if err != nil {
			t.Fatal(err)
		}
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return names
	}
	before := list()
	if err := sh.Swap(ctx, nil); err != nil {
		t.Fatal(err)
	}
	for _, name := range before {
		var n int
		if err := live.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = $1`, name).Scan(&n); err != nil || n != 1 {
			t.Errorf("table %s in public after swap: %d, %v; want 1", name, n, err)
		}
	}
}
