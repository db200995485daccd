package devenv

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// queryInt runs a query returning one integer on a new connection to url.
func queryInt(t *testing.T, ctx context.Context, url, sql string) int {
	t.Helper()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, sql).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func TestFindPostgres(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()

	// Without DATABASE_URL the answer depends on the machine: the local
	// server if there is one, else a throwaway cluster.
	wantNoEnv := SourceLocal
	if err := ping(ctx, LocalURL, localPingTimeout); err != nil {
		t.Logf("no local server (%v): expecting a throwaway cluster", err)
		wantNoEnv = SourceThrowaway
	}
	deadPort, err := freePort()
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name       string
		env        map[string]string
		wantSource string // "" means an error is wanted
	}{
		{"DATABASE_URL", map[string]string{"DATABASE_URL": LocalURL}, SourceEnv},
		{"nothing set", nil, wantNoEnv},
		{"DATABASE_URL does not answer", map[string]string{
			"DATABASE_URL": fmt.Sprintf("postgres://postgres:secret@127.0.0.1:%d/postgres?sslmode=disable", deadPort),
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			getenv := func(key string) string { return tt.env[key] }
			pg, err := FindPostgres(ctx, getenv, t.Logf)
			if tt.wantSource == "" {
				if err == nil {
					pg.Close()
					t.Fatalf("FindPostgres() = %+v; want an error", pg)
				}
				if strings.Contains(err.Error(), "secret") {
					t.Errorf("FindPostgres() error %q shows the password", err)
				}
				t.Logf("FindPostgres() = %v", err)
				return
			}
			if err != nil {
				t.Fatalf("FindPostgres() = %v", err)
			}
			defer func() {
				if err := pg.Close(); err != nil {
					t.Errorf("Close() = %v", err)
				}
			}()
			if pg.Source != tt.wantSource {
				t.Errorf("FindPostgres().Source = %q; want %q", pg.Source, tt.wantSource)
			}
			if got := queryInt(t, ctx, pg.URL, "SELECT 1"); got != 1 {
				t.Errorf("SELECT 1 = %d", got)
			}
		})
	}
}

func TestStartThrowaway(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	pg, err := startThrowaway(ctx, t.Logf)
	if err != nil {
		t.Fatalf("startThrowaway() = %v", err)
	}
	dir := pg.cluster.dir
	closed := false
	defer func() {
		if !closed {
			pg.Close()
		}
	}()

	if pg.Source != SourceThrowaway {
		t.Errorf("Source = %q; want %q", pg.Source, SourceThrowaway)
	}
	if strings.Contains(pg.URL, ":5432/") {
		t.Errorf("URL = %q; want a port of its own", pg.URL)
	}
	if got := queryInt(t, ctx, pg.URL, "SELECT 1"); got != 1 {
		t.Errorf("SELECT 1 = %d", got)
	}
	// The throwaway server is usable as an admin server.
	dbURL, err := CreateDatabase(ctx, pg.URL, "throwaway_db")
	if err != nil {
		t.Fatalf("CreateDatabase() = %v", err)
	}
	if got := queryInt(t, ctx, dbURL, "SELECT 2"); got != 2 {
		t.Errorf("SELECT 2 = %d", got)
	}

	closed = true
	if err := pg.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("after Close, stat %s = %v; want it gone", dir, err)
	}
	if err := ping(ctx, pg.URL, time.Second); err == nil {
		t.Errorf("after Close, the server at %s still answers", pg.URL)
	}
	if err := pg.Close(); err != nil {
		t.Errorf("second Close() = %v; want nil", err)
	}
}

func TestCreateAndDropDatabase(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()

	pg, err := FindPostgres(ctx, os.Getenv, t.Logf)
	if err != nil {
		t.Fatalf("FindPostgres() = %v", err)
	}
	defer pg.Close()

	// A name that needs quoting.
	name := fmt.Sprintf("bs devenv %d \"q\"", time.Now().UnixNano())
	dbURL, err := CreateDatabase(ctx, pg.URL, name)
	if err != nil {
		t.Fatalf("CreateDatabase(%q) = %v", name, err)
	}
	t.Cleanup(func() { DropDatabase(context.Background(), pg.URL, name) })

	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatalf("connect to %s: %v", dbURL, err)
	}
	var current string
	if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&current); err != nil {
		t.Fatalf("current_database(): %v", err)
	}
	if current != name {
		t.Errorf("current_database() = %q; want %q", current, name)
	}

	if _, err := CreateDatabase(ctx, pg.URL, name); err == nil {
		t.Errorf("CreateDatabase(%q) twice = nil error; want duplicate_database", name)
	}

	// The open connection does not stop the drop: WITH (FORCE).
	if err := DropDatabase(ctx, pg.URL, name); err != nil {
		t.Fatalf("DropDatabase(%q) = %v", name, err)
	}
	conn.Close(ctx)
	_, err = pgx.Connect(ctx, dbURL)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "3D000" {
		t.Errorf("connect after drop = %v; want SQLSTATE 3D000 (invalid_catalog_name)", err)
	}
	if err := DropDatabase(ctx, pg.URL, name); err != nil {
		t.Errorf("DropDatabase(%q) of a missing database = %v; want nil", name, err)
	}
}

func TestWithDatabase(t *testing.T) {
	t.Parallel()
	tests := []struct {
		connStr, name, want string
	}{
		{LocalURL, "bs_t_1", "postgres://postgres@127.0.0.1:5432/bs_t_1?sslmode=disable"},
		{"postgresql://u:p%40ss@h:6543?sslmode=require", "x", "postgresql://u:p%40ss@h:6543/x?sslmode=require"},
		{"postgres://h/old", "a b", "postgres://h/a%20b"},
		{"host=h user=u dbname=old", "new", "host=h user=u dbname=old dbname='new'"},
		{"", "it's", `dbname='it\'s'`},
	}
	for _, tt := range tests {
		got, err := withDatabase(tt.connStr, tt.name)
		if err != nil || got != tt.want {
			t.Errorf("withDatabase(%q, %q) = %q, %v; want %q", tt.connStr, tt.name, got, err, tt.want)
		}
	}
	// pgx agrees that the later dbname wins in keyword/value settings.
	cfg, err := pgx.ParseConfig("host=h user=u dbname=old dbname='new'")
	if err != nil || cfg.Database != "new" {
		t.Errorf("ParseConfig(... dbname='new').Database = %v, %v; want new", cfg, err)
	}
	if _, err := withDatabase("postgres://u:secret@h:bad/x", "y"); err == nil || strings.Contains(err.Error(), "secret") {
		t.Errorf("withDatabase(bad URL) = %v; want an error without the password", err)
	}
}

func TestHighestVersionDir(t *testing.T) {
	t.Parallel()
	tests := []struct {
		dirs []string
		want string
	}{
		{nil, ""},
		{[]string{"/usr/lib/postgresql/15/bin"}, "/usr/lib/postgresql/15/bin"},
		{[]string{"/usr/lib/postgresql/9.6/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/10/bin"}, "/usr/lib/postgresql/16/bin"},
		{[]string{"/usr/lib/postgresql/9.6/bin", "/usr/lib/postgresql/9.10/bin"}, "/usr/lib/postgresql/9.10/bin"},
	}
	for _, tt := range tests {
		if got := highestVersionDir(tt.dirs); got != tt.want {
			t.Errorf("highestVersionDir(%q) = %q; want %q", tt.dirs, got, tt.want)
		}
	}
}
