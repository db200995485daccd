package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fold"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/redact"
	"github.com/buildstate/buildstate/internal/web"
	"github.com/buildstate/buildstate/internal/when"
)

// common holds the flags every subcommand takes.
type common struct {
	cfg       projector.Config
	logFormat string
	logLevel  string
}

func newFlags(name string, getenv func(string) string, stderr io.Writer) (*flag.FlagSet, *common) {
	fs := flag.NewFlagSet("projector "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = commandUsage(fs, name)
	c := &common{}
	redact.URLVar(fs, &c.cfg.DatabaseURL, "database-url", envOr(getenv, "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"), "Postgres `URL` (env DATABASE_URL)")
	c.cfg.NATS.AddFlags(fs, getenv)
	fs.StringVar(&c.cfg.Stream, "stream", envOr(getenv, "BUILDS_STREAM", "BUILDS"), "JetStream stream (env BUILDS_STREAM)")
	fs.StringVar(&c.cfg.Prefix, "subject-prefix", envOr(getenv, "BUILDS_SUBJECT_PREFIX", "builds"), "subject prefix (env BUILDS_SUBJECT_PREFIX)")
	fs.StringVar(&c.cfg.Durable, "durable", envOr(getenv, "PROJECTOR_DURABLE", "projector"), "durable consumer name (env PROJECTOR_DURABLE)")
	fs.StringVar(&c.logFormat, "log-format", envOr(getenv, "LOG_FORMAT", "json"), "log format: json or console")
	fs.StringVar(&c.logLevel, "log-level", envOr(getenv, "LOG_LEVEL", "info"), "log level: debug, info, warn, error")
	return fs, c
}

func envOr(getenv func(string) string, key, def string) string {
	if v := getenv(key); v != "" {
		return v
	}
	return def
}

func (c *common) logger(stderr io.Writer) (*zap.Logger, error) {
	level, err := zapcore.ParseLevel(c.logLevel)
	if err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	var encoder zapcore.Encoder
	switch c.logFormat {
	case "json":
		encoder = zapcore.NewJSONEncoder(enc)
	case "console":
		enc.EncodeLevel = zapcore.CapitalLevelEncoder
		encoder = zapcore.NewConsoleEncoder(enc)
	default:
		return nil, fmt.Errorf("--log-format %q: want json or console", c.logFormat)
	}
	return zap.New(zapcore.NewCore(encoder, zapcore.AddSync(stderr), level)), nil
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd, rest := "run", args[1:]
	if len(rest) > 0 && rest[0] != "" && rest[0][0] != '-' {
		cmd, rest = rest[0], rest[1:]
	} else if len(rest) > 0 && isHelp(rest[0]) {
		cmd, rest = "help", nil
	}
	if cmd == "help" {
		if len(rest) == 0 {
			fmt.Fprint(stdout, usage())
			return nil
		}
		cmd, rest = rest[0], []string{"-h"}
	}
	if wantsHelp(rest) {
		stderr = stdout // asked for: the flags are the command's output
	}
	var err error
	switch cmd {
	case "run":
		err = runProjector(ctx, rest, getenv, stderr)
	case "migrate":
		err = runMigrate(ctx, rest, getenv, stdout, stderr)
	case "dead-letters":
		err = runDeadLetters(ctx, rest, getenv, stdout, stderr)
	case "status":
		err = runStatus(ctx, rest, getenv, stdout, stderr)
	case "rebuild":
		err = runRebuild(ctx, rest, getenv, stdout, stderr)
	case "verify":
		err = runVerify(ctx, rest, getenv, stdout, stderr)
	case "stuck":
		err = runStuck(ctx, rest, getenv, stdout, stderr, time.Now)
	case "partitions":
		err = runPartitions(ctx, rest, getenv, stdout, stderr)
	default:
		return fmt.Errorf("unknown command %q\n%s", cmd, usage())
	}
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	return err
}

// commands are the subcommands in the order usage lists them: name,
// synopsis of the arguments, and one line on what it does.
var commands = []struct{ name, synopsis, summary string }{
	{"run", "[flags]", "consume events, keep the read model, serve the status page and /metrics (the default)"},
	{"migrate", "[flags]", "apply the schema migrations and exit (run does it too)"},
	{"status", "PROJECT_ID [--json] [--at TIME | --seq N] [flags]", "a project's row and recent builds, now or at a point of the log"},
	{"dead-letters", "[retry] [--reason R | --seq N] [flags]", "print kept messages, one JSON object per line; with retry, re-apply them"},
	{"rebuild", "[--dry-run] [--batch N] [--allow-truncated] [--incremental] [flags]", "replay the stream into shadow tables and swap them in"},
	{"verify", "[--no-rebuild] [--wait D] [--max-diff N] [--allow-truncated] [--incremental] [flags]", "check the constraints and that a replay equals the live model"},
	{"stuck", "[--queued-for D] [--building-for D] [--json] [--time-out] [flags]", "list builds whose worker stopped reporting; --time-out ends them"},
	{"partitions", "[--json] [flags]", "who holds each partition (epoch, owner, last sequence applied)"},
	{"help", "[COMMAND]", "list the commands, or show a command's flags"},
}

func usage() string {
	var b strings.Builder
	b.WriteString("usage: projector [command] [flags]\n\ncommands:\n")
	for _, c := range commands {
		fmt.Fprintf(&b, "  %-13s %s\n", c.name, c.summary)
	}
	b.WriteString("\nrun 'projector help COMMAND' or 'projector COMMAND --help' for a command's flags\n")
	return b.String()
}

// commandUsage is a command's flag set's usage: synopsis, summary, flags.
func commandUsage(fs *flag.FlagSet, name string) func() {
	return func() {
		for _, c := range commands {
			if c.name == name {
				fmt.Fprintf(fs.Output(), "usage: projector %s %s\n\n%s\n\nflags:\n", c.name, c.synopsis, c.summary)
			}
		}
		fs.PrintDefaults()
	}
}

func isHelp(arg string) bool {
	return arg == "-h" || arg == "-help" || arg == "--help" || arg == "--h"
}

// wantsHelp reports whether args ask for help before any "--".
func wantsHelp(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		if isHelp(a) {
			return true
		}
	}
	return false
}

