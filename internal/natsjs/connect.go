package natsjs

import (
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/buildstate/buildstate/internal/redact"
)

// DefaultURL is the NATS server of a single-box set-up.
const DefaultURL = "nats://127.0.0.1:4222"

// Client says how to reach NATS and how to prove who we are: at most one
// way of authenticating (a credentials file, an nkey seed file, a user and
// password, or a token; a user and password in URL work too), and TLS with a
// private CA and, for mutual TLS, a client certificate.
type Client struct {
	URL          string
	CredsFile    string // NATS credentials file (user JWT and nkey seed)
	NKeySeedFile string // file holding a user nkey seed ("SU...")
	User         string
	Password     string
	Token        string
	TLSCA        string // PEM file of the CAs that sign the server's certificate
	TLSCert      string // PEM client certificate, for mutual TLS (with TLSKey)
	TLSKey       string
}

// AddFlags defines the connection flags, each defaulting from its
// environment variable. Secrets in their defaults never show in help text.
func (c *Client) AddFlags(fs *flag.FlagSet, getenv func(string) string) {
	env := func(k, def string) string {
		if v := getenv(k); v != "" {
			return v
		}
		return def
	}
	redact.URLVar(fs, &c.URL, "nats-url", env("NATS_URL", DefaultURL),
		"NATS server `URL`, or a comma-separated list of a cluster's (env NATS_URL)")
	fs.StringVar(&c.CredsFile, "nats-creds", getenv("NATS_CREDS"), "NATS credentials file (env NATS_CREDS)")
	fs.StringVar(&c.NKeySeedFile, "nats-nkey-seed", getenv("NATS_NKEY_SEED"), "file holding a NATS user nkey seed (env NATS_NKEY_SEED)")
	fs.StringVar(&c.User, "nats-user", getenv("NATS_USER"), "NATS user, with --nats-password (env NATS_USER)")
	redact.SecretVar(fs, &c.Password, "nats-password", getenv("NATS_PASSWORD"), "NATS `password` (env NATS_PASSWORD; prefer the environment to the flag)")
	redact.SecretVar(fs, &c.Token, "nats-token", getenv("NATS_TOKEN"), "NATS `token` (env NATS_TOKEN; prefer the environment to the flag)")
	fs.StringVar(&c.TLSCA, "nats-tls-ca", getenv("NATS_TLS_CA"), "PEM file of the CAs that sign the NATS server's certificate (env NATS_TLS_CA)")
	fs.StringVar(&c.TLSCert, "nats-tls-cert", getenv("NATS_TLS_CERT"), "PEM client certificate for mutual TLS, with --nats-tls-key (env NATS_TLS_CERT)")
	fs.StringVar(&c.TLSKey, "nats-tls-key", getenv("NATS_TLS_KEY"), "PEM key of --nats-tls-cert (env NATS_TLS_KEY)")
}

// Options are the nats.go options that carry c's authentication and TLS.
func (c Client) Options() ([]nats.Option, error) {
	var ways []string
	for _, w := range []struct{ env, v string }{
		{"NATS_CREDS", c.CredsFile}, {"NATS_NKEY_SEED", c.NKeySeedFile}, {"NATS_USER", c.User}, {"NATS_TOKEN", c.Token},
	} {
		if w.v != "" {
			ways = append(ways, w.env)
		}
	}
	if len(ways) > 1 {
		return nil, fmt.Errorf("nats: give one way to authenticate, not %s", strings.Join(ways, " and "))
	}
	if c.Password != "" && c.User == "" {
		return nil, errors.New("nats: NATS_PASSWORD (--nats-password) is set without NATS_USER (--nats-user)")
	}
	var opts []nats.Option
	switch {
	case c.CredsFile != "":
		opts = append(opts, nats.UserCredentials(c.CredsFile))
	case c.NKeySeedFile != "":
		o, err := nats.NkeyOptionFromSeed(c.NKeySeedFile)
		if err != nil {
			return nil, fmt.Errorf("nats: nkey seed %s: %w", c.NKeySeedFile, err)
		}
		opts = append(opts, o)
	case c.User != "":
		opts = append(opts, nats.UserInfo(c.User, c.Password))
	case c.Token != "":
		opts = append(opts, nats.Token(c.Token))
	}
	if c.TLSCA != "" {
		opts = append(opts, nats.RootCAs(c.TLSCA))
	}
	switch {
	case c.TLSCert != "" && c.TLSKey != "":
		opts = append(opts, nats.ClientCert(c.TLSCert, c.TLSKey))
	case c.TLSCert != "" || c.TLSKey != "":
		return nil, errors.New("nats: mutual TLS needs both NATS_TLS_CERT (--nats-tls-cert) and NATS_TLS_KEY (--nats-tls-key)")
	}
	return opts, nil
}

// Connect connects to NATS as c says, named name, with endless reconnects
// (an outage is waited out) logged to log, and refuses a server older than
// MinServerVersion (CheckServer): every command connects here, so none can
// forget the check. A reconnect to an older server (a cluster's member) is
// logged as an error. Neither its errors nor its logs hold a secret: every
// URL in them is redacted.
func Connect(c Client, name string, log *zap.Logger) (*nats.Conn, error) {
	if log == nil {
		log = zap.NewNop()
	}
	auth, err := c.Options()
	if err != nil {
		return nil, err
	}
	opts := append([]nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil { // nil: our own Close
				log.Warn("nats disconnected", zap.Error(redact.Error(err)))
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("nats reconnected", zap.String("url", redact.URL(nc.ConnectedUrl())))
			if err := CheckServer(nc); err != nil {
				log.Error("nats reconnected to an unsupported server", zap.Error(err))
			}
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Warn("nats async error", zap.String("subscription", subject), zap.Error(redact.Error(err)))
		}),
	}, auth...)
	nc, err := nats.Connect(c.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("nats: connect %s: %w", redact.URL(c.URL), redact.Error(err))
	}
	if err := CheckServer(nc); err != nil {
		nc.Close()
		return nil, fmt.Errorf("nats: %w", err)
	}
	return nc, nil
}

// ConnectJetStream is Connect and the JetStream context on the connection
// (with opts): what every command that publishes or consumes needs. Close
// the connection when done.
func ConnectJetStream(c Client, name string, log *zap.Logger, opts ...jetstream.JetStreamOpt) (*nats.Conn, jetstream.JetStream, error) {
	nc, err := Connect(c, name, log)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc, opts...)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	return nc, js, nil
}
