package devenv

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const (
	// pgDebianBinGlob is where Debian and Ubuntu install the server binaries
	// (they are not in PATH there).
	pgDebianBinGlob = "/usr/lib/postgresql/*/bin"
	// pgStartAttempts bounds the retries when the free port found is taken
	// by someone else before the server binds it.
	pgStartAttempts = 3
	pgStopTimeout   = 30 * time.Second
)

// cluster is a throwaway PostgreSQL cluster living in dir.
type cluster struct {
	dir    string // temporary directory: data/, the log, the Unix socket
	initdb string
	pgCtl  string
	runAs  string // user to run the binaries as when we are root; "" otherwise
	port   int
}

func (c *cluster) dataDir() string { return filepath.Join(c.dir, "data") }
func (c *cluster) logFile() string { return filepath.Join(c.dir, "postgres.log") }

// startThrowaway creates a cluster in a new temporary directory and starts it
// on a free port of 127.0.0.1, with trust authentication for user postgres
// and fsync off: it is fast and holds nothing worth keeping.
func startThrowaway(ctx context.Context, logf func(format string, args ...any)) (*Postgres, error) {
	// initdb refuses to run as root, and so does postgres.
	var runAs string
	if os.Geteuid() == 0 {
		var err error
		if runAs, err = unprivilegedUser(); err != nil {
			return nil, fmt.Errorf("start throwaway postgres as root: %w", err)
		}
	}
	return startThrowawayAs(ctx, logf, runAs)
}

// startThrowawayAs is startThrowaway running the binaries as the user runAs
// (through runuser, which needs root), or as ourselves when runAs is "".
func startThrowawayAs(ctx context.Context, logf func(format string, args ...any), runAs string) (_ *Postgres, err error) {
	initdb, pgCtl, err := findPGBinaries()
	if err != nil {
		return nil, fmt.Errorf("start throwaway postgres: %w", err)
	}
	c := &cluster{initdb: initdb, pgCtl: pgCtl, runAs: runAs}

	c.dir, err = os.MkdirTemp("", "devenv-pg-")
	if err != nil {
		return nil, fmt.Errorf("start throwaway postgres: %w", err)
	}
	defer func() {
		if err == nil {
			return
		}
		if c.port != 0 {
			// A start that failed or timed out may have left a server
			// running; it is fine for this to fail when there is none.
			stopCtx, cancel := context.WithTimeout(context.Background(), pgStopTimeout)
			_ = c.command(stopCtx, c.pgCtl, "stop", "-w", "-m", "immediate", "-D", c.dataDir()).Run()
			cancel()
		}
		_ = os.RemoveAll(c.dir)
	}()
	if c.runAs != "" {
		if err := chownTo(c.dir, c.runAs); err != nil {
			return nil, fmt.Errorf("start throwaway postgres: %w", err)
		}
	}

	logf("devenv: initdb %s (binaries %s, user %q)", c.dataDir(), filepath.Dir(c.initdb), c.runAs)
	// --locale=C: a LANG naming a locale that is not installed makes initdb
	// fail, and the tests want no locale anyway.
	if out, err := c.command(ctx, c.initdb, "-D", c.dataDir(), "-A", "trust", "-U", "postgres",
		"--no-sync", "-E", "UTF8", "--locale=C").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("start throwaway postgres: initdb: %w: %s", err, lastLines(string(out), 20))
	}

	for attempt := 1; ; attempt++ {
		if c.port, err = freePort(); err != nil {
			return nil, fmt.Errorf("start throwaway postgres: %w", err)
		}
		err = c.start(ctx)
		if err == nil {
			break
		}
		if attempt == pgStartAttempts || !c.portTaken() {
			return nil, fmt.Errorf("start throwaway postgres: %w", err)
		}
		logf("devenv: port %d was taken before postgres bound it; trying another", c.port)
	}

	pg := &Postgres{
		URL:     fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port),
		Source:  SourceThrowaway,
		cluster: c,
	}
	if err := ping(ctx, pg.URL, localPingTimeout); err != nil {
		return nil, fmt.Errorf("start throwaway postgres: %w", err)
	}
	logf("devenv: throwaway PostgreSQL at %s (dir %s)", pg.URL, c.dir)
	return pg, nil
}

// start runs pg_ctl start and waits until the server accepts connections.
func (c *cluster) start(ctx context.Context) error {
	// pg_ctl passes -o to postgres through /bin/sh: quote the path.
	// A fresh log per attempt, so that portTaken reads this attempt's.
	if err := os.Remove(c.logFile()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pg_ctl start: %w", err)
	}
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off", c.port, shellQuote(c.dir))
	// -l sends the server's output to a file: otherwise the server would
	// inherit our pipe and the command would not return until it stops.
	cmd := c.command(ctx, c.pgCtl, "start", "-w", "-t", "60", "-D", c.dataDir(), "-l", c.logFile(), "-o", opts)
	out, err := cmd.CombinedOutput()
	if err != nil {
		serverLog, _ := os.ReadFile(c.logFile())
		return fmt.Errorf("pg_ctl start on port %d: %w: %s; server log: %s",
			c.port, err, strings.TrimSpace(string(out)), lastLines(string(serverLog), 20))
	}
	return nil
}