func runProjector(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	fs, c := newFlags("run", getenv, stderr)
	fs.StringVar(&c.cfg.HTTPAddr, "http-addr", envOr(getenv, "PROJECTOR_HTTP_ADDR", ":9090"), "serve the status page (/, /projects/ID, /badge/ID.svg), /healthz, /readyz and /metrics here (env PROJECTOR_HTTP_ADDR; empty: none)")
	fs.IntVar(&c.cfg.BatchSize, "batch", 1000, "most events per transaction")
	partitions, err := strconv.Atoi(envOr(getenv, "PROJECTOR_PARTITIONS", "1"))
	if err != nil {
		return fmt.Errorf("PROJECTOR_PARTITIONS: %w", err)
	}
	fs.IntVar(&c.cfg.Partitions, "partitions", partitions, "the stream's partition count, chosen once per stream: 1 keeps subjects as published; n > 1 partitions them by project (a stream of 1 is switched at start; every projector of the stream must say the same) (env PROJECTOR_PARTITIONS)")
	fs.BoolVar(&c.cfg.Repartition, "repartition", false, "switch a stream partitioned with another count to --partitions: stop every projector first, start one with this flag, then the others without it (docs/engine.md §9)")
	replicas, err := strconv.Atoi(envOr(getenv, "BUILDS_STREAM_REPLICAS", "1"))
	if err != nil {
		return fmt.Errorf("BUILDS_STREAM_REPLICAS: %w", err)
	}
	fs.IntVar(&c.cfg.Replicas, "stream-replicas", replicas, "replicas of the stream the projector creates or updates (env BUILDS_STREAM_REPLICAS; 3 on a 3-node cluster)")
	fs.DurationVar(&c.cfg.Linger, "linger", 0, "wait this long to fill a batch once a message is in hand")
	fs.IntVar(&c.cfg.Memory.Projects, "memory-projects", fold.DefaultLimits.Projects, "projects the instance's writer keeps in memory between batches (for all the partitions it holds); past it the least recently used are read again when named")
	fs.IntVar(&c.cfg.Memory.IDs, "memory-ids", fold.DefaultLimits.IDs, "event ids the partition's owner remembers (the most recent); a repeat of an older one costs its batch a second fold")
	fs.BoolVar(&c.cfg.TimeOutStuck, "time-out-stuck", false, "at every stuck check, publish a time-out completion for each stuck build (as 'projector stuck --time-out')")
	stuckFlags(fs, &c.cfg.Stuck)
	fs.DurationVar(&c.cfg.StuckEvery, "stuck-every", projector.DefaultStuckEvery, "count the stuck builds (gauge buildstate_builds_stuck) this often")
	if err := fs.Parse(args); err != nil {
		return err
	}
	log, err := c.logger(stderr)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck
	c.cfg.Logger = log
	if ownProcess {
		defer collectorDefaults(getenv, runGCPercent, runMemoryLimit)()
	}
	return projector.Run(ctx, c.cfg)
}

