package events

import (
	"strings"
	"testing"
	"time"
)

func TestPlainNamesNoGoType(t *testing.T) {
	tests := []struct{ body, want string }{
		{`[1]`, "malformed_json: got a JSON array; want an object"},
		{`"x"`, "malformed_json: got a JSON string; want an object"},
		{`{"spec_version":1,"id":5}`, "malformed_json: field id: got a JSON number; want a string"},
		{`{"spec_version":"1"}`, "malformed_json: field spec_version: got a JSON string; want an integer"},
		{`{`, "malformed_json: invalid JSON: unexpected EOF after offset 1"},
	}
	for _, tt := range tests {
		_, err := Decode("", "", []byte(tt.body), time.Time{})
		if err == nil {
			t.Fatalf("Decode(%q) = nil error", tt.body)
		}
		if got := Plain(err); got != tt.want {
			t.Errorf("Plain(Decode(%q)) = %q; want %q", tt.body, got, tt.want)
		}
		if got := Plain(err); strings.Contains(got, "Go value") || strings.Contains(got, "json.RawMessage") {
			t.Errorf("Plain(Decode(%q)) = %q names a Go type", tt.body, got)
		}
	}
}
