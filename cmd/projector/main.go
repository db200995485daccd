// Command projector consumes build lifecycle events from NATS JetStream and
// keeps the Postgres read model (projects, project_build_metrics) correct.
//
//	projector [run] [--time-out-stuck]      consume (default)
//	projector migrate                       apply the schema migrations
//	projector dead-letters [--reason R] [--seq N]
//	projector dead-letters retry [--reason R | --seq N]
//	projector status PROJECT_ID [--json] [--at TIME | --seq N]
//	projector rebuild [--dry-run] [--batch N] [--allow-truncated] [--incremental]
//	projector verify [--no-rebuild] [--wait D] [--max-diff N] [--allow-truncated] [--incremental]
//	projector stuck [--queued-for D] [--building-for D] [--json] [--time-out]
//	projector partitions [--json]
package main

import (
	"context"
	"fmt"
	"os"
)

// ownProcess is set when the process is the command's alone (main), not a
// test's that runs commands in-process: only then does `run` set the
// collector up for its writer (collectorDefaults), which the whole process
// shares.
var ownProcess bool

func main() {
	ownProcess = true
	if err := run(context.Background(), os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
