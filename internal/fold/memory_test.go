package fold_test

import (
	"fmt"
	"slices"
	"testing"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fold"
)

// batchOf folds evs (from sequence first) on a partition primed by m, as the
// store does, and keeps it in m as if it committed; it returns the misses
// Prime reported and the outcomes.
func batchOf(t *testing.T, m *fold.Memory, first uint64, evs ...events.Event) ([]int, []fold.Outcome) {
	t.Helper()
	return foldOn(t, m, true, first, evs...)
}

// foldOn is batchOf, keeping the batch in m only if keep.
func foldOn(t *testing.T, m *fold.Memory, keep bool, first uint64, evs ...events.Event) ([]int, []fold.Outcome) {
	t.Helper()
	dec := make([]fold.Decoded, len(evs))
	var projects []string
	for i, ev := range evs {
		dec[i] = *msg(t, first+uint64(i), ev)
		if !slices.Contains(projects, ev.ProjectID) {
			projects = append(projects, ev.ProjectID)
		}
	}
	p := fold.NewPartition()
	misses := m.Prime(p, dec)
	var outs []fold.Outcome
	for i := range dec {
		out, _ := p.Add(&dec[i])
		outs = append(outs, out)
	}
	if keep {
		m.Keep(p, projects)
	}
	return misses, outs
}

func TestMemoryKnowsWhatItKept(t *testing.T) {
	m := fold.NewMemory(fold.Limits{Projects: 10, IDs: 10})
	m.InStore("p-old")
	q := events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{})
	if misses, outs := batchOf(t, m, 1, q, events.New(events.KindQueued, "p-old", "b-9", t0, events.Data{})); !slices.Equal(misses, []int{1}) || outs[0] != fold.Counted {
		t.Fatalf("first batch: misses %v, outcomes %v; want [1] (p-old is in the store), p-1's event counted", misses, outs)
	}
	// The repeat is known without the store; the claim of b-1 too.
	clash := events.New(events.KindStarted, "p-2", "b-1", t0, events.Data{})
	misses, outs := batchOf(t, m, 3, q, clash)
	if len(misses) != 0 || outs[0] != fold.Duplicate || outs[1] != fold.Refused {
		t.Errorf("second batch: misses %v, outcomes %v; want none, [duplicate refused]", misses, outs)
	}
	if m.Len() != 2 { // p-1, and p-old as that batch loaded it (nothing: the test loaded no store)
		t.Errorf("Len = %d; want 2", m.Len())
	}
}

func TestMemoryBounds(t *testing.T) {
	m := fold.NewMemory(fold.Limits{Projects: 3, IDs: 4})
	var first []events.Event
	for i := range 6 {
		ev := events.New(events.KindQueued, fmt.Sprintf("p-%d", i), fmt.Sprintf("b-%d", i), t0, events.Data{})
		first = append(first, ev)
		batchOf(t, m, uint64(i+1), ev)
		if m.Len() > 3 {
			t.Fatalf("after %d projects: Len = %d; want at most 3", i+1, m.Len())
		}
	}
	// Every project dropped is back "in the store": a batch naming it reads
	// it. The ids of the first two events are forgotten (only 4 are kept):
	// with nothing loaded from the store they count again, which is what
	// the store's insert of the id then refuses.
	misses, outs := 0, 0
	for i, ev := range first {
		ms, os := foldOn(t, m, false, uint64(100+i), ev)
		misses += len(ms)
		if os[0] == fold.Duplicate {
			outs++
		}
	}
	if misses != 3 {
		t.Errorf("projects read again = %d; want 3 (6 kept, 3 held)", misses)
	}
	if outs != 4 {
		t.Errorf("repeats known as duplicates = %d; want 4 (the ids remembered)", outs)
	}
}

func TestMemoryForgets(t *testing.T) {
	m := fold.NewMemory(fold.Limits{Projects: 10, IDs: 10})
	q := events.New(events.KindQueued, "p-1", "b-1", t0, events.Data{})
	batchOf(t, m, 1, q)
	m.Forget()
	if m.Len() != 0 {
		t.Fatalf("Len after Forget = %d; want 0", m.Len())
	}
	// p-1 is read from the store again, and its id is not known: the
	// store's digests decide whether it is a repeat.
	misses, outs := foldOn(t, m, false, 2, q)
	if !slices.Equal(misses, []int{0}) || outs[0] != fold.Counted {
		t.Errorf("after Forget: misses %v, outcomes %v; want [0] (p-1 is in the store), counted (nothing loaded)", misses, outs)
	}
}
