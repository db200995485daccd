package replay_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/projection"
	"github.com/buildstate/buildstate/internal/testenv"
	"github.com/buildstate/buildstate/internal/workload"
)

// BenchmarkRebuild times `projector rebuild` (the real binary, in a process
// of its own, so that its peak RSS is its own) over a generated workload
// published to an embedded JetStream server. As baselines it times, in the
// same run, `projector rebuild --incremental` (the replay through the live
// path's Apply, a transaction per batch, as rebuild worked before it loaded
// in bulk; BENCH_INCREMENTAL=0 skips it) and the live path itself
// (`projector run` with its defaults into a fresh database, until its
// durable consumer has acknowledged everything; BENCH_LIVE=0 skips it).
// Size it with BENCH_PROJECTS (default 20000, about 200k events; 100000
// gives about 1M), the read batch with BENCH_BATCH (default 5000) and the
// number of bulk rebuilds, whose median it reports, with BENCH_RUNS
// (default 3):
//
//	BENCH_PROJECTS=100000 go test -run '^$' -bench Rebuild -benchtime 1x -timeout 60m ./internal/replay
//
// It prints events/s, peak RSS and CPU time of each run, and the ratios.
func BenchmarkRebuild(b *testing.B) {
	projects := envInt(b, "BENCH_PROJECTS", 20000)
	batch := envInt(b, "BENCH_BATCH", replayBatch)
	incremental := envInt(b, "BENCH_INCREMENTAL", 1) != 0
	runs := max(1, envInt(b, "BENCH_RUNS", 3))
	livePath := envInt(b, "BENCH_LIVE", 1) != 0
	ctx := context.Background()

	natsURL := benchNATS(b)
	nc, err := nats.Connect(natsURL)
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192))
	if err != nil {
		b.Fatal(err)
	}
	if _, err := natsjs.EnsureStream(ctx, js, "BUILDS", "builds", 1); err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	n := publishWorkload(b, js, projects)
	b.Logf("published %d events of %d projects in %s", n, projects, time.Since(t0).Round(time.Millisecond))
	runtime.GC()
	debug.FreeOSMemory()

	dbURL := testenv.Database(b)
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		b.Fatal(err)
	}
	if err := projection.Migrate(ctx, conn, projection.LiveSchema); err != nil {
		b.Fatal(err)
	}
	bin := filepath.Join(b.TempDir(), "projector")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/buildstate/buildstate/cmd/projector").CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	env := append(os.Environ(), "DATABASE_URL="+dbURL, "NATS_URL="+natsURL, "BUILDS_STREAM=BUILDS", "BUILDS_SUBJECT_PREFIX=builds")

	rebuild := func(batch int, extra ...string) (elapsed time.Duration, rss float64) {
		b.Helper()
		var stderr bytes.Buffer
		cmd := exec.Command(bin, append([]string{"rebuild", "--batch", strconv.Itoa(batch), "--log-level", "warn"}, extra...)...)
		cmd.Env, cmd.Stderr = env, &stderr
		start := time.Now()
		var outb bytes.Buffer
		cmd.Stdout = &outb
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		hwm := watchHWM(cmd.Process.Pid)
		err := cmd.Wait()
		elapsed = time.Since(start)
		rss = hwm()
		out := outb.Bytes()
		if err != nil {
			b.Fatalf("projector rebuild --batch %d: %v\n%s\n%s", batch, err, out, stderr.String())
		}
		ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
		cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		b.Logf("rebuild --batch %d %s: %s (projector CPU %s)\n%s", batch, strings.Join(extra, " "), strings.TrimSpace(string(out)),
			cpu.Round(time.Millisecond), lastLines(stderr.String(), 2))
		var rows int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM projector_applied`).Scan(&rows); err != nil {
			b.Fatal(err)
		}
		b.Logf("projector_applied rows after the swap: %d", rows)
		return elapsed, rss
	}

	for b.Loop() {
		// The machine is saturated during a rebuild (projector, Postgres and
		// the NATS server share its cores), and single runs vary by ±15%:
		// the figures are the median of BENCH_RUNS rebuilds, with the range.
		var times []time.Duration
		var rss float64
		for i := range runs {
			d, r := rebuild(batch)
			times = append(times, d)
			rss = max(rss, r)
			fmt.Printf("rebuild %d/%d of %d events, %d projects, batch %d: %.1f s, %.0f events/s, peak RSS %.0f MiB\n",
				i+1, runs, n, projects, batch, d.Seconds(), float64(n)/d.Seconds(), r)
		}
		slices.Sort(times)
		d := times[len(times)/2]
		rate := float64(n) / d.Seconds()
		b.ReportMetric(rate, "events/s")
		b.ReportMetric(rss, "peak-RSS-MiB")
		b.ReportMetric(d.Seconds(), "s/rebuild")
		fmt.Printf("rebuild of %d events, %d projects (%d cores): median of %d runs %.1f s (%.1f-%.1f s), %.0f events/s, highest peak RSS %.0f MiB\n",
			n, projects, runtime.NumCPU(), runs, d.Seconds(), times[0].Seconds(), times[len(times)-1].Seconds(), rate, rss)
		if incremental {
			bd, brss := rebuild(batch, "--incremental")
			fmt.Printf("baseline, rebuild --incremental: %.1f s, %.0f events/s, peak RSS %.0f MiB; the bulk rebuild is %.2fx faster\n",
				bd.Seconds(), float64(n)/bd.Seconds(), brss, bd.Seconds()/d.Seconds())
			b.ReportMetric(bd.Seconds()/d.Seconds(), "x-vs-incremental")
		}
		if livePath {
			ld, lrss := live(b, bin, natsURL, js, uint64(n))
			fmt.Printf("baseline, live path (projector run, defaults): %.1f s, %.0f events/s, peak RSS %.0f MiB; rebuild is %.2fx faster\n",
				ld.Seconds(), float64(n)/ld.Seconds(), lrss, ld.Seconds()/d.Seconds())
			b.ReportMetric(ld.Seconds()/d.Seconds(), "x-vs-live-path")
		}
	}
	conn.Close(ctx)
}

const replayBatch = 5000

// live runs `projector run` with its defaults over the stream into a fresh
// database until its durable consumer has acknowledged the last sequence.
func live(b *testing.B, bin, natsURL string, js jetstream.JetStream, last uint64) (time.Duration, float64) {
	b.Helper()
	ctx := context.Background()
	dbURL := testenv.Database(b)
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "run", "--http-addr", "", "--log-level", "warn")
	cmd.Env = append(os.Environ(), "DATABASE_URL="+dbURL, "NATS_URL="+natsURL, "BUILDS_STREAM=BUILDS",
		"BUILDS_SUBJECT_PREFIX=builds", "PROJECTOR_DURABLE=bench-live")
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	hwm := watchHWM(cmd.Process.Pid)
	for {
		time.Sleep(200 * time.Millisecond)
		c, err := js.Consumer(ctx, "BUILDS", "bench-live")
		if err != nil {
			continue
		}
		info, err := c.Info(ctx)
		if err == nil && info.NumPending == 0 && info.NumAckPending == 0 && info.AckFloor.Stream >= last {
			break
		}
		if time.Since(start) > time.Hour {
			b.Fatalf("live path not done after an hour\n%s", stderr.String())
		}
	}
	elapsed := time.Since(start)
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		b.Fatalf("projector run: %v\n%s", err, stderr.String())
	}
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	b.Logf("live path: %s, projector CPU %s", elapsed.Round(time.Millisecond),
		time.Duration(ru.Utime.Nano()+ru.Stime.Nano()).Round(time.Millisecond))
	return elapsed, hwm()
}

// watchHWM samples the process's peak RSS (VmHWM in /proc/PID/status, which
// starts afresh at exec) until it exits, and returns a func that gives the
// last value read, in MiB. The rusage of a child is no good here: Linux
// carries into ru_maxrss the RSS it had before exec, that is this test
// process's, which holds the whole generated workload.
func watchHWM(pid int) func() float64 {
	var mu sync.Mutex
	var kib int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			if err != nil {
				return
			}
			for _, l := range strings.Split(string(st), "\n") {
				if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
					var n int
					if _, err := fmt.Sscanf(v, "%d", &n); err == nil {
						mu.Lock()
						kib = max(kib, n)
						mu.Unlock()
					}
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return func() float64 {
		<-done // the process was reaped: its /proc entry is gone
		mu.Lock()
		defer mu.Unlock()
		return float64(kib) / 1024
	}
}

// benchNATS starts an embedded JetStream server for the benchmark. Unlike
// testenv.NATS it does not fsync every write (SyncAlways): publishing a
// million messages would take minutes, and reads are what is measured.
func benchNATS(b *testing.B) string {
	b.Helper()
	srv, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: b.TempDir(), NoLog: true, NoSigs: true,
	})
	if err != nil {
		b.Fatal(err)
	}
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		b.Fatal("nats not ready")
	}
	b.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	return srv.ClientURL()
}

// publishWorkload publishes a shuffled workload with 5% duplicates (a
// duplicate without Nats-Msg-Id, so that it reaches the log) and returns
// the number of messages stored.
func publishWorkload(b *testing.B, js jetstream.JetStream, projects int) int {
	b.Helper()
	evs := workload.Generate(1, workload.Config{
		Projects: projects, BuildsPerProject: 2, MaxBuildsPerProject: 3, DupRate: 0.05, Shuffle: true,
	})
	seen := make(map[string]bool, len(evs))
	for i, ev := range evs {
		body, err := ev.Marshal()
		if err != nil {
			b.Fatal(err)
		}
		m := &nats.Msg{Subject: events.Subject("builds", ev.ProjectID, ev.Kind()), Data: body, Header: nats.Header{}}
		if !seen[ev.ID] {
			m.Header.Set(jetstream.MsgIDHeader, ev.ID)
			seen[ev.ID] = true
		}
		for {
			_, err := js.PublishMsgAsync(m)
			if errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
				<-js.PublishAsyncComplete()
				continue
			}
			if err != nil {
				b.Fatalf("publish %d: %v", i, err)
			}
			break
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(5 * time.Minute):
		b.Fatal("publish acks did not all arrive")
	}
	s, err := js.Stream(context.Background(), "BUILDS")
	if err != nil {
		b.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	return int(info.State.Msgs)
}

func envInt(b *testing.B, key string, def int) int {
	if v := os.Getenv(key); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			b.Fatalf("%s=%q: %v", key, v, err)
		}
		return n
	}
	return def
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
