package projection

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/tern/v2/migrate"

	"github.com/buildstate/buildstate/schema"
)

// Migrate applies the embedded migrations to schemaName (created if absent)
// on conn, refusing a schema newer than the binary's. tern holds an advisory lock while it migrates, so several
// projectors starting at once apply each migration once.
func Migrate(ctx context.Context, conn *pgx.Conn, schemaName string) error {
	// A schema newer than this binary is refused before anything changes.
	if have, db, err := schemaVersion(ctx, conn, schemaName); err != nil {
		return err
	} else if want := SchemaVersion(); have > want {
		return &SchemaError{Database: db, Have: have, Want: want}
	}
	ident := pgx.Identifier{schemaName}.Sanitize()
	if _, err := conn.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+ident); err != nil {
		return fmt.Errorf("create schema %s: %w", schemaName, err)
	}
	if _, err := conn.Exec(ctx, "SET search_path TO "+ident); err != nil {
		return fmt.Errorf("set search_path %s: %w", schemaName, err)
	}
	m, err := migrate.NewMigrator(ctx, conn, schemaName+".schema_version")
	if err != nil {
		return fmt.Errorf("migrator: %w", err)
	}
	if err := m.LoadMigrations(schema.Migrations); err != nil {
		return fmt.Errorf("load migrations: %w", err)
	}
	if err := m.Migrate(ctx); err != nil {
		return fmt.Errorf("migrate %s: %w", schemaName, err)
	}
	return nil
}
