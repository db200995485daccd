package natsjs

import (
	"flag"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/buildstate/buildstate/internal/devenv"
	"github.com/buildstate/buildstate/internal/testenv"
)

const password = "pw-s3cret-natsjs"

// connectCase is a Client that must connect, or fail with an error
// containing fails.
type connectCase struct {
	name  string
	c     Client
	fails string
}

// checkConnect runs the cases against the server at url; a connection must
// also reach JetStream (the servers here are the real thing, JetStream on).
func checkConnect(t *testing.T, cases []connectCase) {
	t.Helper()
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			nc, err := Connect(tt.c, "test", nil)
			if tt.fails != "" {
				if err == nil {
					nc.Close()
					t.Fatalf("Connect(%s) = nil; want an error containing %q", tt.name, tt.fails)
				}
				if !strings.Contains(err.Error(), tt.fails) || strings.Contains(err.Error(), password) {
					t.Errorf("Connect(%s) = %q; want it to contain %q and no password", tt.name, err, tt.fails)
				}
				return
			}
			if err != nil {
				t.Fatalf("Connect(%s) = %v; want a connection", tt.name, err)
			}
			defer nc.Close()
			js, err := jetstream.New(nc)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := js.AccountInfo(t.Context()); err != nil {
				t.Errorf("JetStream account info over %s: %v", tt.name, err)
			}
		})
	}
}

func TestConnectMutualTLS(t *testing.T) {
	f := testenv.MakeTLS(t)
	tlsConfig, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: f.ServerCert, KeyFile: f.ServerKey, CaFile: f.CA, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	url, _ := testenv.NATSWith(t, func(o *server.Options) {
		o.TLS, o.TLSVerify, o.TLSConfig = true, true, tlsConfig
	})
	tlsURL := strings.Replace(url, "nats://", "tls://", 1)
	checkConnect(t, []connectCase{
		{"CA and client certificate", Client{URL: url, TLSCA: f.CA, TLSCert: f.ClientCert, TLSKey: f.ClientKey}, ""},
		{"tls:// URL", Client{URL: tlsURL, TLSCA: f.CA, TLSCert: f.ClientCert, TLSKey: f.ClientKey}, ""},
		{"no CA: the server's certificate is not trusted", Client{URL: url, TLSCert: f.ClientCert, TLSKey: f.ClientKey}, "certificate"},
		{"no client certificate", Client{URL: url, TLSCA: f.CA}, "nats: connect"},
		{"a certificate without its key", Client{URL: url, TLSCA: f.CA, TLSCert: f.ClientCert}, "needs both NATS_TLS_CERT"},
	})
}

func TestConnectUserPassword(t *testing.T) {
	url, _ := testenv.NATSWith(t, func(o *server.Options) { o.Username, o.Password = "bob", password })
	inURL := strings.Replace(url, "nats://", "nats://bob:"+password+"@", 1)
	checkConnect(t, []connectCase{
		{"flags", Client{URL: url, User: "bob", Password: password}, ""},
		{"user and password in the URL", Client{URL: inURL}, ""},
		{"wrong password", Client{URL: url, User: "bob", Password: password + "x"}, "Authorization Violation"},
		{"wrong password in the URL", Client{URL: strings.Replace(inURL, password, password+"x", 1)}, "Authorization Violation"},
		{"no credentials", Client{URL: url}, "Authorization Violation"},
		{"a password without a user", Client{URL: url, Password: password}, "without NATS_USER"},
		{"two ways at once", Client{URL: url, User: "bob", Password: password, Token: "t"}, "give one way to authenticate"},
	})
}

func TestConnectToken(t *testing.T) {
	url, _ := testenv.NATSWith(t, func(o *server.Options) { o.Authorization = password })
	checkConnect(t, []connectCase{
		{"token flag", Client{URL: url, Token: password}, ""},
		{"token in the URL", Client{URL: strings.Replace(url, "nats://", "nats://"+password+"@", 1)}, ""},
		{"wrong token in the URL", Client{URL: strings.Replace(url, "nats://", "nats://"+password+"x@", 1)}, "Authorization Violation"},
	})
}

