package replay_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/replay"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/internal/workload"
)

// raw is a message as published: subject and body.
type raw struct {
	subject string
	data    []byte
}

// messyHistory is a shuffled workload with exact duplicates, plus messages
// the projector refuses, spread through it: a malformed body, an unknown
// spec version, an event from the future, a subject that does not match the
// body, id conflicts (an id re-sent with other content) and build clashes (a
// build named under a second project).
func messyHistory(t testing.TB, seed int64, projects int) []raw {
	t.Helper()
	evs := workload.Generate(seed, workload.Config{
		Projects: projects, BuildsPerProject: 2, MaxBuildsPerProject: 4, DupRate: 0.1, Shuffle: true,
	})
	out := make([]raw, 0, len(evs)+16)
	for _, ev := range evs {
		out = append(out, raw{subject: events.Subject("builds", ev.ProjectID, ev.Kind()), data: mustMarshal(t, ev)})
	}
	rng := rand.New(rand.NewPCG(uint64(seed), 99))
	insert := func(r raw) {
		i := rng.IntN(len(out) + 1)
		out = append(out[:i], append([]raw{r}, out[i:]...)...)
	}
	insert(raw{"builds.p-0.queued", []byte(`{"spec_version":1,`)})
	insert(raw{"builds.p-1.queued", []byte(`{"spec_version":2,"id":"x","type":"build.queued","project_id":"p-1","build_id":"b","occurred_at":"2026-01-01T00:00:00Z"}`)})
	future := events.New(events.KindQueued, "p-1", "p-1-b9", time.Now().Add(3*time.Hour), events.Data{})
	insert(raw{events.Subject("builds", "p-1", events.KindQueued), mustMarshal(t, future)})
	mismatch := events.New(events.KindStarted, "p-2", "p-2-b9", time.Now().Add(-time.Hour), events.Data{})
	insert(raw{events.Subject("builds", "p-3", events.KindStarted), mustMarshal(t, mismatch)})
	for i := range 5 {
		ev := evs[rng.IntN(len(evs))]
		ev.OccurredAt = ev.OccurredAt.Add(time.Duration(i+1) * time.Second) // same id, other content
		insert(raw{events.Subject("builds", ev.ProjectID, ev.Kind()), mustMarshal(t, ev)})
	}
	for i := range 3 {
		// An id re-sent with other content and a build nobody claimed: the
		// refused copy must not claim it for the valid event that follows.
		ev := evs[rng.IntN(len(evs))]
		build := fmt.Sprintf("orphan-%d", i)
		refused := ev
		refused.BuildID = build
		insert(raw{events.Subject("builds", refused.ProjectID, refused.Kind()), mustMarshal(t, refused)})
		other := fmt.Sprintf("p-%d", rng.IntN(projects))
		valid := events.New(events.KindQueued, other, build, ev.OccurredAt, events.Data{})
		insert(raw{events.Subject("builds", other, valid.Kind()), mustMarshal(t, valid)})
	}
	for range 5 {
		ev := evs[rng.IntN(len(evs))]
		other := fmt.Sprintf("p-%d", rng.IntN(projects))
		clash := events.New(ev.Kind(), other, ev.BuildID, ev.OccurredAt, ev.Data)
		insert(raw{events.Subject("builds", other, ev.Kind()), mustMarshal(t, clash)})
	}
	return out
}

