package fsm_test

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/buildstate/buildstate/internal/fsm"
)

var update = flag.Bool("update", false, "rewrite the mermaid block of docs/fsm.md from fsm.Mermaid()")

// fsmDoc is the page that shows the machine.
var fsmDoc = filepath.Join("..", "..", "docs", "fsm.md")

// mermaidBlock returns the offsets of the body of doc's ```mermaid block.
func mermaidBlock(t *testing.T, doc []byte) (start, end int) {
	t.Helper()
	open := []byte("```mermaid\n")
	i := bytes.Index(doc, open)
	if i < 0 {
		t.Fatalf("%s has no ```mermaid block", fsmDoc)
	}
	start = i + len(open)
	j := bytes.Index(doc[start:], []byte("```"))
	if j < 0 {
		t.Fatalf("%s: the ```mermaid block is not closed", fsmDoc)
	}
	return start, start + j
}

// TestMermaidDocIsCurrent keeps the diagram in docs/fsm.md equal to the one
// rendered from fsm.Transitions. After changing the table, run
//
//	go test ./internal/fsm -run TestMermaidDocIsCurrent -update
func TestMermaidDocIsCurrent(t *testing.T) {
	want, err := fsm.Mermaid()
	if err != nil {
		t.Fatalf("Mermaid() = %v", err)
	}
	doc, err := os.ReadFile(fsmDoc)
	if err != nil {
		t.Fatal(err)
	}
	start, end := mermaidBlock(t, doc)
	if got := string(doc[start:end]); got != want {
		if !*update {
			t.Fatalf("%s's mermaid block is stale; run go test ./internal/fsm -run TestMermaidDocIsCurrent -update\ngot:\n%s\nwant:\n%s",
				fsmDoc, got, want)
		}
		out := append(append(append([]byte(nil), doc[:start]...), want...), doc[end:]...)
		if err := os.WriteFile(fsmDoc, out, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("rewrote the mermaid block of %s", fsmDoc)
	}
}
