package projection_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
)

// A claim or an applied id that another projector's transaction commits
// while a batch is being applied (after the batch read the claims and ids,
// before its own write) is seen: the batch is folded again on it and
// decides as if it had come second, as the contract says of concurrent
// projectors.
func TestClaimCommittedMeanwhile(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 11, 26, 20, 0, 0, 0, time.UTC)
	ours := events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{})
	tests := []struct {
		name   string
		other  string // the other transaction's write
		reason string // what our event becomes
	}{
		{"the build, for another project", `INSERT INTO projector_builds (build_id, project_id) VALUES ('b-1', 'p-2')`,
			string(events.ReasonBuildProjectClash)},
		{"the id, with other content", `INSERT INTO projector_applied (event_id, digest, stream_seq) VALUES ('` + ours.ID + `', '\x00', 1)`,
			string(events.ReasonIDConflict)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			s := newStore(t, projection.Options{Gate: true})
			tx, err := s.Pool().Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback(ctx) //nolint:errcheck // after Commit this is a no-op
			if _, err := tx.Exec(ctx, tt.other); err != nil {
				t.Fatal(err)
			}
			type applied struct {
				res projection.Result
				err error
			}
			done := make(chan applied, 1)
			go func() {
				res, err := s.Apply(ctx, nil, msgs(t, 2, ours))
				done <- applied{res, err}
			}()
			waitForLockWaiter(t, s.Pool())
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			got := <-done
			if got.err != nil || got.res.Applied != 0 || got.res.DeadLettered != 1 {
				t.Fatalf("Apply = %+v, %v; want 1 dead letter", got.res, got.err)
			}
			var reason string
			if err := s.Pool().QueryRow(ctx, `SELECT reason FROM projector_dead_letters WHERE stream_seq = 2`).Scan(&reason); err != nil {
				t.Fatal(err)
			}
			if reason != tt.reason {
				t.Errorf("dead letter reason = %q; want %q", reason, tt.reason)
			}
			// The refused event claimed nothing and marked nothing.
			var builds, ids, facts int
			if err := s.Pool().QueryRow(ctx, `SELECT (SELECT count(*) FROM projector_builds WHERE project_id = 'p-1'),
				(SELECT count(*) FROM projector_applied WHERE stream_seq = 2), (SELECT count(*) FROM projector_facts)`).Scan(&builds, &ids, &facts); err != nil {
				t.Fatal(err)
			}
			if builds != 0 || ids != 0 || facts != 0 {
				t.Errorf("claims of p-1 %d, ids at seq 2 %d, facts %d; want none", builds, ids, facts)
			}
		})
	}
}

// waitForLockWaiter waits until a session of the pool's database waits on a
// lock (the batch's insert, on the row the open transaction wrote).
func waitForLockWaiter(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var n int
		err := pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("no session waits on a lock after 20 s: the batch did not reach its write")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
