// Command demo runs buildstate end to end with nothing configured: an
// embedded NATS JetStream server, Postgres from DATABASE_URL, else the local
// server, else a throwaway cluster; it publishes builds out of order and
// duplicated, runs the projector and prints the read model.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/buildstate/buildstate/internal/demo"
)

func main() {
	if err := run(context.Background(), os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	db := fs.String("database", "buildstate_demo", "database to (re)create for the demo")
	keep := fs.Bool("keep", false, "keep the demo database afterwards")
	verbose := fs.Bool("v", false, "show the projector's logs")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	log := zap.NewNop()
	if *verbose {
		// Console lines for people, to stderr; no stack traces under warnings.
		enc := zap.NewDevelopmentEncoderConfig()
		enc.EncodeTime = zapcore.ISO8601TimeEncoder
		log = zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.AddSync(stderr), zap.DebugLevel))
	}
	return demo.Run(ctx, demo.Options{Getenv: getenv, Stdout: stdout, Log: log, Database: *db, Keep: *keep})
}
