package replay_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/replay"
)

// The bulk replay (a fold in memory, then COPY) writes every table, the
// projector's own included, as the live path's Apply does from the same
// messy log: so a rebuilt model carries on under `projector run` exactly as
// the live one would.
func TestLoadWritesWhatApplyWrites(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newDB(t)
	log := newLog(t)
	last := publishAll(t, log.JS, messyHistory(t, 11, 150))

	bulk, err := projection.OpenShadow(ctx, pool, "bulk", projection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer bulk.Close()
	bst, err := replay.Load(ctx, log, bulk, last, replay.Options{Batch: 97}, "load")
	if err != nil {
		t.Fatal(err)
	}
	incr, err := projection.OpenShadow(ctx, pool, "incremental", projection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer incr.Close()
	ist, err := replay.Into(ctx, log, incr, 0, last, replay.Options{Batch: 97}, "apply")
	if err != nil {
		t.Fatal(err)
	}
	if bst.Result != ist.Result || bst.Messages != int(last) {
		t.Errorf("Load did %+v of %d messages; Into did %+v of %d", bst.Result, bst.Messages, ist.Result, ist.Messages)
	}
	if bst.Result.DeadLettered < 10 || bst.Result.Duplicates == 0 {
		t.Errorf("the history should have dead letters and duplicates; got %+v", bst.Result)
	}
	sameTables(t, pool, "incremental", "bulk")
	if a, b := keysOf(t, pool, "incremental"), keysOf(t, pool, "bulk"); !slices.Equal(a, b) {
		t.Errorf("keys and indexes after the bulk load:\n%s\nafter the incremental replay:\n%s", strings.Join(b, "\n"), strings.Join(a, "\n"))
	} else if len(a) < 10 {
		t.Errorf("only %d keys and indexes: %v", len(a), a)
	}

	// The comparison sees a difference in any table.
	if _, err := pool.Exec(ctx, `UPDATE bulk.projector_facts SET stream_seq = stream_seq + 1
		WHERE (build_id, kind) = (SELECT build_id, kind FROM bulk.projector_facts LIMIT 1)`); err != nil {
		t.Fatal(err)
	}
	if diffs := tableDiffs(t, pool, "incremental", "bulk"); diffs["projector_facts"] != 2 || len(diffs) != 1 {
		t.Errorf("after changing one fact, differences = %v; want projector_facts: 2", diffs)
	}
}

// keysOf lists schema's constraints and indexes, with the schema's name
// taken out of their definitions.
func keysOf(t *testing.T, pool *pgxpool.Pool, schema string) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `
		SELECT format('%s %s %s', cl.relname, con.conname, replace(pg_get_constraintdef(con.oid), $1 || '.', ''))
		FROM pg_constraint con JOIN pg_class cl ON cl.oid = con.conrelid JOIN pg_namespace n ON n.oid = cl.relnamespace
		WHERE n.nspname = $1
		UNION ALL
		SELECT replace(pg_get_indexdef(i.indexrelid), $1 || '.', '')
		FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ic.relnamespace
		WHERE n.nspname = $1
		ORDER BY 1`, schema)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// ignored are the columns that hold the time of writing, not the log's content.
var ignored = map[string]bool{"updated_at": true, "dead_at": true}

// sameTables fails the test unless every table of schema a has the same
// rows in schema b (columns in ignored aside), and none is empty.
func sameTables(t *testing.T, pool *pgxpool.Pool, a, b string) {
	t.Helper()
	for table, n := range tableDiffs(t, pool, a, b) {
		t.Errorf("%s: %d rows differ between %s and %s", table, n, a, b)
	}
	for _, table := range tablesOf(t, pool, a) {
		var n int
		if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM `+pgx.Identifier{b, table}.Sanitize()).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 && table != "schema_version" {
			t.Errorf("%s.%s is empty: the comparison proves nothing", b, table)
		}
	}
}

// tableDiffs counts, for each table of schema a, the rows on one side only.
func tableDiffs(t *testing.T, pool *pgxpool.Pool, a, b string) map[string]int {
	t.Helper()
	ctx := context.Background()
	out := map[string]int{}
	for _, table := range tablesOf(t, pool, a) {
		rows, err := pool.Query(ctx, `SELECT column_name FROM information_schema.columns
			WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position`, a, table)
		if err != nil {
			t.Fatal(err)
		}
		all, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		var cols []string
		for _, c := range all {
			if !ignored[c] {
				cols = append(cols, pgx.Identifier{c}.Sanitize())
			}
		}
		sel := func(schema string) string {
			return fmt.Sprintf("SELECT %s FROM %s", strings.Join(cols, ", "), pgx.Identifier{schema, table}.Sanitize())
		}
		var n int
		q := fmt.Sprintf(`SELECT count(*) FROM ((%[1]s EXCEPT ALL %[2]s) UNION ALL (%[2]s EXCEPT ALL %[1]s)) AS d`, sel(a), sel(b))
		if err := pool.QueryRow(ctx, q).Scan(&n); err != nil {
			t.Fatalf("%s: %v", table, err)
		}
		if n > 0 {
			out[table] = n
		}
	}
	return out
}

func tablesOf(t *testing.T, pool *pgxpool.Pool, schema string) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT table_name FROM information_schema.tables
		WHERE table_schema = $1 AND table_type = 'BASE TABLE' ORDER BY table_name`, schema)
	if err != nil {
		t.Fatal(err)
	}
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if len(tables) < 7 {
		t.Fatalf("schema %s has tables %v; want the read model's", schema, tables)
	}
	return tables
}
