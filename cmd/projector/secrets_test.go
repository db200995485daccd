package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/buildstate/buildstate/internal/testenv"
)

const (
	pgSecret   = "pg-pw-91c4"
	natsSecret = "nats-pw-7e02"
	tokSecret  = "nats-token-d35f"
)

// No command prints a secret of DATABASE_URL or NATS_URL: not in help text
// (flag defaults), errors or logs, against servers that are not there, and
// with a real Postgres but no NATS (so the NATS connect fails and says so).
func TestNoSecretInOutput(t *testing.T) {
	unreachable := map[string]string{
		"DATABASE_URL": "postgres://alice:" + pgSecret + "@127.0.0.1:1/builds?sslmode=disable&connect_timeout=2",
		"NATS_URL":     "nats://bob:" + natsSecret + "@127.0.0.1:1",
		"NATS_USER":    "carol", "NATS_PASSWORD": natsSecret + "-env",
		"PROJECTOR_HTTP_ADDR": "127.0.0.1:0",
	}
	realDB := map[string]string{
		"DATABASE_URL":        testenv.Database(t),
		"NATS_URL":            "nats://" + tokSecret + "@127.0.0.1:1",
		"PROJECTOR_HTTP_ADDR": "127.0.0.1:0",
	}
	dsn := map[string]string{
		"DATABASE_URL": "host=127.0.0.1 port=1 user=alice password=" + pgSecret + " dbname=builds connect_timeout=2",
		"NATS_URL":     "nats://127.0.0.1:1", "NATS_TOKEN": tokSecret,
	}
	commands := [][]string{
		{"run"}, {"run", "--help"}, {"migrate"}, {"migrate", "-h"}, {"status", "p-1"}, {"status", "p-1", "--seq", "1"},
		{"dead-letters"}, {"rebuild"}, {"verify"}, {"rebuild", "-h"},
		{"run", "--database-url", "postgres://alice:" + pgSecret + "@127.0.0.1:1/x?connect_timeout=2", "--nats-password", natsSecret},
	}
	for name, vars := range map[string]map[string]string{"unreachable": unreachable, "real Postgres, no NATS": realDB, "keyword DSN": dsn} {
		getenv := func(k string) string { return vars[k] }
		for _, args := range commands {
			t.Run(name+"/"+strings.Join(args, " "), func(t *testing.T) {
				var stdout, stderr bytes.Buffer
				err := run(context.Background(), append([]string{"projector"}, args...), getenv, &stdout, &stderr)
				out := stdout.String() + stderr.String()
				if err != nil {
					out += err.Error()
				}
				for _, s := range []string{pgSecret, natsSecret, tokSecret} {
					if strings.Contains(out, s) {
						t.Errorf("projector %s printed the secret %q:\n%s", strings.Join(args, " "), s, out)
					}
				}
				help := strings.HasPrefix(args[len(args)-1], "-h") || args[len(args)-1] == "--help"
				needsNATS := args[0] != "migrate" && args[0] != "dead-letters"
				if !help && err == nil && (name != "real Postgres, no NATS" || needsNATS) {
					t.Errorf("projector %s against no server = nil; want an error", strings.Join(args, " "))
				}
				if help && name == "unreachable" && args[0] == "run" && !strings.Contains(out, "postgres://REDACTED@127.0.0.1:1/builds") {
					t.Errorf("projector run --help:\n%s\nwant the DATABASE_URL default shown redacted", out)
				}
			})
		}
	}
}
