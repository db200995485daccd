// Package bench measures the projector against real services: an embedded
// NATS JetStream server, a PostgreSQL database of its own per run, and the
// projector binary run as child processes (so that their memory is their
// own). It has four scenarios: catch-up on a backlog (with the seed's
// direct-update worker as the baseline, in the same run), live latency at a
// steady rate, scale-out over several projector processes, and an in-process
// profile of the apply path. cmd/bench prints what they measure.
package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/devenv"
	"github.com/buildstate/buildstate/internal/projection"
)

// Env is the services one bench run uses: an embedded NATS server, a
// PostgreSQL server, and the projector binary built from this module.
type Env struct {
	Dir       string // temporary directory of the run, deleted by Close
	NATSURL   string
	AdminURL  string // Postgres, as a user that may create databases
	Projector string // path of the built projector binary
	Source    string // what it was built from
	Log       io.Writer
	// Partitions is the layout of the streams the run makes and of its
	// projectors (events.Layout: 0 or 1 is p1; n > 1 puts the transform on
	// each stream before its backlog is published).
	Partitions int

	nats *server.Server
	pg   *devenv.Postgres
	nc   *nats.Conn
	js   jetstream.JetStream
	dbs  []string
}

// Options configure Setup.
type Options struct {
	Getenv    func(string) string // DATABASE_URL; nil: os.Getenv
	ModuleDir string              // the buildstate module; "" finds it with go env GOMOD
	Revision  string              // if set, build the projector from this git revision of ModuleDir
	Log       io.Writer           // set-up messages; nil: discarded
	// NATSSyncAlways starts NATS as devenv.StartNATS does: every stored
	// message fsynced before its ack. False keeps nats-server's default (the
	// file store is fsynced every two minutes; a production cluster gets its
	// durability from R3 replication), so that the disk's fsync rate does not
	// bound the publisher.
	NATSSyncAlways bool
	// NATSOnly starts only NATS: no Postgres, no projector build (the raw
	// baseline needs neither). Source still names the module's commit.
	NATSOnly bool
}

// Setup starts the embedded NATS server, finds PostgreSQL (DATABASE_URL,
// else the local server, else a throwaway cluster) and builds the projector
// binary.
func Setup(ctx context.Context, o Options) (env *Env, err error) {
	log := o.Log
	if log == nil {
		log = io.Discard
	}
	getenv := o.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	dir, err := os.MkdirTemp("", "buildstate-bench-")
	if err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}
	e := &Env{Dir: dir, Log: log}
	defer func() {
		if err != nil {
			e.Close()
		}
	}()
	if o.NATSSyncAlways {
		e.nats, err = devenv.StartNATS(filepath.Join(dir, "nats"), -1)
	} else {
		e.nats, err = startNATS(filepath.Join(dir, "nats"))
	}
	if err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}
	e.NATSURL = e.nats.ClientURL()
	if e.nc, err = nats.Connect(e.NATSURL, nats.Name("buildstate bench")); err != nil {
		return nil, fmt.Errorf("setup: nats: %w", err)
	}
	if e.js, err = jetstream.New(e.nc); err != nil {
		return nil, fmt.Errorf("setup: jetstream: %w", err)
	}
	if o.NATSOnly {
		dir, err := findModule(ctx, o.ModuleDir)
		if err != nil {
			return nil, fmt.Errorf("setup: %w", err)
		}
		e.Source = describe(ctx, dir)
		return e, nil
	}
	if e.pg, err = devenv.FindPostgres(ctx, getenv, func(f string, a ...any) { fmt.Fprintf(log, f+"\n", a...) }); err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}
	e.AdminURL = e.pg.URL
	if e.Projector, e.Source, err = BuildProjector(ctx, o.ModuleDir, o.Revision, dir); err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}
	return e, nil
}

// startNATS is devenv.StartNATS with nats-server's default file store
// sync (every two minutes) instead of an fsync per message.
func startNATS(storeDir string) (*server.Server, error) {
	srv, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: storeDir, NoLog: true, NoSigs: true,
	})
	if err != nil {
		return nil, fmt.Errorf("start nats: %w", err)
	}
	srv.Start()
	if !srv.JetStreamEnabled() || !srv.ReadyForConnections(10*time.Second) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, errors.New("start nats: not ready within 10 s")
	}
	return srv, nil
}

