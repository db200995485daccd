package events

import (
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"
)

// Layout is how the log stores what publishers send (docs/engine.md §1–§2):
// with one partition (p1) a message is stored on the subject it was published
// on, <prefix>.<project_id>.<kind>; with n > 1 the stream's subject
// transform stores it as p<n>.<k>.<prefix>.<project_id>.<kind>, where k is
// Partition(project_id, n), so that a consumer can select a partition by
// subject. Publishers never see the stored form.
type Layout struct {
	Partitions int // 1 (or 0): no transform
}

// MaxPartitions bounds a layout's partition count: each partition is a
// durable consumer on the server and a writer in a projector.
const MaxPartitions = 256

// LayoutOf is the layout with n partitions; it refuses n outside
// 1..MaxPartitions.
func LayoutOf(n int) (Layout, error) {
	if n < 1 || n > MaxPartitions {
		return Layout{}, fmt.Errorf("partitions: %d is not between 1 and %d", n, MaxPartitions)
	}
	return Layout{Partitions: n}, nil
}

// N is the layout's partition count (at least 1).
func (l Layout) N() int { return max(l.Partitions, 1) }

// Name names the layout: "p16" (the first token of its stored subjects, and
// projector_partitions.layout).
func (l Layout) Name() string { return "p" + strconv.Itoa(l.N()) }

// Partitioned says whether the stream transforms subjects.
func (l Layout) Partitioned() bool { return l.N() > 1 }

// Partition is the partition of project among n: FNV-1a 32 of the project
// id, modulo n, which is what nats-server's partition(n, 1) computes for the
// subject's project token (getHashPartition in server/subject_transform.go;
// checked against a server in the tests).
func Partition(projectID string, n int) int {
	if n <= 1 {
		return 0
	}
	h := fnv.New32a()
	_, _ = h.Write([]byte(projectID))
	return int(h.Sum32() % uint32(n))
}

// Transform is the stream's subject transform of the layout, source and
// destination: <prefix>.*.* → p<n>.{{partition(n,1)}}.<prefix>.{{wildcard(1)}}.{{wildcard(2)}}.
// A subject of another shape (a stray: not three tokens) is stored as it is
// and refused by the projector.
func (l Layout) Transform(prefix string) (source, destination string) {
	n := strconv.Itoa(l.N())
	return prefix + ".*.*", "p" + n + ".{{partition(" + n + ",1)}}." + prefix + ".{{wildcard(1)}}.{{wildcard(2)}}"
}

// Filter is the subject filter of partition k's messages as stored.
func (l Layout) Filter(prefix string, k int) string {
	return l.Name() + "." + strconv.Itoa(k) + "." + prefix + ".*.*"
}

// Subjects are the filters that select every message of the log under
// prefix: what the transforms left alone (published subjects, strays and
// messages stored before the first) and the stored form of l and of every
// layout the stream had before (former: a repartitioned stream keeps what it
// stored under its earlier layouts).
func (l Layout) Subjects(prefix string, former ...Layout) []string {
	out := []string{prefix + ".>"}
	for _, x := range append([]Layout{l}, former...) {
		if f := x.Name() + ".*." + prefix + ".>"; x.Partitioned() && !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out
}

// ProjectSubjects are the filters of one project's messages, in every form
// (Subjects).
func (l Layout) ProjectSubjects(prefix, projectID string, former ...Layout) []string {
	s := []string{Subject(prefix, projectID, "*")}
	for _, x := range append([]Layout{l}, former...) {
		if f := x.Name() + "." + strconv.Itoa(Partition(projectID, x.N())) + "." + Subject(prefix, projectID, "*"); x.Partitioned() && !slices.Contains(s, f) {
			s = append(s, f)
		}
	}
	return s
}

// SubjectPartition is the partition of l whose writer holds a message
// stored on subject: the stored form's own partition (what its partition's
// durable delivers), else its project's (a message stored as published, before
// the layout was switched); ok is false for a stray of a partitioned layout,
// which names no project (p1's writer holds it). In p1 it is 0.
func (l Layout) SubjectPartition(prefix, subject string) (k int, ok bool) {
	if !l.Partitioned() {
		return 0, true
	}
	if n, k, _, ok := storedForm(subject); ok && n == l.N() {
		return k, true
	}
	// Published form, or the stored form of a former layout (a repartition's
	// drain): the project's partition now.
	if project, _, err := ParseSubject(prefix, subject); err == nil {
		return Partition(project, l.N()), true
	}
	return 0, false
}

// storedForm splits p<n>.<k>.<rest>.
func storedForm(s string) (n, k int, rest string, ok bool) {
	layout, after, ok1 := strings.Cut(s, ".")
	part, rest, ok2 := strings.Cut(after, ".")
	if !ok1 || !ok2 || len(layout) < 2 || layout[0] != 'p' {
		return 0, 0, "", false
	}
	n, err1 := strconv.Atoi(layout[1:])
	k, err2 := strconv.Atoi(part)
	if err1 != nil || err2 != nil || n < 2 || n > MaxPartitions || k < 0 || k >= n {
		return 0, 0, "", false
	}
	return n, k, rest, true
}

// ParseLayout reads a layout's name ("p16").
func ParseLayout(name string) (Layout, error) {
	n, err := strconv.Atoi(strings.TrimPrefix(name, "p"))
	if err != nil || !strings.HasPrefix(name, "p") {
		return Layout{}, fmt.Errorf("layout %q is not p<partitions>", name)
	}
	return LayoutOf(n)
}