func runMigrate(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs, c := newFlags("migrate", getenv, stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	pool, err := projector.OpenPool(ctx, c.cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := projector.MigratePool(ctx, pool); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "migrations applied")
	return nil
}

func openStore(ctx context.Context, c *common) (*projection.Store, func(), error) {
	pool, err := projector.OpenPool(ctx, c.cfg.DatabaseURL)
	if err != nil {
		return nil, nil, err
	}
	if err := projector.CheckPool(ctx, pool); err != nil {
		pool.Close()
		return nil, nil, err
	}
	return projection.New(pool, projection.Options{Prefix: c.cfg.Prefix, Gate: true}), pool.Close, nil
}

func runDeadLetters(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	retry := len(args) > 0 && args[0] == "retry"
	if retry {
		args = args[1:]
	}
	fs, c := newFlags("dead-letters", getenv, stderr)
	var f projection.DeadLetterFilter
	fs.StringVar(&f.Reason, "reason", "", "only this reason")
	fs.Func("seq", "only this stream sequence (1 or more)", func(s string) error {
		n, err := strconv.ParseUint(s, 10, 64)
		if err == nil && n == 0 {
			return errors.New("stream sequences start at 1")
		}
		f.Seq = n
		return err
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	if f.Reason != "" && f.Seq != 0 {
		return errors.New("dead-letters: --reason and --seq are exclusive")
	}
	if f.Reason != "" && !slices.Contains(events.Reasons, events.Reason(f.Reason)) {
		known := make([]string, len(events.Reasons))
		for i, r := range events.Reasons {
			known[i] = string(r)
		}
		return fmt.Errorf("dead-letters: unknown reason %q; the reasons are: %s", f.Reason, strings.Join(known, ", "))
	}
	store, closeStore, err := openStore(ctx, c)
	if err != nil {
		return err
	}
	defer closeStore()
	if retry {
		res, err := store.Retry(ctx, f)
		if err != nil {
			return err
		}
		left, err := store.DeadLetters(ctx, f)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "applied %d, duplicates %d, still dead %d\n", res.Applied, res.Duplicates, len(left))
		return nil
	}
	dls, err := store.DeadLetters(ctx, f)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	for _, d := range dls {
		if err := enc.Encode(deadLetterJSON(d)); err != nil {
			return err
		}
	}
	return nil
}

// deadLetterJSON shows the payload as text when it is UTF-8, else base64;
// a subject that is not exact as text comes with its bytes in base64.
func deadLetterJSON(d projection.DeadLetter) any {
	type out struct {
		projection.DeadLetter
		SubjectBase64 []byte `json:"subject_base64,omitempty"`
		Payload       string `json:"payload,omitempty"`
		PayloadBase64 []byte `json:"payload_base64,omitempty"`
		PayloadBytes  int    `json:"payload_bytes"`
	}
	o := out{DeadLetter: d, SubjectBase64: d.SubjectBytes, PayloadBytes: len(d.Payload)}
	if isText(d.Payload) {
		o.Payload = string(d.Payload)
	} else {
		o.PayloadBase64 = d.Payload
	}
	return o
}

// JSON encoding replaces invalid UTF-8 with U+FFFD, so only valid UTF-8 (not
// merely valid JSON: json.Valid accepts invalid bytes in strings) is shown as
// text; anything else goes out as base64, byte for byte.
func isText(b []byte) bool {
	return len(b) > 0 && utf8.Valid(b)
}

func runStatus(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs, c := newFlags("status", getenv, stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	at := fs.String("at", "", "show the project as of this time of the log (RFC 3339), replaying its events")
	var seq uint64
	fs.Func("seq", "show the project as of this stream sequence, replaying its events", func(s string) error {
		n, err := strconv.ParseUint(s, 10, 64)
		seq = n
		return err
	})
	projectID, rest := "", args
	if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		projectID, rest = args[0], args[1:]
	}
	if err := fs.Parse(rest); err != nil {
		return err
	}
	if projectID == "" && fs.NArg() > 0 {
		projectID = fs.Arg(0)
	}
	if projectID == "" {
		return errors.New("status: PROJECT_ID is required")
	}
	if *at != "" || seq != 0 {
		return runStatusAt(ctx, c, projectID, *at, seq, *asJSON, stdout)
	}
	store, closeStore, err := openStore(ctx, c)
	if err != nil {
		return err
	}
	defer closeStore()
	row, err := store.Project(ctx, projectID)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("status: project %q has no visible build", projectID)
	}
	if err != nil {
		return err
	}
	builds, err := store.RecentBuilds(ctx, projectID, 10)
	if err != nil {
		return err
	}
	newest, err := store.NewestBuild(ctx, projectID)
	if err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(struct {
			Project projection.ProjectRow   `json:"project"`
			Builds  []projection.MetricsRow `json:"recent_builds"`
		}{row, builds})
	}
	printStatus(stdout, row, web.Explain(row, newest), builds)
	return nil
}

