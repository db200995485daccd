package testenv

import (
	"context"
	"os/exec"
	"testing"

	"github.com/chromedp/chromedp"
)

// BrowserPaths are the names a headless Chromium is looked up by, in order:
// Debian's chromium package installs /usr/bin/chromium.
var BrowserPaths = []string{"chromium", "chromium-browser", "google-chrome"}

// Browser starts a headless Chromium with a fresh profile for the test
// (stopped when it ends) and returns a chromedp context of a tab in it. A
// machine without Chromium fails the test, saying what to install: it never
// skips (CI installs it, see .ci/run).
func Browser(t testing.TB) context.Context {
	t.Helper()
	path := ""
	for _, name := range BrowserPaths {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		t.Fatalf("testenv: no Chromium found (looked for %v on PATH); install it: apt-get install chromium", BrowserPaths)
	}
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(path),
		chromedp.Headless,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 800),
		// No sandbox: tests may run as root, where Chromium's sandbox refuses to start.
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		// The test machines have no network beyond loopback: no calls home.
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	t.Cleanup(func() { cancel(); cancelAlloc() })
	if err := chromedp.Do(ctx); err != nil { // starts the browser, bound to ctx
		t.Fatalf("testenv: start %s: %v", path, err)
	}
	return ctx
}
