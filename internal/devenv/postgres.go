package devenv

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Where FindPostgres found its server (Postgres.Source).
const (
	SourceEnv       = "DATABASE_URL" // the URL in the DATABASE_URL variable
	SourceLocal     = "local"        // a server already running on LocalURL
	SourceThrowaway = "throwaway"    // a cluster started for this process
)

// LocalURL is the server FindPostgres tries when DATABASE_URL is not set.
const LocalURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

// Timeouts for the connectivity checks of FindPostgres.
const (
	envPingTimeout   = 5 * time.Second
	localPingTimeout = 3 * time.Second
)

// Postgres is a reachable PostgreSQL server. URL connects to it as a user
// allowed to create databases. Close releases it: it stops and deletes a
// throwaway cluster and does nothing for a server it did not start.
type Postgres struct {
	URL    string
	Source string // SourceEnv, SourceLocal or SourceThrowaway

	cluster   *cluster // set when Source is SourceThrowaway
	closeOnce sync.Once
	closeErr  error
}

// FindPostgres returns the first PostgreSQL server that answers, in order:
//
//  1. getenv("DATABASE_URL"), if set. If it does not answer within 5s that is
//     an error: an explicit setting is never silently replaced.
//  2. LocalURL (trust authentication on 127.0.0.1:5432), within 3s.
//  3. A throwaway cluster started with initdb and pg_ctl in a temporary
//     directory, on a free port. Close stops it and deletes the directory.
//
// logf reports which one was chosen and why the others were not; it may be
// nil. It is not kept after FindPostgres returns.
func FindPostgres(ctx context.Context, getenv func(string) string, logf func(format string, args ...any)) (*Postgres, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	if url := getenv("DATABASE_URL"); url != "" {
		if err := ping(ctx, url, envPingTimeout); err != nil {
			// The URL may hold a password: do not print it.
			return nil, fmt.Errorf("find postgres: DATABASE_URL is set but does not answer: %w", err)
		}
		logf("devenv: using PostgreSQL from DATABASE_URL")
		return &Postgres{URL: url, Source: SourceEnv}, nil
	}

	localErr := ping(ctx, LocalURL, localPingTimeout)
	if localErr == nil {
		logf("devenv: using local PostgreSQL at %s", LocalURL)
		return &Postgres{URL: LocalURL, Source: SourceLocal}, nil
	}
	logf("devenv: no PostgreSQL at %s (%v); starting a throwaway cluster", LocalURL, localErr)

	pg, err := startThrowaway(ctx, logf)
	if err != nil {
		return nil, fmt.Errorf("no PostgreSQL found: set DATABASE_URL, run a server on 127.0.0.1:5432, "+
			"or install the PostgreSQL server binaries (Debian: apt-get install postgresql): "+
			"%s: %w; throwaway cluster: %w", LocalURL, localErr, err)
	}
	return pg, nil
}

// Close stops and deletes a throwaway cluster; for a server it did not start
// it does nothing. Calling it again returns the first result.
func (p *Postgres) Close() error {
	if p == nil || p.cluster == nil {
		return nil
	}
	p.closeOnce.Do(func() { p.closeErr = p.cluster.stop() })
	return p.closeErr
}

// ping connects to url and pings the server within timeout.
func ping(ctx context.Context, url string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err // pgx says "failed to connect to ..." with the host, not the password
	}
	pingErr := conn.Ping(ctx)
	closeErr := conn.Close(ctx)
	if pingErr != nil {
		return fmt.Errorf("ping: %w", pingErr)
	}
	if closeErr != nil {
		return fmt.Errorf("close: %w", closeErr)
	}
	return nil
}

// errNoBinaries says that initdb and pg_ctl could not be found.
var errNoBinaries = errors.New("initdb and pg_ctl not found in PATH or /usr/lib/postgresql/*/bin")