func mustMarshal(t testing.TB, ev events.Event) []byte {
	t.Helper()
	b, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// newDB gives the test its own database with the live schema migrated.
func newDB(t testing.TB) *pgxpool.Pool {
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
	return pool
}

// newLog gives the test an embedded JetStream server with the BUILDS stream.
func newLog(t testing.TB) replay.Log {
	t.Helper()
	_, js := testenv.JetStream(t)
	if _, err := natsjs.EnsureStream(context.Background(), js, "BUILDS", "builds", 1); err != nil {
		t.Fatal(err)
	}
	return replay.Log{JS: js, Stream: "BUILDS", Prefix: "builds"}
}

// publishAll publishes the messages in order (without Nats-Msg-Id, so that
// every duplicate reaches the log) and returns the last sequence.
func publishAll(t testing.TB, js jetstream.JetStream, msgs []raw) uint64 {
	t.Helper()
	for _, m := range msgs {
		for {
			_, err := js.PublishAsync(m.subject, m.data)
			if errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
				<-js.PublishAsyncComplete()
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			break
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(time.Minute):
		t.Fatal("publish acks did not arrive")
	}
	s, err := js.Stream(context.Background(), "BUILDS")
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.LastSeq
}

// rowsOf renders a store's read model as sorted lines, every column but
// updated_at, for comparison.
func rowsOf(t testing.TB, s *projection.Store) []string {
	t.Helper()
	ctx := context.Background()
	ps, err := s.Projects(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ms, err := s.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range ps {
		out = append(out, projectLine(p.ProjectID, p.BuildStatus, p.CurrentBuildID, p.LastBuildStarted, p.LastBuildCompleted, p.Framework))
	}
	for _, m := range ms {
		out = append(out, metricsLine(fsm.MetricsRow{
			BuildID: m.BuildID, ProjectID: m.ProjectID, Status: m.Status, QueuedAt: m.QueuedAt, StartedAt: m.StartedAt,
			CompletedAt: m.CompletedAt, DurationMS: m.DurationMS, Framework: m.Framework, NodeVersion: m.NodeVersion,
			PackageManager: m.PackageManager, Attempt: m.Attempt, Error: m.Error,
		}))
	}
	sort.Strings(out)
	return out
}

// foldRows renders a fold's read model like rowsOf.
func foldRows(f *replay.Fold) []string {
	var out []string
	for _, p := range f.Projects() {
		v := f.View(p)
		if r := v.Row; r != nil {
			out = append(out, projectLine(r.ProjectID, string(r.Status), r.CurrentBuildID, r.LastBuildStarted, r.LastBuildCompleted, r.Framework))
		}
		for _, m := range v.Metrics {
			out = append(out, metricsLine(m))
		}
	}
	sort.Strings(out)
	return out
}

func projectLine(id, status string, current *string, started, completed *time.Time, fw *string) string {
	return strings.Join([]string{"project", id, status, s(current), ts(started), ts(completed), s(fw)}, " ")
}

func metricsLine(m fsm.MetricsRow) string {
	return strings.Join([]string{"metrics", m.BuildID, m.ProjectID, m.Status, ts(m.QueuedAt), ts(&m.StartedAt), ts(m.CompletedAt),
		n(m.DurationMS), s(m.Framework), s(m.NodeVersion), s(m.PackageManager), n(m.Attempt), s(m.Error)}, " ")
}

func s(p *string) string {
	if p == nil {
		return "NULL"
	}
	return fmt.Sprintf("%q", *p)
}

func n(p *int64) string {
	if p == nil {
		return "NULL"
	}
	return fmt.Sprint(*p)
}

func ts(p *time.Time) string {
	if p == nil {
		return "NULL"
	}
	return p.UTC().Format(time.RFC3339Nano)
}

// sameLines fails the test with the first differences of two renderings.
func sameLines(t testing.TB, what string, got, want []string) {
	t.Helper()
	g, w := map[string]bool{}, map[string]bool{}
	for _, l := range got {
		g[l] = true
	}
	for _, l := range want {
		w[l] = true
	}
	var diff []string
	for _, l := range want {
		if !g[l] {
			diff = append(diff, "- want "+l)
		}
	}
	for _, l := range got {
		if !w[l] {
			diff = append(diff, "+ got  "+l)
		}
	}
	if len(diff) > 0 {
		if len(diff) > 20 {
			diff = append(diff[:20], fmt.Sprintf("... %d more", len(diff)-20))
		}
		t.Errorf("%s: %d rows, want %d; differences:\n%s", what, len(got), len(want), strings.Join(diff, "\n"))
	}
}