// portTaken reports whether the last start failed because its port was in
// use.
func (c *cluster) portTaken() bool {
	serverLog, err := os.ReadFile(c.logFile())
	return err == nil && strings.Contains(string(serverLog), "Address already in use")
}

// stop stops the server immediately (no shutdown checkpoint: nothing is kept)
// and deletes the directory.
func (c *cluster) stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), pgStopTimeout)
	defer cancel()
	var stopErr error
	if out, err := c.command(ctx, c.pgCtl, "stop", "-w", "-m", "immediate", "-D", c.dataDir()).CombinedOutput(); err != nil {
		stopErr = fmt.Errorf("stop throwaway postgres: pg_ctl stop: %w: %s", err, strings.TrimSpace(string(out)))
	}
	if err := os.RemoveAll(c.dir); err != nil {
		return errors.Join(stopErr, fmt.Errorf("stop throwaway postgres: %w", err))
	}
	return stopErr
}

// command runs a PostgreSQL binary, as c.runAs when set.
func (c *cluster) command(ctx context.Context, bin string, args ...string) *exec.Cmd {
	var cmd *exec.Cmd
	if c.runAs == "" {
		cmd = exec.CommandContext(ctx, bin, args...)
	} else {
		cmd = exec.CommandContext(ctx, "runuser", append([]string{"-u", c.runAs, "--", bin}, args...)...)
	}
	// The unprivileged user may not be able to enter our working directory
	// (/root, say); postgres complains when it cannot.
	cmd.Dir = c.dir
	// Should a child keep our output pipe open, do not wait for it forever.
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// findPGBinaries returns initdb and pg_ctl from PATH, or else from the highest
// version under /usr/lib/postgresql.
func findPGBinaries() (initdb, pgCtl string, err error) {
	if initdb, err := exec.LookPath("initdb"); err == nil {
		// Take pg_ctl of the same installation: next to the real initdb,
		// which may be a symbolic link.
		if real, err := filepath.EvalSymlinks(initdb); err == nil {
			if pgCtl := filepath.Join(filepath.Dir(real), "pg_ctl"); isExecutable(pgCtl) {
				return initdb, pgCtl, nil
			}
		}
		if pgCtl, err := exec.LookPath("pg_ctl"); err == nil {
			return initdb, pgCtl, nil
		}
	}
	dirs, err := filepath.Glob(pgDebianBinGlob)
	if err != nil {
		return "", "", fmt.Errorf("glob %s: %w", pgDebianBinGlob, err)
	}
	var usable []string
	for _, dir := range dirs {
		if isExecutable(filepath.Join(dir, "initdb")) && isExecutable(filepath.Join(dir, "pg_ctl")) {
			usable = append(usable, dir)
		}
	}
	dir := highestVersionDir(usable)
	if dir == "" {
		return "", "", errNoBinaries
	}
	return filepath.Join(dir, "initdb"), filepath.Join(dir, "pg_ctl"), nil
}

// highestVersionDir picks, among dirs like /usr/lib/postgresql/<version>/bin,
// the one with the highest version, comparing numerically (16 > 9.6).
// It returns "" for no dirs.
func highestVersionDir(dirs []string) string {
	var best string
	var bestVersion []int
	for _, dir := range dirs {
		v := parseVersion(filepath.Base(filepath.Dir(dir)))
		if best == "" || compareVersions(v, bestVersion) > 0 {
			best, bestVersion = dir, v
		}
	}
	return best
}

// parseVersion parses "9.6" as [9 6]; parts that are not numbers count as 0.
func parseVersion(s string) []int {
	parts := strings.Split(s, ".")
	v := make([]int, len(parts))
	for i, p := range parts {
		v[i], _ = strconv.Atoi(p)
	}
	return v
}

func compareVersions(a, b []int) int {
	for i := 0; i < len(a) || i < len(b); i++ {
		var x, y int
		if i < len(a) {
			x = a[i]
		}
		if i < len(b) {
			y = b[i]
		}
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

// unprivilegedUser returns the user to run PostgreSQL as when we are root:
// postgres if it exists, else nobody. runuser must be installed.
func unprivilegedUser() (string, error) {
	if _, err := exec.LookPath("runuser"); err != nil {
		return "", fmt.Errorf("initdb cannot run as root and runuser (util-linux) is missing: %w", err)
	}
	for _, name := range []string{"postgres", "nobody"} {
		if _, err := user.Lookup(name); err == nil {
			return name, nil
		}
	}
	return "", errors.New("initdb cannot run as root and neither user postgres nor nobody exists")
}

// chownTo gives dir to the named user and its primary group.
func chownTo(dir, name string) error {
	u, err := user.Lookup(name)
	if err != nil {
		return fmt.Errorf("chown %s: %w", dir, err)
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return fmt.Errorf("chown %s: uid of %s: %w", dir, name, err)
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return fmt.Errorf("chown %s: gid of %s: %w", dir, name, err)
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		return fmt.Errorf("chown %s to %s: %w", dir, name, err)
	}
	return nil
}

// freePort returns a TCP port of 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	return port, nil
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// lastLines returns the last n lines of s, trimmed.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
