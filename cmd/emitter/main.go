// Command emitter publishes build lifecycle events to NATS JetStream:
//
//	emitter publish --type started --project P --build B [--at T] [--data JSON]
//	emitter serve   [--http-addr :8080]   HTTP ingest: POST /v1/events
//	emitter load    [--seed N --projects P ...]   reproducible load generator
//
// Every flag has an environment default: NATS_URL, BUILDS_SUBJECT_PREFIX,
// BUILDS_STREAM, EMITTER_HTTP_ADDR.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/buildstate/buildstate/internal/natsjs"
)

func main() {
	if err := run(context.Background(), os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

const usage = `usage: emitter <command> [flags]

commands:
  publish   publish one event and print its stream sequence
  serve     HTTP ingest: POST /v1/events, POST /v1/events/batch (signed), GET /healthz, GET /readyz
  load      publish a reproducible, seeded workload and print the rate
  help      list the commands, or show a command's flags (help COMMAND)

Run "emitter help <command>" or "emitter <command> --help" for a command's flags.
`

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	if len(args) < 2 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	cmd, rest := args[1], args[2:]
	if cmd == "help" && len(rest) > 0 {
		cmd, rest = rest[0], []string{"-h"}
	}
	if wantsHelp(rest) {
		stderr = stdout // asked for: the flags are the command's output
	}
	var err error
	switch cmd {
	case "publish":
		err = runPublish(ctx, rest, getenv, stdout, stderr)
	case "serve":
		err = runServe(ctx, rest, getenv, stdout, stderr)
	case "load":
		err = runLoad(ctx, rest, getenv, stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	return err
}

// wantsHelp reports whether args ask for help before any "--".
func wantsHelp(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		if a == "-h" || a == "-help" || a == "--help" || a == "--h" {
			return true
		}
	}
	return false
}

// Defaults shared by the commands.
const (
	defaultPrefix = "builds"
	defaultStream = "BUILDS"
)

func envOr(getenv func(string) string, key, def string) string {
	if v := getenv(key); v != "" {
		return v
	}
	return def
}

// natsFlags are the connection flags every command has.
type natsFlags struct {
	client natsjs.Client
	prefix string
}

func addNATSFlags(fs *flag.FlagSet, getenv func(string) string) *natsFlags {
	f := &natsFlags{}
	f.client.AddFlags(fs, getenv)
	fs.StringVar(&f.prefix, "subject-prefix", envOr(getenv, "BUILDS_SUBJECT_PREFIX", defaultPrefix),
		"subject prefix: events go to <prefix>.<project_id>.<kind> (env BUILDS_SUBJECT_PREFIX)")
	return f
}

// connect connects as the flags say (natsjs.ConnectJetStream), logging
// reconnects to log.
func (f *natsFlags) connect(name string, log *zap.Logger, opts ...jetstream.JetStreamOpt) (*nats.Conn, jetstream.JetStream, error) {
	return natsjs.ConnectJetStream(f.client, name, log, opts...)
}

// newFlagSet makes a command's flag set, writing usage and errors to stderr.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("emitter "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parse parses args and refuses positional arguments.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%s: unexpected arguments %q", fs.Name(), fs.Args())
	}
	return nil
}

// newLogger logs to w, as JSON lines or, with format "console", for people.
func newLogger(format string, w io.Writer) (*zap.Logger, error) {
	cfg := zap.NewProductionEncoderConfig()
	cfg.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	switch format {
	case "json":
		enc = zapcore.NewJSONEncoder(cfg)
	case "console":
		enc = zapcore.NewConsoleEncoder(cfg)
	default:
		return nil, fmt.Errorf("--log-format %q: want json or console", format)
	}
	return zap.New(zapcore.NewCore(enc, zapcore.AddSync(w), zap.InfoLevel)), nil
}