func TestConnectNKey(t *testing.T) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	seedFile := filepath.Join(t.TempDir(), "user.nk")
	if err := os.WriteFile(seedFile, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	other, _ := nkeys.CreateUser()
	otherSeed, _ := other.Seed()
	otherFile := filepath.Join(t.TempDir(), "other.nk")
	if err := os.WriteFile(otherFile, otherSeed, 0o600); err != nil {
		t.Fatal(err)
	}
	url, _ := testenv.NATSWith(t, func(o *server.Options) { o.Nkeys = []*server.NkeyUser{{Nkey: pub}} })
	checkConnect(t, []connectCase{
		{"seed file", Client{URL: url, NKeySeedFile: seedFile}, ""},
		{"another user's seed", Client{URL: url, NKeySeedFile: otherFile}, "Authorization Violation"},
		{"no seed", Client{URL: url}, "Authorization Violation"},
		{"a missing seed file", Client{URL: url, NKeySeedFile: filepath.Join(t.TempDir(), "none")}, "nkey seed"},
	})
}

// The reconnect and disconnect logs name the server without the password
// of the URL.
func TestConnectLogsNoSecret(t *testing.T) {
	configure := func(o *server.Options) { o.Username, o.Password = "bob", password }
	srv, err := devenv.StartNATSWith(t.TempDir(), -1, configure)
	if err != nil {
		t.Fatal(err)
	}
	port := srv.Addr().(*net.TCPAddr).Port
	var logs testenv.SyncBuffer
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(&logs), zap.DebugLevel))
	nc, err := Connect(Client{URL: strings.Replace(srv.ClientURL(), "nats://", "nats://bob:"+password+"@", 1)}, "test", log)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	srv.Shutdown()
	srv.WaitForShutdown()
	next, err := devenv.StartNATSWith(t.TempDir(), port, configure)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { next.Shutdown(); next.WaitForShutdown() }()
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(logs.String(), "nats reconnected"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no reconnect logged within 20s; logs %q", logs.String())
		}
	}
	if !strings.Contains(logs.String(), "nats disconnected") || !strings.Contains(logs.String(), "nats://REDACTED@127.0.0.1") {
		t.Errorf("logs %q; want a disconnect line and the redacted URL", logs.String())
	}
	if strings.Contains(logs.String(), password) {
		t.Errorf("logs %q show the password", logs.String())
	}
}

func TestAddFlags(t *testing.T) {
	getenv := func(k string) string {
		return map[string]string{
			"NATS_URL": "nats://bob:" + password + "@n1:4222", "NATS_CREDS": "/c.creds", "NATS_NKEY_SEED": "/s.nk",
			"NATS_USER": "bob", "NATS_PASSWORD": password, "NATS_TOKEN": password,
			"NATS_TLS_CA": "/ca.pem", "NATS_TLS_CERT": "/c.pem", "NATS_TLS_KEY": "/k.pem",
		}[k]
	}
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	var c Client
	c.AddFlags(fs, getenv)
	var help strings.Builder
	fs.SetOutput(&help)
	fs.PrintDefaults()
	want := Client{URL: "nats://bob:" + password + "@n1:4222", CredsFile: "/c.creds", NKeySeedFile: "/s.nk", User: "bob",
		Password: password, Token: password, TLSCA: "/ca.pem", TLSCert: "/c.pem", TLSKey: "/k.pem"}
	if c != want {
		t.Errorf("AddFlags from the environment = %+v; want %+v", c, want)
	}
	if strings.Contains(help.String(), password) || !strings.Contains(help.String(), "nats://REDACTED@n1:4222") {
		t.Errorf("help text %q; want the defaults redacted", help.String())
	}
	if _, err := c.Options(); err == nil || !strings.Contains(err.Error(), "give one way") {
		t.Errorf("Options() with four ways to authenticate = %v; want a refusal", err)
	}
}
