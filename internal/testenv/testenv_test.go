package testenv

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func TestMain(m *testing.M) { Main(m) }

func TestDatabase(t *testing.T) {
	t.Parallel()
	ctx := t.Context()

	var mu sync.Mutex
	names := map[string]bool{}
	// The group returns when its parallel subtests are done and their
	// databases dropped.
	t.Run("group", func(t *testing.T) {
		for i := range 4 {
			t.Run(fmt.Sprint(i), func(t *testing.T) {
				t.Parallel()
				url := Database(t)
				conn, err := pgx.Connect(ctx, url)
				if err != nil {
					t.Fatalf("connect to %s: %v", url, err)
				}
				defer conn.Close(ctx)

				var name string
				if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&name); err != nil {
					t.Fatalf("current_database(): %v", err)
				}
				if !strings.HasPrefix(name, "bs_t_") || len(name) != len("bs_t_")+12 {
					t.Errorf("current_database() = %q; want bs_t_ and 12 hex digits", name)
				}
				mu.Lock()
				if names[name] {
					t.Errorf("database %q handed out twice", name)
				}
				names[name] = true
				mu.Unlock()

				// The database is the test's own: the same table in each.
				if _, err := conn.Exec(ctx, "CREATE TABLE t (n int); INSERT INTO t VALUES (1)"); err != nil {
					t.Fatalf("create table: %v", err)
				}
				var n int
				if err := conn.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil || n != 1 {
					t.Errorf("SELECT count(*) FROM t = %d, %v; want 1", n, err)
				}
			})
		}
	})
	if len(names) != 4 {
		t.Fatalf("got %d databases; want 4", len(names))
	}

	conn, err := pgx.Connect(ctx, AdminURL(t))
	if err != nil {
		t.Fatalf("connect to the admin URL: %v", err)
	}
	defer conn.Close(ctx)
	for name := range names {
		var exists bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
			t.Fatalf("look up %s: %v", name, err)
		}
		if exists {
			t.Errorf("database %s still exists after its test", name)
		}
	}
}

func TestNATS(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	url, srv := NATS(t)
	if url != srv.ClientURL() {
		t.Errorf("NATS() url = %q; want ClientURL() %q", url, srv.ClientURL())
	}
	js := jetStream(t, url)
	createStream(t, ctx, js, "TESTENV")
	want := publish(t, ctx, js, "testenv.a", 0, 3)
	if got := readAll(t, ctx, js, "TESTENV", len(want)); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read back %q; want %q", got, want)
	}
}

func TestRestartNATS(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	url, srv := NATS(t)
	js := jetStream(t, url)
	createStream(t, ctx, js, "OUTAGE")
	before := publish(t, ctx, js, "outage.x", 0, 5)

	next := RestartNATS(t, srv)
	if srv.Running() {
		t.Errorf("old server still running after RestartNATS")
	}
	if next.ClientURL() != url {
		t.Errorf("restarted ClientURL() = %q; want the same %q", next.ClientURL(), url)
	}

	// A new client: the stream and its acknowledged messages survived.
	js2 := jetStream(t, next.ClientURL())
	after := publish(t, ctx, js2, "outage.x", len(before), 2)
	want := append(before, after...)
	if got := readAll(t, ctx, js2, "OUTAGE", len(want)); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read back after restart %q; want %q", got, want)
	}
}

func jetStream(t *testing.T, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatalf("connect to %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream: %v", err)
	}
	return js
}

func createStream(t *testing.T, ctx context.Context, js jetstream.JetStream, name string) {
	t.Helper()
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:     name,
		Subjects: []string{strings.ToLower(name) + ".>"},
		Storage:  jetstream.FileStorage,
	})
	if err != nil {
		t.Fatalf("create stream %s: %v", name, err)
	}
}

// publish publishes messages "msg <from>" to "msg <from+n-1>", each acknowledged.
func publish(t *testing.T, ctx context.Context, js jetstream.JetStream, subject string, from, n int) []string {
	t.Helper()
	var sent []string
	for i := from; i < from+n; i++ {
		data := fmt.Sprintf("msg %d", i)
		if _, err := js.Publish(ctx, subject, []byte(data)); err != nil {
			t.Fatalf("publish %q: %v", data, err)
		}
		sent = append(sent, data)
	}
	return sent
}

// readAll reads the first n messages of the stream.
func readAll(t *testing.T, ctx context.Context, js jetstream.JetStream, stream string, n int) []string {
	t.Helper()
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatalf("ordered consumer on %s: %v", stream, err)
	}
	batch, err := cons.Fetch(n, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	var got []string
	for msg := range batch.Messages() {
		got = append(got, string(msg.Data()))
	}
	if err := batch.Error(); err != nil {
		t.Fatalf("fetch: %v", err)
	}
	return got
}
