package main

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildstate/buildstate/emitter"
	"github.com/buildstate/buildstate/internal/natsjs"
	"github.com/buildstate/buildstate/internal/testenv"
)

const (
	urlSecret   = "url-pw-6f1d"
	tokenSecret = "url-token-83ac"
	passSecret  = "env-pw-2b9e"
	hmacSecret  = "hmac-secret-0123456789-5c7a"
)

// No command prints a secret: not in help text, errors or logs, against a
// NATS that is not there.
func TestNoSecretInOutput(t *testing.T) {
	envs := map[string]func(string) string{
		"user and password in the URL": env("NATS_URL", "nats://bob:"+urlSecret+"@127.0.0.1:1", "EMITTER_HMAC_SECRETS", hmacSecret),
		"token in the URL, a cluster":  env("NATS_URL", "nats://"+tokenSecret+"@127.0.0.1:1,nats://"+tokenSecret+"@127.0.0.1:2", "EMITTER_HMAC_SECRETS", hmacSecret),
		"NATS_PASSWORD":                env("NATS_URL", "nats://127.0.0.1:1", "NATS_USER", "bob", "NATS_PASSWORD", passSecret, "EMITTER_HMAC_SECRETS", hmacSecret),
		"NATS_PASSWORD and NATS_TOKEN": env("NATS_URL", "nats://127.0.0.1:1", "NATS_USER", "bob", "NATS_PASSWORD", passSecret,
			"NATS_TOKEN", tokenSecret, "EMITTER_HMAC_SECRETS", hmacSecret),
	}
	commands := [][]string{
		{"publish", "--type", "queued", "--project", "p-1", "--build", "b-1"},
		{"publish", "-h"},
		{"serve", "--http-addr", "127.0.0.1:0"},
		{"serve", "-h"},
		{"load", "--projects", "1"},
		{"load", "-h"},
		{"publish", "--type", "queued", "--project", "p-1", "--build", "b-1", "--nats-password", passSecret, "--nats-user", "bob"},
	}
	for name, getenv := range envs {
		for _, args := range commands {
			t.Run(name+"/"+strings.Join(args, " "), func(t *testing.T) {
				stdout, stderr, err := runCmd(t, getenv, args...)
				out := stdout + stderr
				if err != nil {
					out += err.Error()
				}
				for _, s := range []string{urlSecret, tokenSecret, passSecret, hmacSecret} {
					if strings.Contains(out, s) {
						t.Errorf("emitter %s printed the secret %q:\n%s", strings.Join(args, " "), s, out)
					}
				}
				if !strings.HasSuffix(args[len(args)-1], "-h") && err == nil {
					t.Errorf("emitter %s against no server = nil; want an error", strings.Join(args, " "))
				}
			})
		}
	}
}

func TestServeNeedsASecret(t *testing.T) {
	secretsFile := filepath.Join(t.TempDir(), "secrets")
	os.WriteFile(secretsFile, []byte("# one per line\nshort\n"), 0o600)
	for _, tt := range []struct {
		name   string
		getenv func(string) string
		args   []string
		want   string
	}{
		{"none", env("NATS_URL", "nats://127.0.0.1:1"), nil, "no HMAC secret: set EMITTER_HMAC_SECRETS"},
		{"too short", env("NATS_URL", "nats://127.0.0.1:1", "EMITTER_HMAC_SECRETS", "abc"), nil, "want at least 16"},
		{"short in the file", env("NATS_URL", "nats://127.0.0.1:1"), []string{"--hmac-secrets-file", secretsFile}, "want at least 16"},
		{"missing file", env("NATS_URL", "nats://127.0.0.1:1"), []string{"--hmac-secrets-file", secretsFile + ".none"}, "--hmac-secrets-file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := runCmd(t, tt.getenv, append([]string{"serve", "--http-addr", "127.0.0.1:0"}, tt.args...)...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("serve %s = %v; want an error containing %q", tt.name, err, tt.want)
			}
		})
	}
}

func TestServeSecretsFileAndInsecure(t *testing.T) {
	url, js := startNATS(t)
	if _, err := natsjs.EnsureStream(context.Background(), js, "BUILDS", "builds", 1); err != nil {
		t.Fatal(err)
	}
	body := `{"spec_version":1,"id":"e-f","type":"build.queued","project_id":"p-1","build_id":"b-1","occurred_at":"` +
		time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano) + `"}`
	postTo := func(base string, sign bool) int {
		req, _ := http.NewRequest("POST", base+"/v1/events", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		if sign {
			req.Header.Set(emitter.SignatureHeader, emitter.Sign([]byte(serveSecret), time.Now(), []byte(body)))
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}

	secretsFile := filepath.Join(t.TempDir(), "secrets")
	os.WriteFile(secretsFile, []byte("# rotated 2026-12\n"+serveSecret+"\n"), 0o600)
	base, _ := startServe(t, env("NATS_URL", url), "--hmac-secrets-file", secretsFile)
	if got := postTo(base, true); got != http.StatusAccepted {
		t.Errorf("signed POST to serve --hmac-secrets-file = %d; want 202", got)
	}
	if got := postTo(base, false); got != http.StatusUnauthorized {
		t.Errorf("unsigned POST to serve --hmac-secrets-file = %d; want 401", got)
	}

	base, logs := startServe(t, env("NATS_URL", url), "--insecure-no-auth")
	if got := postTo(base, false); got != http.StatusAccepted {
		t.Errorf("unsigned POST to serve --insecure-no-auth = %d; want 202", got)
	}
	if !strings.Contains(logs.String(), `"level":"error"`) || !strings.Contains(logs.String(), "INSECURE") {
		t.Errorf("serve --insecure-no-auth logs %q; want an error-level INSECURE line", logs.String())
	}
}

// The NATS flags reach the connection: publish over mutual TLS with a user
// and password, from the environment, to a server that requires both.
func TestPublishOverMutualTLS(t *testing.T) {
	f := testenv.MakeTLS(t)
	tlsConfig, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: f.ServerCert, KeyFile: f.ServerKey, CaFile: f.CA, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	url, _ := testenv.NATSWith(t, func(o *server.Options) {
		o.TLS, o.TLSVerify, o.TLSConfig = true, true, tlsConfig
		o.Username, o.Password = "ci", passSecret
	})
	nc, err := natsjs.Connect(natsjs.Client{URL: url, User: "ci", Password: passSecret, TLSCA: f.CA, TLSCert: f.ClientCert, TLSKey: f.ClientKey}, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	if _, err := natsjs.EnsureStream(context.Background(), js, "BUILDS", "builds", 1); err != nil {
		t.Fatal(err)
	}
	vars := []string{"NATS_URL", url, "NATS_USER", "ci", "NATS_PASSWORD", passSecret,
		"NATS_TLS_CA", f.CA, "NATS_TLS_CERT", f.ClientCert, "NATS_TLS_KEY", f.ClientKey}
	publish := []string{"publish", "--type", "queued", "--project", "p-1", "--build", "b-1"}
	if stdout, stderr, err := runCmd(t, env(vars...), publish...); err != nil || stdout != "1\n" {
		t.Errorf("publish over mutual TLS = %q, %v (stderr %q); want seq 1", stdout, err, stderr)
	}
	// Without the client certificate the server refuses the connection.
	if _, _, err := runCmd(t, env(vars[:8]...), publish...); err == nil {
		t.Errorf("publish without a client certificate = nil; want a refused connection")
	}
}
