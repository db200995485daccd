// Command projector consumes build lifecycle events from NATS JetStream and
// keeps the Postgres read model (projects, project_build_metrics) correct.
//
//	projector [run]                         consume (default)
//	projector migrate                       apply the schema migrations
//	projector dead-letters [--reason R] [--seq N]
//	projector dead-letters retry [--reason R | --seq N]
//	projector status PROJECT_ID [--json] [--at TIME | --seq N]
//	projector rebuild [--dry-run] [--batch N] [--allow-truncated] [--incremental]
//	projector verify [--no-rebuild] [--wait D] [--max-diff N] [--allow-truncated] [--incremental]
package main

import (
	"context"
	"fmt"
	"os"
	"runtime/debug"
)

// replayMemoryLimit is the Go runtime's soft memory limit for rebuild and
// verify when GOMEMLIMIT is not set. A bulk replay holds the log's read
// model in memory (about 250 bytes an event: 1,000,000 events take ~250 MiB
// of live heap) and allocates several times that while it reads. With the
// limit, and no GOGC target unless GOGC is set, the collector runs only when
// the heap reaches the limit: fewer collections than GOGC=100 would make
// while the model grows, and the process stays under 512 MiB. Set
// GOMEMLIMIT for bigger logs.
const replayMemoryLimit = 448 << 20

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "rebuild" || os.Args[1] == "verify") && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(replayMemoryLimit)
		if os.Getenv("GOGC") == "" {
			debug.SetGCPercent(-1)
		}
	}
	if err := run(context.Background(), os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
