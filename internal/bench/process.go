package bench

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ProjectorConfig is how one projector process is started.
type ProjectorConfig struct {
	DatabaseURL string
	Stream      Stream
	Durable     string
	Batch       int           // --batch; 0 keeps the projector's default
	Linger      time.Duration // --linger
	Env         []string      // extra environment (KEY=VALUE)
	PGParams    string        // appended to DATABASE_URL's query: Postgres settings, e.g. plan_cache_mode=force_custom_plan
}

// Process is a running projector.
type Process struct {
	cmd     *exec.Cmd
	logPath string
	Started time.Time
	done    chan struct{}
	waitErr error
}

// StartProjector starts `projector run` as a child process, its log in the
// run's directory.
func (e *Env) StartProjector(cfg ProjectorConfig) (*Process, error) {
	args := []string{"run", "--http-addr", "127.0.0.1:0", "--log-format", "json"}
	if cfg.Batch > 0 {
		args = append(args, "--batch", strconv.Itoa(cfg.Batch))
	}
	if cfg.Linger > 0 {
		args = append(args, "--linger", cfg.Linger.String())
	}
	if cfg.Stream.Layout.Partitioned() {
		args = append(args, "--partitions", strconv.Itoa(cfg.Stream.Layout.N()))
	}
	f, err := os.CreateTemp(e.Dir, "projector-*.log")
	if err != nil {
		return nil, fmt.Errorf("start projector: %w", err)
	}
	cmd := exec.Command(e.Projector, args...)
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"DATABASE_URL=" + withParams(cfg.DatabaseURL, cfg.PGParams),
		"NATS_URL=" + e.NATSURL,
		"BUILDS_STREAM=" + cfg.Stream.Name,
		"BUILDS_SUBJECT_PREFIX=" + cfg.Stream.Prefix,
		"PROJECTOR_DURABLE=" + cfg.Durable,
	}, cfg.Env...)
	cmd.Stdout, cmd.Stderr = f, f
	p := &Process{cmd: cmd, logPath: f.Name(), done: make(chan struct{})}
	p.Started = time.Now()
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start projector: %w", err)
	}
	go func() { // owner: the Process; Stop waits for it
		p.waitErr = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

// withParams appends a query (k=v&k=v) to a postgres:// URL.
func withParams(url, params string) string {
	if params == "" {
		return url
	}
	if strings.Contains(url, "?") {
		return url + "&" + params
	}
	return url + "?" + params
}

// PID is the process id.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Exited reports whether the process has ended, and how.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.waitErr
	default:
		return false, nil
	}
}

// Usage is what a process used, read from /proc just before it was stopped.
type Usage struct {
	PeakRSS int64         // VmHWM, bytes
	RSS     int64         // VmRSS, bytes
	CPU     time.Duration // user + system time
}

// Stop reads the process's usage, sends SIGTERM and waits (up to 30 s, then
// SIGKILL). A non-zero exit is an error, with the log's tail.
func (p *Process) Stop() (Usage, error) {
	u, uerr := ProcUsage(p.PID())
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return u, fmt.Errorf("projector %d did not stop within 30 s of SIGTERM%s", p.PID(), p.logTail())
	}
	if p.waitErr != nil {
		return u, fmt.Errorf("projector %d: %w%s", p.PID(), p.waitErr, p.logTail())
	}
	if uerr != nil {
		return u, uerr
	}
	return u, nil
}

// Kill ends a process at once (clean-up after a failure).
func (p *Process) Kill() {
	if ok, _ := p.Exited(); !ok {
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// Metrics scrapes the projector's /metrics (its HTTP address is in its
// start-up log line) and returns the samples by name (a labelled metric's
// samples summed).
func (p *Process) Metrics() (map[string]float64, error) {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return nil, err
	}
	m := httpAddr.FindSubmatch(b)
	if m == nil {
		return nil, errors.New("metrics: no http address in the projector's log")
	}
	resp, err := http.Get("http://" + string(m[1]) + "/metrics")
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		name := line[:i]
		if j := strings.IndexByte(name, '{'); j >= 0 {
			name = name[:j] // labelled samples are summed
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[name] += v
		}
	}
	return out, sc.Err()
}

var httpAddr = regexp.MustCompile(`"http":"([^"]+)"`)

// Batches summarises the projector's batches from its metrics.
type Batches struct {
	Count        int
	MeanSeconds  float64 // mean apply time of a batch
	WriteRetries int
	Redone       int // batches folded again (buildstate_batch_redone_total)
}

// Batches reads the batch figures from the projector's metrics.
func (p *Process) Batches() (Batches, error) {
	m, err := p.Metrics()
	if err != nil {
		return Batches{}, err
	}
	return batchesOf(m), nil
}

// batchesOf reads Batches from a process's metrics.
func batchesOf(m map[string]float64) Batches {
	b := Batches{Count: int(m["buildstate_batch_seconds_count"]), WriteRetries: int(m["buildstate_write_retries_total"]),
		Redone: int(m["buildstate_batch_redone_total"])}
	if b.Count > 0 {
		b.MeanSeconds = m["buildstate_batch_seconds_sum"] / float64(b.Count)
	}
	return b
}

// LogTail is the end of the process's log.
func (p *Process) logTail() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return "\nlog " + filepath.Base(p.logPath) + ":\n" + strings.Join(lines[max(0, len(lines)-10):], "\n")
}

// WarnLines counts the log lines at warn level or above (write retries,
// dead letters, failed batches), but for the NATS connection's close at exit.
func (p *Process) WarnLines() (int, string) {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return 0, ""
	}
	n, first := 0, ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if strings.Contains(l, `"msg":"nats disconnected"`) && !strings.Contains(l, `"error"`) {
			continue // the connection's own close, at exit
		}
		if strings.Contains(l, `"level":"warn"`) || strings.Contains(l, `"level":"error"`) {
			if n == 0 {
				first = l
			}
			n++
		}
	}
	return n, first
}

// Assigned is the partitions the process's last "partitions assigned" log
// line gave it (nil in layout p1, or before any).
func (p *Process) Assigned() []int {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return nil
	}
	var last []int
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if !strings.Contains(sc.Text(), `"msg":"partitions assigned"`) {
			continue
		}
		var l struct {
			Partitions []int `json:"partitions"`
		}
		if json.Unmarshal(sc.Bytes(), &l) == nil {
			last = l.Partitions
		}
	}
	return last
}

// ProcUsage reads a process's memory (VmHWM, VmRSS) and CPU time from /proc.
func ProcUsage(pid int) (Usage, error) {
	var u Usage
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, fmt.Errorf("read usage: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch k {
		case "VmHWM":
			u.PeakRSS = kib(v)
		case "VmRSS":
			u.RSS = kib(v)
		}
	}
	cpu, err := procCPU(pid)
	if err != nil {
		return u, err
	}
	u.CPU = cpu
	return u, nil
}

func kib(v string) int64 {
	f := strings.Fields(v)
	if len(f) == 0 {
		return 0
	}
	n, _ := strconv.ParseInt(f[0], 10, 64)
	return n << 10
}

// clockTicks is USER_HZ, 100 on every Linux the bench runs on.
const clockTicks = 100

// procCPU is a process's utime + stime.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read cpu: %w", err)
	}
	// The command name may hold spaces: fields start after its ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("read cpu: malformed /proc stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("read cpu: short /proc stat")
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// MiB formats bytes in MiB.
func MiB(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
