package redact

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"strings"
	"testing"
)

func TestURL(t *testing.T) {
	tests := []struct{ in, want string }{
		{"nats://127.0.0.1:4222", "nats://127.0.0.1:4222"},
		{"nats://alice:s3cret@n1:4222", "nats://REDACTED@n1:4222"},
		{"nats://t0ken@n1:4222", "nats://REDACTED@n1:4222"},
		{"nats://a:p1@n1:4222,nats://a:p2@n2:4222", "nats://REDACTED@n1:4222,nats://REDACTED@n2:4222"},
		{"tls://a:p%40ss@n1:4222", "tls://REDACTED@n1:4222"},
		{"postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable", "postgres://REDACTED@127.0.0.1:5432/postgres?sslmode=disable"},
		{"postgres://u:pa@ss@db:5432/x", "postgres://REDACTED@db:5432/x"},
		{"postgres://db/x?user=u&password=s3cret&sslmode=verify-full", "postgres://db/x?user=u&password=REDACTED&sslmode=verify-full"},
		{"host=db user=u password=s3cret dbname=x", "host=db user=u password=REDACTED dbname=x"},
		{"host=db password = 'a b\\' c' dbname=x", "host=db password = REDACTED dbname=x"},
		{`connect nats://u:p@h:1: dial tcp: refused`, `connect nats://REDACTED@h:1: dial tcp: refused`},
		{"", ""},
	}
	for _, tt := range tests {
		if got := URL(tt.in); got != tt.want {
			t.Errorf("URL(%q) = %q; want %q", tt.in, got, tt.want)
		}
	}
}

func TestFlagsHideDefaults(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	var u, p, empty string
	URLVar(fs, &u, "url", "postgres://u:pgs3cret@db/x", "database")
	SecretVar(fs, &p, "password", "natss3cret", "password")
	SecretVar(fs, &empty, "token", "", "token")
	var help bytes.Buffer
	fs.SetOutput(&help)
	fs.PrintDefaults()
	for _, secret := range []string{"pgs3cret", "natss3cret"} {
		if strings.Contains(help.String(), secret) {
			t.Errorf("help %q shows the secret %q", help.String(), secret)
		}
	}
	if !strings.Contains(help.String(), "postgres://REDACTED@db/x") || !strings.Contains(help.String(), "(default REDACTED)") {
		t.Errorf("help %q; want the redacted defaults", help.String())
	}
	if u != "postgres://u:pgs3cret@db/x" || p != "natss3cret" {
		t.Errorf("values %q, %q; want the defaults as given", u, p)
	}
	if err := fs.Parse([]string{"-url", "nats://x:y@h", "-password", "other"}); err != nil || u != "nats://x:y@h" || p != "other" {
		t.Errorf("after Parse: %q, %q, %v; want the values given", u, p, err)
	}
}

func TestError(t *testing.T) {
	base := errors.New("dial nats://u:s3cret@h:1: refused")
	err := fmt.Errorf("connect: %w", Error(base))
	if strings.Contains(err.Error(), "s3cret") || !errors.Is(err, base) {
		t.Errorf("Error(%v) = %q, errors.Is %v; want redacted and still in the chain", base, err, errors.Is(err, base))
	}
	if Error(nil) != nil {
		t.Errorf("Error(nil) != nil")
	}
}