// BuildProjector builds ./cmd/projector of the module in moduleDir ("":
// the module of the working directory), or of its git revision rev, into
// dir, and returns the binary's path and what it was built from.
func BuildProjector(ctx context.Context, moduleDir, rev, dir string) (bin, source string, err error) {
	if moduleDir, err = findModule(ctx, moduleDir); err != nil {
		return "", "", fmt.Errorf("build projector: %w", err)
	}
	src := moduleDir
	source = describe(ctx, moduleDir)
	if rev != "" {
		src = filepath.Join(dir, "src")
		if err := os.MkdirAll(src, 0o755); err != nil {
			return "", "", err
		}
		sh := exec.CommandContext(ctx, "sh", "-c", `git -C "$1" archive "$2" | tar -x -C "$3"`, "sh", moduleDir, rev, src)
		if out, err := sh.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("git archive %s: %w\n%s", rev, err, out)
		}
		full, _ := exec.CommandContext(ctx, "git", "-C", moduleDir, "rev-parse", "--short", rev).Output()
		source = fmt.Sprintf("%s at %s (git archive)", moduleDir, strings.TrimSpace(string(full)))
	}
	bin = filepath.Join(dir, "projector")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/projector")
	cmd.Dir = src
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("go build ./cmd/projector in %s: %w\n%s", src, err, out)
	}
	return bin, source, nil
}

// findModule is moduleDir, or if it is "" the directory of the module of
// the working directory.
func findModule(ctx context.Context, moduleDir string) (string, error) {
	if moduleDir != "" {
		return moduleDir, nil
	}
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the buildstate module (go env GOMOD is empty)")
	}
	return filepath.Dir(gomod), nil
}

// describe names the commit of a module directory and its uncommitted changes.
func describe(ctx context.Context, dir string) string {
	head, err := exec.CommandContext(ctx, "git", "-C", dir, "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return dir
	}
	st, _ := exec.CommandContext(ctx, "git", "-C", dir, "status", "--porcelain", "--untracked-files=no").Output()
	dirty := ""
	if n := len(strings.Fields(string(st))) / 2; n > 0 {
		dirty = fmt.Sprintf(" + uncommitted changes in %d files", n)
	}
	return fmt.Sprintf("%s at %s%s", dir, strings.TrimSpace(string(head)), dirty)
}

// JetStream is the run's JetStream context (the bench's own connection).
func (e *Env) JetStream() jetstream.JetStream { return e.js }

// NewDatabase creates a fresh database with the read model's schema and
// returns its URL. Close drops it.
func (e *Env) NewDatabase(ctx context.Context, label string) (string, error) {
	name := "bench_" + label + "_" + randomSuffix()
	url, err := devenv.CreateDatabase(ctx, e.AdminURL, name)
	if err != nil {
		return "", err
	}
	e.dbs = append(e.dbs, name)
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return "", fmt.Errorf("connect %s: %w", name, err)
	}
	defer conn.Close(ctx)
	if err := projection.Migrate(ctx, conn, "public"); err != nil {
		return "", fmt.Errorf("migrate %s: %w", name, err)
	}
	return url, nil
}

// DropDatabases drops the databases made so far.
func (e *Env) DropDatabases() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, name := range e.dbs {
		if err := devenv.DropDatabase(ctx, e.AdminURL, name); err != nil {
			fmt.Fprintf(e.Log, "bench: %v\n", err)
		}
	}
	e.dbs = nil
}

// Close drops the databases, stops the services and deletes the directory.
func (e *Env) Close() {
	e.DropDatabases()
	if e.nc != nil {
		e.nc.Close()
	}
	if e.nats != nil {
		e.nats.Shutdown()
		e.nats.WaitForShutdown()
	}
	if e.pg != nil {
		if err := e.pg.Close(); err != nil {
			fmt.Fprintf(e.Log, "bench: %v\n", err)
		}
	}
	if os.Getenv("BENCH_KEEP_DIR") == "" {
		_ = os.RemoveAll(e.Dir)
	} else {
		fmt.Fprintf(e.Log, "bench: kept %s (BENCH_KEEP_DIR)\n", e.Dir)
	}
}

func randomSuffix() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
