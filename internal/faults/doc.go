// Package faults holds the fault-injection tests of the projector: crashes
// (SIGKILL of the real binary), Postgres and NATS outages, poison messages,
// several projectors on one durable consumer, forced constraint errors,
// JetStream durability and graceful stop. Each test runs against a real
// PostgreSQL database of its own and a real embedded NATS JetStream server,
// and compares the read model it ends with against a reference run: the same
// messages applied in one go by projection.Store.Apply to a fresh database.
//
// Everything but this file is tests; docs/guarantees.md maps each promise to
// the test that proves it.
package faults
