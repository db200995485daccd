package main

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/projector"
	"github.com/buildstate/buildstate/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// startServe runs `emitter serve` in-process with getenv and returns its
// base URL; it is stopped when the test ends.
func startServe(t *testing.T, getenv func(string) string, args ...string) (string, *testenv.SyncBuffer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var stdout, stderr testenv.SyncBuffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"emitter", "serve", "--http-addr", "127.0.0.1:0"}, args...), getenv, &stdout, &stderr)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve = %v; want nil after shutdown", err)
		}
	})
	return "http://" + waitForListening(t, &stderr, done), &stderr
}

// The seed's integration test in spirit: many services posting at once,
// signed, through `emitter serve`; every post is accepted and the projector
// (running against a real Postgres and JetStream) shows every project.
func TestConcurrentSignedPostsAreProjected(t *testing.T) {
	natsURL, _ := testenv.JetStream(t)
	dbURL := testenv.Database(t)
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	projected := make(chan error, 1)
	go func() {
		projected <- projector.Run(ctx, projector.Config{DatabaseURL: dbURL, NATS: natsjs.Client{URL: natsURL},
			Ready: func(string) { ready <- "" }})
	}()
	defer func() {
		cancel()
		if err := <-projected; err != nil {
			t.Errorf("projector = %v", err)
		}
	}()
	select {
	case <-ready:
	case err := <-projected:
		t.Fatalf("projector stopped before consuming: %v", err)
	}
	base, _ := startServe(t, env("NATS_URL", natsURL, "EMITTER_HMAC_SECRETS", serveSecret))

	const services = 24
	client := emitter.NewHTTPClient(base, serveSecret, emitter.HTTPOptions{})
	at := time.Now().Add(-time.Minute)
	start := make(chan struct{})
	errs := make(chan error, 3*services)
	var wg sync.WaitGroup
	for i := range services {
		project, build := fmt.Sprintf("p-%d", i), fmt.Sprintf("b-%d", i)
		dur := int64(1000 + i)
		for _, post := range []func() (uint64, error){
			func() (uint64, error) { return client.Queued(ctx, project, build, at) },
			func() (uint64, error) { return client.Started(ctx, project, build, at.Add(time.Second), "astro") },
			func() (uint64, error) {
				return client.Completed(ctx, project, build, at.Add(2*time.Second), emitter.Completion{Outcome: "succeeded", DurationMS: &dur})
			},
		} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start // all at once
				if _, err := post(); err != nil {
					errs <- fmt.Errorf("%s: %w", project, err)
				}
			}()
		}
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("signed post refused: %v", err)
	}

	pool, err := projector.OpenPool(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	store := projection.New(pool, projection.Options{})
	deadline := time.Now().Add(30 * time.Second)
	for i := range services {
		id := fmt.Sprintf("p-%d", i)
		for {
			row, err := store.Project(ctx, id)
			// deployed: the succeeded completion was applied (docs/contract.md).
			if err == nil && row.BuildStatus == "deployed" && row.LastBuildCompleted != nil && row.LastBuildCompleted.Equal(at.Add(2*time.Second).UTC().Truncate(time.Microsecond)) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("project %s = %+v, %v; want deployed, completed at %s", id, row, err, at.Add(2*time.Second))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}
