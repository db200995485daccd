package projection_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/tern/v2/migrate"

	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/schema"
)

// A store at schema version 6 marked its open builds on their facts
// (projector_facts.pending); migration 007 moves them to
// projector_open_builds, which Stuck reads: the upgrade lists the same
// stuck builds as before it.
func TestUpgradeMovesOpenBuilds(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, testenv.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	m, err := migrate.NewMigrator(ctx, conn, "public.schema_version")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.LoadMigrations(schema.Migrations); err != nil {
		t.Fatal(err)
	}
	if err := m.MigrateTo(ctx, 6); err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	// What version 6's store wrote: b-q queued only, b-s queued and
	// started, b-done started and completed (no longer pending).
	if _, err := conn.Exec(ctx, `INSERT INTO projector_builds VALUES ('b-q', 'p1'), ('b-s', 'p1'), ('b-done', 'p2')`); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `
INSERT INTO projector_facts (build_id, kind, project_id, event_id, occurred_at, stream_seq, pending) VALUES
  ('b-q', 'queued', 'p1', 'e1', $1, 1, true),
  ('b-s', 'queued', 'p1', 'e2', $1, 2, true),
  ('b-s', 'started', 'p1', 'e3', $1::timestamptz + interval '1 minute', 3, true),
  ('b-done', 'started', 'p2', 'e4', $1, 4, false),
  ('b-done', 'completed', 'p2', 'e5', $1::timestamptz + interval '2 minutes', 5, false)`, at); err != nil {
		t.Fatal(err)
	}
	if err := projection.Migrate(ctx, conn, "public"); err != nil {
		t.Fatal(err)
	}
	rows, err := conn.Query(ctx, `SELECT build_id, project_id, state, since FROM projector_open_builds ORDER BY build_id`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[projection.StuckBuild])
	if err != nil {
		t.Fatal(err)
	}
	want := []projection.StuckBuild{
		{BuildID: "b-q", ProjectID: "p1", State: projection.StuckQueued, Since: at},
		{BuildID: "b-s", ProjectID: "p1", State: projection.StuckBuilding, Since: at.Add(time.Minute)},
	}
	if len(got) != len(want) {
		t.Fatalf("open builds after the upgrade = %+v; want %+v", got, want)
	}
	for i := range want {
		if got[i].BuildID != want[i].BuildID || got[i].ProjectID != want[i].ProjectID || got[i].State != want[i].State ||
			!got[i].Since.Equal(want[i].Since) {
			t.Errorf("open build %d after the upgrade = %+v; want %+v", i, got[i], want[i])
		}
	}
	var pendingLeft int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM information_schema.columns
		WHERE table_name = 'projector_facts' AND column_name = 'pending'`).Scan(&pendingLeft); err != nil || pendingLeft != 0 {
		t.Errorf("projector_facts.pending after the upgrade: %d columns (%v); want it dropped", pendingLeft, err)
	}
}