// printStatus prints a project's row, what in it can surprise (notes, from
// web.Explain), and its recent builds; every time in when.Layout.
func printStatus(w io.Writer, row projection.ProjectRow, notes []string, builds []projection.MetricsRow) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "project\t%s\n", row.ProjectID)
	fmt.Fprintf(tw, "status\t%s\n", row.BuildStatus)
	fmt.Fprintf(tw, "current build\t%s\n", orDash(row.CurrentBuildID))
	fmt.Fprintf(tw, "last started\t%s\n", timeOrDash(row.LastBuildStarted))
	fmt.Fprintf(tw, "last completed\t%s\n", timeOrDash(row.LastBuildCompleted))
	fmt.Fprintf(tw, "framework\t%s\n", orDash(row.Framework))
	fmt.Fprintf(tw, "updated\t%s\n", timeOrDash(&row.UpdatedAt))
	tw.Flush()
	if len(notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range notes {
			fmt.Fprintln(w, "note: "+n)
		}
	}
	if len(builds) == 0 {
		fmt.Fprintln(w, "\nno builds with metrics yet")
		return
	}
	fmt.Fprintln(w, "\nrecent builds:")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "BUILD\tSTATUS\tQUEUED\tSTARTED\tCOMPLETED\tDURATION\tFRAMEWORK\tNODE\tPM\tATTEMPT\tERROR")
	for _, b := range builds {
		dur := "-"
		if b.DurationMS != nil {
			dur = (time.Duration(*b.DurationMS) * time.Millisecond).String()
		}
		attempt := "-"
		if b.Attempt != nil {
			attempt = strconv.FormatInt(*b.Attempt, 10)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", b.BuildID, b.Status,
			timeOrDash(b.QueuedAt), timeOrDash(&b.StartedAt), timeOrDash(b.CompletedAt), dur,
			orDash(b.Framework), orDash(b.NodeVersion), orDash(b.PackageManager), attempt, orDash(b.Error))
	}
	tw.Flush()
}

func orDash(s *string) string {
	if s == nil || *s == "" {
		return "-"
	}
	return *s
}

func timeOrDash(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return when.Format(*t, time.Local)
}
