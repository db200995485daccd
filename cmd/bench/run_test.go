package main

import (
	"bytes"
	"context"
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestRunRaw runs `bench raw` at a tiny size: both modes, each run printed
// with a rate, and the medians.
func TestRunRaw(t *testing.T) {
	var out, errOut bytes.Buffer
	err := run(context.Background(), []string{"bench", "raw", "--events", "600", "--projects", "50", "--raw-runs", "2", "--max-load", "0"},
		os.Getenv, &out, &errOut)
	if err != nil {
		t.Fatalf("bench raw: %v\n%s", err, errOut.String())
	}
	got := out.String()
	for _, re := range []string{
		`module: .* at [0-9a-f]+`,
		`raw ack each \(run 1, acks every message\): 600 msgs in [0-9.]+ s: [0-9]+ msgs/s`,
		`raw ack all  \(run 2, acks every 1000th and the last\): 600 msgs in [0-9.]+ s: [0-9]+ msgs/s`,
		`raw medians: ack each [0-9]+ msgs/s, ack all [0-9]+ msgs/s`,
	} {
		if !regexp.MustCompile(re).MatchString(got) {
			t.Errorf("bench raw printed\n%s\nwant a line matching %q", got, re)
		}
	}
	if strings.Contains(got, "projector: built") {
		t.Errorf("bench raw built the projector:\n%s", got)
	}
}

func TestRunRawRunsFlag(t *testing.T) {
	var out, errOut bytes.Buffer
	err := run(context.Background(), []string{"bench", "raw", "--raw-runs", "-1"}, os.Getenv, &out, &errOut)
	if err == nil || !strings.Contains(err.Error(), "--raw-runs -1") {
		t.Errorf("bench raw --raw-runs -1 = %v; want an error naming the flag", err)
	}
}
