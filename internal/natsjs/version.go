package natsjs

import (
	"errors"
	"fmt"

	"github.com/Masterminds/semver/v3"
	"github.com/nats-io/nats.go"

	"github.com/buildstate/buildstate/internal/redact"
)

// MinServerVersion is the oldest nats-server buildstate runs against. The
// partitioned projector (docs/engine.md §2) needs priority groups with the
// pinned_client policy, PinnedTTL and the unpin API, and KV limit markers
// (a member's expiry seen by watchers): all new in 2.11. Stream subject
// transforms and multi-filter consumers came in 2.10; 2.9 is end of life.
const MinServerVersion = "2.11.0"

// whyMinServer is what the refusal says the minimum is for.
const whyMinServer = "partitioned projectors use priority groups with pinned_client and KV limit markers, new in 2.11"

// ErrServerTooOld is a NATS server older than MinServerVersion.
var ErrServerTooOld = errors.New("too old")

var minServer = semver.MustParse(MinServerVersion)

// CheckServer refuses the server nc is connected to when it is older than
// MinServerVersion (or does not say a version that parses). Its errors name
// the server's version and its URL, redacted.
func CheckServer(nc *nats.Conn) error {
	url := redact.URL(nc.ConnectedUrl())
	return checkVersion(nc.ConnectedServerVersion(), url)
}

// checkVersion is CheckServer's rule on a version string.
func checkVersion(version, url string) error {
	if url == "" {
		url = "(not connected)"
	}
	v, err := semver.NewVersion(version)
	if err != nil {
		return fmt.Errorf("nats-server at %s reports version %q, which does not parse (%v): buildstate needs %s or later (%s)",
			url, version, err, MinServerVersion, whyMinServer)
	}
	// A pre-release of the minimum (2.11.0-RC.1) is older than it.
	if v.LessThan(minServer) {
		return fmt.Errorf("nats-server %s at %s is %w: buildstate needs %s or later (%s); upgrade the server (in a cluster, every server)",
			version, url, ErrServerTooOld, MinServerVersion, whyMinServer)
	}
	return nil
}
