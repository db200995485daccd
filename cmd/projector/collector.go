package main

import "runtime/debug"

// The Go garbage collector of the commands that hold much in memory, where
// GOGC and GOMEMLIMIT do not say otherwise (docs/performance.md, "The
// collector").
//
// `projector run`: the writer's memory (--memory-projects) is a large heap
// of pointers that changes little from batch to batch, which Go's default
// (collect each time the heap doubles) marks over and over: a quarter of
// the projector's CPU in a catch-up. GOGC=400 collects a fifth as often; the
// soft limit makes it collect sooner as the heap nears 192 MiB, which keeps
// an instance at 100,000 projects under its 256 MiB budget. Raising
// --memory-projects far past its default needs a higher GOMEMLIMIT: held
// under the limit, the collector spends up to half the CPU.
//
// A bulk replay (rebuild, verify) holds the log's read model (about 300
// bytes an event: 1,000,000 events take ~300 MiB of live heap) and
// allocates several times that while it reads: with no GOGC target and a
// 448 MiB limit the collector runs only when the heap reaches the limit,
// fewer collections than GOGC=100 makes while the model grows, and the
// process stays under 512 MiB. Set GOMEMLIMIT for bigger logs.
const (
	runGCPercent      = 400
	runMemoryLimit    = 192 << 20
	replayGCPercent   = -1 // off: the limit alone triggers collections
	replayMemoryLimit = 448 << 20
)

// collectorDefaults sets GOGC to gc (-1: off) unless the environment sets
// GOGC, and the soft memory limit to limit unless it sets GOMEMLIMIT, and
// returns what puts the old settings back. With gc off and GOMEMLIMIT set
// it changes nothing: the environment's limit was chosen for its GOGC.
func collectorDefaults(getenv func(string) string, gc int, limit int64) (restore func()) {
	envGC, envLimit := getenv("GOGC") != "", getenv("GOMEMLIMIT") != ""
	if gc < 0 && envLimit {
		return func() {}
	}
	oldLimit := debug.SetMemoryLimit(-1) // reads it
	if !envLimit {
		debug.SetMemoryLimit(limit)
	}
	oldGC := debug.SetGCPercent(100)
	debug.SetGCPercent(oldGC)
	if !envGC {
		debug.SetGCPercent(gc)
	}
	return func() {
		debug.SetMemoryLimit(oldLimit)
		debug.SetGCPercent(oldGC)
	}
}
