package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/testenv"
)

// `projector partitions` lists each partition's fence: p1's, unheld, on a
// new database, then the rows the acquires made, as a table and as JSON.
func TestPartitionsCommand(t *testing.T) {
	t.Parallel()
	dbURL := testenv.Database(t)
	if _, errOut, err := runOut(dbURL, "migrate"); err != nil {
		t.Fatalf("migrate: %v\n%s", err, errOut)
	}
	// The schema makes p1's row; nobody holds it yet.
	// Its durable's lag comes from NATS: an embedded server with the
	// stream, five messages and the durable, none applied.
	natsURL, js := testenv.JetStream(t)
	ctx := context.Background()
	if _, err := natsjs.EnsureStream(ctx, js, "BUILDS", "builds", 1); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if _, err := js.Publish(ctx, fmt.Sprintf("builds.p-%d.queued", i), []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := natsjs.EnsureConsumer(ctx, js, "BUILDS", "projector", "builds", nil); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := runOut(dbURL, "partitions", "--nats-url", natsURL)
	if f := strings.Fields(out); err != nil || len(f) != 15 || f[8] != "p1" || f[10] != "0" || f[11] != "-" || f[14] != "5" {
		t.Fatalf("partitions on a new database: %q, %v\n%s", out, err, errOut)
	}
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	store := projection.New(pool, projection.Options{Prefix: "builds"})
	for _, a := range []struct {
		layout    string
		partition int
		owner     string
	}{{"p1", 0, "host/1/aa"}, {"p4", 2, "host/2/bb"}, {"p4", 2, "host/3/cc"}} {
		if _, err := store.Acquire(ctx, a.layout, a.partition, a.owner); err != nil {
			t.Fatal(err)
		}
	}
	// A partitioned layout's rows come with the group's members.
	g, err := natsjs.JoinGroup(ctx, js, "projector", "host/9/zz", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Stop()
	out, _, err = runOut(dbURL, "partitions", "--nats-url", natsURL)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "LAYOUT") ||
		!strings.Contains(lines[1], "host/1/aa") || !strings.Contains(lines[2], "host/3/cc") || lines[3] != "members (1): host/9/zz" {
		t.Errorf("partitions table:\n%s", out)
	}
	if f := strings.Fields(lines[2]); len(f) < 5 || f[0] != "p4" || f[1] != "2" || f[2] != "2" {
		t.Errorf("p4/2 row %q: want layout p4, partition 2, epoch 2 (two acquires)", lines[2])
	}
	out, _, err = runOut(dbURL, "partitions", "--json", "--nats-url", natsURL)
	if err != nil {
		t.Fatal(err)
	}
	var rows []partitionOut
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var r partitionOut
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		rows = append(rows, r)
	}
	if len(rows) != 2 || rows[1].Owner != "host/3/cc" || rows[1].Epoch != 2 || rows[1].AcquiredAt == nil {
		t.Errorf("partitions --json: %+v", rows)
	}
	if len(rows) == 2 && (rows[0].Lag == nil || *rows[0].Lag != 5 || rows[1].Lag != nil) {
		t.Errorf("partitions --json lag: %v, %v; want 5 for p1 (its durable), null for p4/2 (no durable)", rows[0].Lag, rows[1].Lag)
	}
	// NATS unreachable: the rows all the same, the lag unknown, and said so.
	out, errOut, err = runOut(dbURL, "partitions", "--nats-url", "nats://127.0.0.1:1")
	if err != nil || !strings.Contains(errOut, "lag not shown") || len(strings.Split(strings.TrimSpace(out), "\n")) != 3 { // no members line either
		t.Errorf("partitions without NATS: %q, %v\n%s", out, err, errOut)
	}
}
