package natsjs

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/Masterminds/semver/v3"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/buildstate/buildstate/internal/testenv"
)

func TestCheckVersion(t *testing.T) {
	const url = "nats://127.0.0.1:4222"
	for _, tt := range []struct {
		version string
		ok      bool
		tooOld  bool // refused as older (ErrServerTooOld), not as unparseable
	}{
		{"2.9.10", false, true},
		{"2.9.25", false, true},
		{"2.10.0", false, true},
		{"2.10.29", false, true},
		{"2.11.0-RC.1", false, true}, // a pre-release of the minimum is older than it
		{"2.11.0-beta", false, true},
		{"1.4.1", false, true},
		{"2.11.0", true, false},
		{"v2.11.0", true, false},
		{"2.11", true, false},
		{"2.11.6", true, false},
		{"2.12.0-dev", true, false}, // a server built from main after 2.11
		{"2.15.3", true, false},
		{"3.0.0", true, false},
		{"", false, false},
		{"nats", false, false},
		{"2.x.1", false, false},
	} {
		err := checkVersion(tt.version, url)
		if tt.ok {
			if err != nil {
				t.Errorf("checkVersion(%q) = %v; want nil", tt.version, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("checkVersion(%q) = nil; want a refusal", tt.version)
			continue
		}
		if errors.Is(err, ErrServerTooOld) != tt.tooOld {
			t.Errorf("checkVersion(%q) = %v; errors.Is(ErrServerTooOld) = %v, want %v", tt.version, err, !tt.tooOld, tt.tooOld)
		}
		for _, want := range []string{url, MinServerVersion, "pinned_client", "KV limit markers"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("checkVersion(%q) = %q; want it to name %q", tt.version, err, want)
			}
		}
		if tt.version != "" && !strings.Contains(err.Error(), tt.version) {
			t.Errorf("checkVersion(%q) = %q; want it to name the server's version", tt.version, err)
		}
	}
}

// debianServer is the binary of Debian's nats-server package (2.9.x).
const debianServer = "/usr/sbin/nats-server"

// startOldServer runs Debian's nats-server (older than MinServerVersion) on
// a free port with JetStream and a store of its own, requiring user bob with
// password, and returns its client URL. Cleanup stops it.
func startOldServer(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(debianServer); err != nil {
		t.Fatalf("%s: %v: this test needs an older nats-server: install Debian's package (apt-get install nats-server; .ci/run does it)", debianServer, err)
	}
	out, err := exec.Command(debianServer, "--version").Output()
	if err != nil {
		t.Fatalf("%s --version: %v", debianServer, err)
	}
	version := strings.TrimPrefix(strings.TrimSpace(strings.TrimPrefix(string(out), "nats-server:")), "v")
	if v, err := semver.NewVersion(version); err != nil || !v.LessThan(semver.MustParse(MinServerVersion)) {
		t.Fatalf("%s is version %q (%v); this test needs one older than %s", debianServer, version, err, MinServerVersion)
	}
	dir := t.TempDir()
	cmd := exec.Command(debianServer, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", filepath.Join(dir, "js"),
		"--ports_file_dir", dir, "--user", "bob", "--pass", password, "-l", filepath.Join(dir, "log"))
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", debianServer, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }() // owner: this cleanup, which waits for it
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	// The server writes its ports file once it listens.
	ports := filepath.Join(dir, filepath.Base(debianServer)+"_"+strconv.Itoa(cmd.Process.Pid)+".ports")
	deadline := time.Now().Add(15 * time.Second)
	for {
		b, err := os.ReadFile(ports)
		var p struct{ Nats []string }
		if err == nil && json.Unmarshal(b, &p) == nil && len(p.Nats) > 0 {
			return p.Nats[0]
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "log"))
			t.Fatalf("%s did not write its ports file in 15 s; its log:\n%s", debianServer, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestConnectRefusesOldServer: Connect (which every command uses) refuses
// a real 2.9 server, naming its version, its URL without the password, and
// the minimum.
func TestConnectRefusesOldServer(t *testing.T) {
	url := startOldServer(t)
	withAuth := strings.Replace(url, "nats://", "nats://bob:"+password+"@", 1)
	nc, err := Connect(Client{URL: withAuth}, "test", nil)
	if err == nil {
		v := nc.ConnectedServerVersion()
		nc.Close()
		t.Fatalf("Connect to nats-server %s = a connection; want a refusal", v)
	}
	t.Logf("refused: %v", err)
	if !errors.Is(err, ErrServerTooOld) {
		t.Errorf("Connect = %v; want ErrServerTooOld", err)
	}
	host := strings.TrimPrefix(url, "nats://")
	for _, want := range []string{"nats-server 2.9.", host, "REDACTED", MinServerVersion, "pinned_client"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Connect = %q; want it to contain %q", err, want)
		}
	}
	if strings.Contains(err.Error(), password) {
		t.Errorf("Connect = %q; it shows the password", err)
	}
	// The same server with the check left out: it is reachable, so the
	// refusal above is the version's, not a failed connection.
	raw, err := nats.Connect(withAuth)
	if err != nil {
		t.Fatalf("nats.Connect to the old server: %v", err)
	}
	defer raw.Close()
	if err := CheckServer(raw); !errors.Is(err, ErrServerTooOld) {
		t.Errorf("CheckServer(nats-server %s) = %v; want ErrServerTooOld", raw.ConnectedServerVersion(), err)
	}
}

// TestConnectCurrentServer: the embedded server the tests use passes.
func TestConnectCurrentServer(t *testing.T) {
	url, _ := testenv.NATSWith(t, func(*server.Options) {})
	nc, err := Connect(Client{URL: url}, "test", nil)
	if err != nil {
		t.Fatalf("Connect to the embedded server: %v", err)
	}
	defer nc.Close()
	if err := CheckServer(nc); err != nil {
		t.Errorf("CheckServer(nats-server %s) = %v; want nil", nc.ConnectedServerVersion(), err)
	}
}
