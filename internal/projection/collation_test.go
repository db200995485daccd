package projection_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
)

// TestTieBreakIgnoresCollation: §2's tie break ("the greater id") is byte
// order, the order fsm.Merge uses. A database created with a linguistic
// default collation (en_US.UTF-8 is the default of many distributions and of
// the official postgres image) orders "a" before "B". Here the facts table's
// event_id is given such a collation; the rows must still not depend on the
// order the events arrive in.
func TestTieBreakIgnoresCollation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	at := time.Now().UTC().Add(-time.Hour).Truncate(time.Second)
	ev := func(kind events.Kind, id string, sec int, d events.Data) events.Event {
		e := events.New(kind, "p-coll", "b-coll", at.Add(time.Duration(sec)*time.Second), d)
		e.ID = id
		return e
	}
	upper := ev(events.KindStarted, "B", 10, events.Data{Framework: str("upper")})
	lower := ev(events.KindStarted, "a", 10, events.Data{Framework: str("lower")}) // "a" > "B" in bytes: it wins
	queued := ev(events.KindQueued, "q", 0, events.Data{})
	metrics := ev(events.KindMetricsRecorded, "m", 20, events.Data{})
	done := ev(events.KindCompleted, "c", 30, events.Data{Outcome: events.OutcomeSucceeded})

	orders := [][]events.Event{{queued, upper, lower, metrics, done}, {queued, lower, upper, metrics, done}}
	for i, order := range orders {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			s, _ := newCountedStore(t)
			var c string
			if err := s.Pool().QueryRow(ctx, `SELECT collname FROM pg_collation WHERE collname IN ('und-x-icu', 'en_US.utf8', 'en_US') ORDER BY collname DESC LIMIT 1`).Scan(&c); err != nil {
				t.Skipf("no linguistic collation on this server: %v", err)
			}
			if _, err := s.Pool().Exec(ctx, `ALTER TABLE projector_facts ALTER COLUMN event_id TYPE text COLLATE "`+c+`"`); err != nil {
				t.Fatal(err)
			}
			for j, e := range order { // one batch each: the tie is settled against the stored fact
				if _, err := s.Apply(ctx, nil, msgs(t, uint64(j+1), e)); err != nil {
					t.Fatal(err)
				}
			}
			var ids []string
			for _, e := range order {
				ids = append(ids, e.ID)
			}
			t.Logf("events %s, one batch each, with event_id collation %q", strings.Join(ids, ","), c)
			checkAgainstModel(t, s, order) // framework "lower": id "a" > "B" in byte order
			var fact string
			if err := s.Pool().QueryRow(ctx, `SELECT event_id FROM projector_facts WHERE build_id = 'b-coll' AND kind = 'started'`).Scan(&fact); err != nil {
				t.Fatal(err)
			}
			if fact != "a" {
				t.Errorf("projector_facts (b-coll, started).event_id = %q; want \"a\"", fact)
			}
		})
	}
}
