package devenv

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// sqlstateObjectInUse is raised by CREATE DATABASE while another session is
// connected to the template database.
const sqlstateObjectInUse = "55006"

// CreateDatabase creates the database name on the server of adminURL and
// returns adminURL with its database replaced by name.
func CreateDatabase(ctx context.Context, adminURL, name string) (string, error) {
	dbURL, err := withDatabase(adminURL, name)
	if err != nil {
		return "", fmt.Errorf("create database %s: %w", name, err)
	}
	sql := "CREATE DATABASE " + pgx.Identifier{name}.Sanitize()
	// A session connected to template1 (psql, another tool) makes CREATE
	// DATABASE fail at once; it is usually gone a moment later.
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err = execAdmin(ctx, adminURL, sql)
		var pgErr *pgconn.PgError
		if err == nil || attempt == 5 || !errors.As(err, &pgErr) || pgErr.Code != sqlstateObjectInUse {
			break
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("create database %s: %w", name, errors.Join(err, ctx.Err()))
		case <-time.After(backoff):
		}
		backoff *= 2
	}
	if err != nil {
		return "", fmt.Errorf("create database %s: %w", name, err)
	}
	return dbURL, nil
}

// DropDatabase drops the database name on the server of adminURL, if it
// exists, disconnecting its sessions.
func DropDatabase(ctx context.Context, adminURL, name string) error {
	sql := "DROP DATABASE IF EXISTS " + pgx.Identifier{name}.Sanitize() + " WITH (FORCE)"
	if err := execAdmin(ctx, adminURL, sql); err != nil {
		return fmt.Errorf("drop database %s: %w", name, err)
	}
	return nil
}

// execAdmin runs one statement on its own connection: CREATE and DROP
// DATABASE cannot run in a transaction.
func execAdmin(ctx context.Context, adminURL, sql string) error {
	conn, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		return err
	}
	_, execErr := conn.Exec(ctx, sql)
	closeErr := conn.Close(ctx)
	if execErr != nil {
		return execErr
	}
	if closeErr != nil {
		return fmt.Errorf("close: %w", closeErr)
	}
	return nil
}

// withDatabase returns the connection string connStr with its database set to
// name. connStr is a URL (postgres://...) or keyword/value settings
// ("host=... user=..."), where a later dbname wins.
func withDatabase(connStr, name string) (string, error) {
	if strings.HasPrefix(connStr, "postgres://") || strings.HasPrefix(connStr, "postgresql://") {
		u, err := url.Parse(connStr)
		if err != nil {
			// *url.Error repeats the URL, password included: keep its cause.
			var urlErr *url.Error
			if errors.As(err, &urlErr) {
				err = urlErr.Err
			}
			return "", fmt.Errorf("parse admin URL: %w", err)
		}
		u.Path = "/" + name
		u.RawPath = ""
		return u.String(), nil
	}
	if connStr == "" {
		return "dbname=" + quoteKeywordValue(name), nil
	}
	return connStr + " dbname=" + quoteKeywordValue(name), nil
}

// quoteKeywordValue quotes a value of a keyword/value connection string.
func quoteKeywordValue(v string) string {
	v = strings.ReplaceAll(v, `\`, `\\`)
	v = strings.ReplaceAll(v, `'`, `\'`)
	return "'" + v + "'"
}
