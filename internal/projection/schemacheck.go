package projection

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"github.com/jackc/pgx/v5"

	"github.com/buildstate/buildstate/schema"
)

// ErrNoSchema: the database has no buildstate schema (no tern version table).
var ErrNoSchema = errors.New("no buildstate schema")

// SchemaError says why a database's schema does not fit this binary.
type SchemaError struct {
	Database string
	Have     int // the schema's version; 0 with ErrNoSchema
	Want     int // the version this binary's migrations reach
}

func (e *SchemaError) Error() string {
	switch {
	case e.Have == 0:
		return fmt.Sprintf("no buildstate schema in %s (run projector migrate, or check DATABASE_URL)", e.Database)
	case e.Have > e.Want:
		return fmt.Sprintf("the buildstate schema in %s is at version %d, newer than this binary's %d: run a newer projector", e.Database, e.Have, e.Want)
	}
	return fmt.Sprintf("the buildstate schema in %s is at version %d; this binary needs %d (run projector migrate)", e.Database, e.Have, e.Want)
}

func (e *SchemaError) Unwrap() error {
	if e.Have == 0 {
		return ErrNoSchema
	}
	return nil
}

// SchemaVersion is the version this binary's migrations reach: tern numbers
// them 1, 2, … and records the last applied.
func SchemaVersion() int {
	files, _ := fs.Glob(schema.Migrations, "*.sql") // the pattern is valid
	return len(files)
}

// Querier is what CheckSchema reads with: a pool, a connection or a transaction.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// CheckSchema returns nil if schemaName holds the buildstate schema at this
// binary's version, else a *SchemaError. It changes nothing.
func CheckSchema(ctx context.Context, q Querier, schemaName string) error {
	have, db, err := schemaVersion(ctx, q, schemaName)
	if err != nil {
		return err
	}
	if want := SchemaVersion(); have != want {
		return &SchemaError{Database: db, Have: have, Want: want}
	}
	return nil
}

// schemaVersion reads tern's version table of schemaName (0 when absent).
func schemaVersion(ctx context.Context, q Querier, schemaName string) (version int, database string, err error) {
	table := pgx.Identifier{schemaName, "schema_version"}.Sanitize()
	var exists bool
	if err := q.QueryRow(ctx, `SELECT current_database(), to_regclass($1) IS NOT NULL`, table).Scan(&database, &exists); err != nil {
		return 0, "", fmt.Errorf("read schema version: %w", err)
	}
	if !exists {
		return 0, database, nil
	}
	if err := q.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM `+table).Scan(&version); err != nil {
		return 0, "", fmt.Errorf("read schema version: %w", err)
	}
	return version, database, nil
}
