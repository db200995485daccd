// Command bench measures the projector against real services and prints
// the figures: catch-up on a backlog (with two baselines in the same run: the
// raw JetStream fetch+ack rate of the same stream, and the seed's
// direct-update worker), live publish-to-visible latency, and
// scale-out over several projector processes. It starts an embedded NATS
// JetStream server, uses PostgreSQL from DATABASE_URL (else 127.0.0.1:5432,
// else a throwaway cluster) with a fresh database per run, and runs the
// projector binary, built from this module, as child processes.
//
//	go run ./cmd/bench all
//	go run ./cmd/bench catchup --events 200000 --projects 20000
//	go run ./cmd/bench raw --raw-runs 3
//	go run ./cmd/bench live --rate 5000 --duration 30s --batch 1000 --linger 0,2ms
//	go run ./cmd/bench scale --instances 1,2,3
package main

import (
	"context"
	"fmt"
	"os"
)

func main() {
	if err := run(context.Background(), os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
