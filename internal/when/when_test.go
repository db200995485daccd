package when

import (
	"testing"
	"time"
)

func TestFormat(t *testing.T) {
	cet := time.FixedZone("CET", 3600)
	at := time.Date(2026, 11, 26, 20, 0, 5, 120_000_000, time.UTC)
	if got, want := Format(at, cet), "2026-11-26 21:00:05.120 CET"; got != want {
		t.Errorf("Format = %q; want %q", got, want)
	}
	if got, want := Format(at, time.UTC), "2026-11-26 20:00:05.120 UTC"; got != want {
		t.Errorf("Format = %q; want %q", got, want)
	}
}

func TestAgo(t *testing.T) {
	now := time.Date(2026, 11, 26, 20, 0, 0, 0, time.UTC)
	tests := []struct {
		d    time.Duration
		want string
	}{
		{0, "just now"},
		{42 * time.Second, "42 s ago"},
		{3*time.Minute + 10*time.Second, "3 min ago"},
		{5 * time.Hour, "5 h ago"},
		{72 * time.Hour, "3 days ago"},
		{-3 * time.Minute, "in 3 min"},
	}
	for _, tt := range tests {
		if got := Ago(now.Add(-tt.d), now); got != tt.want {
			t.Errorf("Ago(now-%v) = %q; want %q", tt.d, got, tt.want)
		}
	}
}
