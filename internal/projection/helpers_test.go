package projection_test

import (
	"context"
	"testing"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// newStore gives a test its own migrated database.
func newStore(t *testing.T, opts projection.Options) *projection.Store {
	t.Helper()
	ctx := context.Background()
	pool, err := projector.OpenPool(ctx, testenv.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if err := projector.MigratePool(ctx, pool); err != nil {
		t.Fatal(err)
	}
	if opts.Observer == nil {
		// Every store of the suite counts constraint errors; none may occur.
		obs := &countingObserver{}
		opts.Observer = obs
		t.Cleanup(func() { assertNoConstraintErrors(t, obs) })
	}
	return projection.New(pool, opts)
}

// msgs encodes events as log messages with sequences from first on.
func msgs(t testing.TB, first uint64, evs ...events.Event) []projection.Message {
	t.Helper()
	out := make([]projection.Message, len(evs))
	for i, ev := range evs {
		body, err := ev.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		out[i] = projection.Message{Seq: first + uint64(i), Subject: events.Subject("builds", ev.ProjectID, ev.Kind()),
			Data: body, StoredAt: time.Now()}
	}
	return out
}

func str(s string) *string { return &s }
