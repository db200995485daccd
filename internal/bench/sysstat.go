package bench

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// CPUSample is the machine's CPU counters (/proc/stat, all CPUs).
type CPUSample struct {
	Busy, Total int64 // ticks
	At          time.Time
}

// SampleCPU reads /proc/stat.
func SampleCPU() (CPUSample, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return CPUSample{}, fmt.Errorf("read /proc/stat: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return CPUSample{}, fmt.Errorf("read /proc/stat: unexpected %q", line)
	}
	var s CPUSample
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		if i >= 8 { // guest time is already in user
			break
		}
		s.Total += n
		if i != 3 && i != 4 { // idle, iowait
			s.Busy += n
		}
	}
	s.At = time.Now()
	return s, nil
}

// MachineCPU is the busy share of all CPUs between two samples, in cores.
func MachineCPU(a, b CPUSample) float64 {
	if b.Total <= a.Total {
		return 0
	}
	cores := float64(b.Total-a.Total) / clockTicks / b.At.Sub(a.At).Seconds()
	return cores * float64(b.Busy-a.Busy) / float64(b.Total-a.Total)
}

// LoadAverage is the 1-minute load average.
func LoadAverage() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// BackendPIDs lists the server processes connected to the database of url
// (its own connection excluded).
func BackendPIDs(ctx context.Context, url string) ([]int, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("backends: %w", err)
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()`)
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return nil, fmt.Errorf("backends: %w", err)
	}
	out := make([]int, len(pids))
	for i, p := range pids {
		out[i] = int(p)
	}
	return out, nil
}

// CPUOf sums the CPU time of processes (those gone are skipped).
func CPUOf(pids []int) time.Duration {
	var d time.Duration
	for _, p := range pids {
		if c, err := procCPU(p); err == nil {
			d += c
		}
	}
	return d
}

// ServerCPU is the CPU time of every live process named postgres (the
// whole server: every database's backends and its background processes).
func ServerCPU() map[int]time.Duration {
	out := map[int]time.Duration{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil || strings.TrimSpace(string(comm)) != "postgres" {
			continue
		}
		if c, err := procCPU(pid); err == nil {
			out[pid] = c
		}
	}
	return out
}

// CPUDelta is the CPU time processes used between two ServerCPU samples
// (a process that ended in between is not counted).
func CPUDelta(a, b map[int]time.Duration) time.Duration {
	var d time.Duration
	for pid, t := range b {
		d += t - a[pid]
	}
	return d
}

// Activity counts what the backends serving one database were doing, from
// pg_stat_activity samples: "active" (running), "active/Lock:advisory"
// (waiting for a lock), "idle in transaction/Client:ClientRead" (waiting for
// the projector), and so on.
type Activity map[string]int

// Top lists the states by count, largest first, with their share of samples.
func (a Activity) Top() []string {
	total := 0
	keys := make([]string, 0, len(a))
	for k, n := range a {
		total += n
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(x, y string) int { return a[y] - a[x] })
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = fmt.Sprintf("%s %.0f%%", k, 100*float64(a[k])/float64(total))
	}
	return out
}

// SampleActivity samples, every interval until ctx is done, the state of
// the backends of the database of url (idle ones left out), and returns the
// counts when ctx is done.
func SampleActivity(ctx context.Context, url string, interval time.Duration) (<-chan Activity, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("activity: %w", err)
	}
	out := make(chan Activity, 1)
	go func() { // owner: the caller, who reads out
		defer conn.Close(context.Background())
		a := Activity{}
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				out <- a
				return
			case <-t.C:
			}
			rows, _ := conn.Query(ctx, `SELECT state || coalesce('/' || wait_event_type || ':' || wait_event, '')
				FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'`)
			var s string
			_, _ = pgx.ForEachRow(rows, []any{&s}, func() error { a[s]++; return nil })
		}
	}()
	return out, nil
}
