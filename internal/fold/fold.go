// Package fold holds the projector's per-message rules, once, for the live
// store and for replays: a message is decoded with the time the log stored
// it (events.Decode); a build belongs to the project of the first event
// naming it that counts (a later event naming it under another project is
// refused, build_project_conflict); an event id counts once, at its first
// copy (a later copy with the same content is a duplicate, one with other
// content is refused, id_conflict, and claims no build); the events that
// count fold into each build with fsm.Build.Merge and into rows with
// fsm.Derive, and fsm.Decide turns the rows as stored into the rows as
// derived.
//
// A Partition is the state those rules need, held in memory by one owner,
// without locks: what the store already holds (Load: claims, applied ids,
// the facts of the projects a batch touches) and what the messages added
// since changed (Changes). A replay is a Partition that starts empty and
// holds every project; the live store loads one for each batch. The package
// imports no infrastructure: the callers read and write the database.
package fold

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"iter"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/buildstate/buildstate/internal/events"
	"github.com/buildstate/buildstate/internal/fsm"
)

// Message is one log message: its stream sequence, its subject as stored,
// its body and the time the log stored it.
type Message struct {
	Seq      uint64
	Subject  string
	Data     []byte
	StoredAt time.Time
}

// Applied is an event id that counted, the digest of its content and the
// sequence of its first copy (a projector_applied row).
type Applied struct {
	EventID string
	Digest  [32]byte
	Seq     uint64
}

// Refusal is a message the projector cannot apply, with its reason (a
// projector_dead_letters row).
type Refusal struct {
	Msg    Message
	Reason events.Reason
	Detail string
}

// RefusalOf is msg refused with err (an error matching events.ErrInvalid).
func RefusalOf(msg Message, err error) Refusal {
	return Refusal{Msg: msg, Reason: events.ReasonOf(err), Detail: detailOf(err)}
}

// detailOf is the human part of a refusal (the reason has its own
// column), in the words of events.Plain.
func detailOf(err error) string {
	var ie *events.InvalidError
	if errors.As(err, &ie) {
		return events.PlainText(ie.Detail)
	}
	return events.Plain(err)
}

// Position is a message's place in the log.
type Position struct {
	Seq      uint64
	StoredAt time.Time
}

// Counts says what a partition did with the messages it was given.
type Counts struct {
	Applied    int // valid events seen for the first time
	Duplicates int // repeats of an event id with the same content
	Refused    int // invalid or conflicting messages (the projector's dead letters)
}

// SlotKinds are the kinds by their index in Build.Seqs.
var SlotKinds = [4]events.Kind{events.KindQueued, events.KindStarted, events.KindMetricsRecorded, events.KindCompleted}

// KindSlot is the index of kind k in Build.Seqs.
func KindSlot(k events.Kind) int { return slices.Index(SlotKinds[:], k) }

// Build is a build with, for each winning step, the stream sequence of the
// message that carried it (projector_facts.stream_seq; 0 for a step loaded
// from the store and not won again since).
type Build struct {
	fsm.Build
	Seqs [4]uint64 // by KindSlot

	claimed bool  // claimed by a message of this partition (not loaded)
	won     uint8 // slots (bit KindSlot) a message of this partition won
}

// Project is a project and its builds.
type Project struct {
	ID     string
	Builds []*Build
	Last   Position // the last message that counted for it

	loaded  *loaded // what Load gave, nil for a project the messages started
	touched bool    // a message counted for it
}

// loaded is what Partition.Load knew of a project (apart from Project, so
// that a replay's projects do not carry it).
type loaded struct {
	stored  []fsm.Build // its builds as loaded, Project.Builds[i] started as stored[i]
	roles   fsm.Roles   // fsm.RolesOf(stored)
	whole   bool        // stored is its whole history
	claimed []string    // every build it claimed, if the store listed them (Stored.Claimed)
}

// builds lists the project's builds for fsm.
func (pr *Project) builds() []*fsm.Build {
	out := make([]*fsm.Build, len(pr.Builds))
	for i, b := range pr.Builds {
		out[i] = &b.Build
	}
	return out
}

// storedBuilds lists the project's builds as loaded.
func (pr *Project) storedBuilds() []*fsm.Build {
	if pr.loaded == nil {
		return nil
	}
	out := make([]*fsm.Build, len(pr.loaded.stored))
	for i := range pr.loaded.stored {
		out[i] = &pr.loaded.stored[i]
	}
	return out
}

// load is what Load knows of the project.
func (pr *Project) load() *loaded {
	if pr.loaded == nil {
		pr.loaded = &loaded{}
	}
	return pr.loaded
}

// idKey and idDigest are what a partition keeps of each event id: a
// 128-bit hash of the id (two seeded maphashes) and the first 128 bits of
// the digest of its first copy. Neither holds a pointer, so the garbage
// collector never scans the map, the biggest thing a fold of a long log
// holds; a collision of either among a log's ids is as unlikely as one of
// two random 128-bit numbers (~10^-26 for 10^6 ids). The full digest goes
// to projector_applied when the id is first seen (Applied).
type (
	idKey    [2]uint64
	idDigest [16]byte
)

// idSeeds seed idKey, for the life of the process (keys are never stored).
var idSeeds = [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()}

func keyOf(id string) idKey {
	return idKey{maphash.String(idSeeds[0], id), maphash.String(idSeeds[1], id)}
}

// Decoded is a message decoded, with its event's digest and id key, or
// refused. Decoding reads no state of a partition: messages may be decoded
// on any goroutine, before they are added.
type Decoded struct {
	Msg    Message
	ev     events.Event
	digest [32]byte
	key    idKey
	err    error
}

// Decode decodes m, published under prefix, with the time the log stored
// it (events.Decode).
func Decode(prefix string, m Message) Decoded {
	d := Decoded{Msg: m}
	d.ev, d.err = events.Decode(prefix, m.Subject, m.Data, m.StoredAt)
	if d.err == nil {
		d.digest = d.ev.Digest()
		d.key = keyOf(d.ev.ID)
	}
	return d
}

// Event is the decoded event, or the error that refuses the message.
func (d *Decoded) Event() (events.Event, error) { return d.ev, d.err }

// Outcome is what Add did with a message.
type Outcome int

const (
	Counted   Outcome = iota + 1 // a new valid event: folded in
	Duplicate                    // a repeat of an id with the same content: ignored
	Refused                      // invalid or conflicting: a dead letter (Changes.Refused)
)

// ErrSealed is returned by Add after Seal.
var ErrSealed = errors.New("fold is sealed")

// Partition is the rules' state of a part of the project space (the whole
// of it for a replay): the claims, ids and builds it knows, and what the
// messages added changed. It is not safe for concurrent use.
type Partition struct {
	ids      map[idKey]idDigest  // event id -> digest of its first valid copy, both cut to 128 bits
	builds   map[string]*Build   // build id -> build, under the project of its first claim
	projects map[string]*Project // project -> its builds
	refused  []Refusal           // the messages to dead-letter
	applied  []Applied           // ids that counted, unless Applied takes them
	interned map[string]*string  // one copy of each framework, node version, package manager
	counts   Counts

	// Applied, if set, is called with each event id that counts, at its
	// first sequence, in the order added, instead of collecting them for
	// Changes (a bulk replay streams them to the shadow while it reads the
	// log).
	Applied func(Applied)
}

// maxInterned bounds Partition.interned: past it, values are kept as decoded.
const maxInterned = 4096

// NewPartition returns an empty partition.
func NewPartition() *Partition {
	return &Partition{
		ids:      map[idKey]idDigest{},
		builds:   map[string]*Build{},
		projects: map[string]*Project{},
		interned: map[string]*string{},
	}
}

// Stored is what the store holds that a batch's messages need: for each
// event, whether its build is claimed and by whom, whether its id was
// applied and with which content, and the facts of its project.
type Stored struct {
	// Projects are the stored facts by project and build: for each project
	// its role holders and the builds the messages name, or (Whole) every
	// build.
	Projects map[string]map[string]*fsm.Build
	Whole    map[string]bool
	// Claims are the owners of the builds the messages name, by build id.
	Claims map[string]string
	// IDs are the digests of the event ids the messages carry that were
	// applied before.
	IDs map[string][]byte
	// Claimed, if the store lists them, are all the builds each project of
	// Projects claimed, whether their facts were loaded or not (a Memory
	// keeps the others as names, to read them when a message names them).
	Claimed map[string][]string
}

// Load makes what s holds known to the partition, before messages are
// added.
func (p *Partition) Load(s Stored) {
	for id, builds := range s.Projects {
		p.loadBuilds(id, s.Whole[id], maps.Values(builds))
	}
	for build, project := range s.Claims {
		if _, ok := p.builds[build]; ok {
			continue
		}
		// A claim whose facts were not loaded: the owner is all that counts.
		pr := p.project(project)
		nb := &Build{Build: fsm.Build{ID: build, ProjectID: project}}
		p.builds[build] = nb
		pr.Builds = append(pr.Builds, nb)
		l := pr.load()
		l.stored = append(l.stored, nb.Build)
	}
	for id, builds := range s.Claimed {
		// A project whose claimed builds hold no role and were not named
		// has no facts loaded: it is loaded all the same (not new), in part.
		l := p.project(id).load()
		l.claimed = append(l.claimed, builds...)
	}
	for id, digest := range s.IDs {
		var d idDigest
		copy(d[:], digest)
		p.ids[keyOf(id)] = d
	}
}

// loadBuilds adds builds, as the store holds them, to project id (those
// the partition knows already aside); whole says they are its whole history
// (a project loaded whole stays whole).
func (p *Partition) loadBuilds(id string, whole bool, builds iter.Seq[*fsm.Build]) {
	pr := p.project(id)
	l := pr.load()
	l.whole = l.whole || whole
	for b := range builds {
		if _, ok := p.builds[b.ID]; ok {
			continue
		}
		nb := &Build{Build: *b}
		p.builds[b.ID] = nb
		pr.Builds = append(pr.Builds, nb)
		l.stored = append(l.stored, *b)
	}
	l.roles = fsm.RolesOf(pr.storedBuilds())
}

func (p *Partition) project(id string) *Project {
	pr := p.projects[id]
	if pr == nil {
		pr = &Project{ID: id}
		p.projects[id] = pr
	}
	return pr
}

// intern returns the partition's copy of *s: the few frameworks, node
// versions and package managers repeat across a log's events, so the
// builds share them instead of holding a copy each.
func (p *Partition) intern(s *string) *string {
	if s == nil {
		return nil
	}
	if c, ok := p.interned[*s]; ok {
		return c
	}
	if len(p.interned) < maxInterned {
		p.interned[*s] = s
	}
	return s
}

// Add folds one decoded message in, as the projector does, message by
// message in the order added (stream order): Refused comes with the error
// (matching events.ErrInvalid, with its events.Reason) that refuses it.
// After Seal it returns ErrSealed.
func (p *Partition) Add(d *Decoded) (Outcome, error) {
	if p.ids == nil {
		return 0, ErrSealed
	}
	m := d.Msg
	if d.err != nil {
		return Refused, p.refuse(m, d.err)
	}
	ev := d.ev
	// A build named under another project than the one that claimed it is
	// refused; then a repeated id is a duplicate or a conflict; only an
	// event that counts claims its build.
	b, claimed := p.builds[ev.BuildID]
	if claimed && b.ProjectID != ev.ProjectID {
		return Refused, p.refuse(m, events.Conflict(events.ReasonBuildProjectClash,
			"build %q belongs to project %q, not %q", ev.BuildID, b.ProjectID, ev.ProjectID))
	}
	if prev, ok := p.ids[d.key]; ok {
		if prev == idDigest(d.digest[:16]) {
			p.counts.Duplicates++
			return Duplicate, nil
		}
		return Refused, p.refuse(m, events.Conflict(events.ReasonIDConflict,
			"id %q was applied before with different content", ev.ID))
	}
	p.ids[d.key] = idDigest(d.digest[:16])
	a := Applied{EventID: ev.ID, Digest: d.digest, Seq: m.Seq}
	if p.Applied != nil {
		p.Applied(a)
	} else {
		p.applied = append(p.applied, a)
	}
	pr := p.project(ev.ProjectID)
	if !claimed {
		b = &Build{Build: fsm.Build{ID: ev.BuildID, ProjectID: pr.ID}, claimed: true}
		p.builds[ev.BuildID] = b
		pr.Builds = append(pr.Builds, b)
	}
	ev.Data.Framework, ev.Data.NodeVersion = p.intern(ev.Data.Framework), p.intern(ev.Data.NodeVersion)
	ev.Data.PackageManager = p.intern(ev.Data.PackageManager)
	if b.Merge(ev) {
		slot := KindSlot(ev.Kind())
		b.Seqs[slot] = m.Seq
		b.won |= 1 << slot
	}
	pr.Last = Position{Seq: m.Seq, StoredAt: m.StoredAt}
	pr.touched = true
	p.counts.Applied++
	return Counted, nil
}

func (p *Partition) refuse(m Message, err error) error {
	p.refused = append(p.refused, RefusalOf(m, err))
	return err
}

// Incomplete lists, in order, the projects loaded in part (role holders and
// named builds) for which that part is not enough: a message demoted a role
// holder (fsm.Demoted), so a build not loaded may hold the role now. The
// caller loads their whole history and folds the same messages again into
// a fresh partition.
func (p *Partition) Incomplete() []string {
	var out []string
	for id, pr := range p.projects {
		l := pr.loaded
		if !pr.touched || l == nil || l.whole {
			continue
		}
		for i := range l.stored {
			s := &l.stored[i]
			if l.roles.Holds(s.ID) && fsm.Demoted(s, &pr.Builds[i].Build) {
				out = append(out, id)
				break
			}
		}
	}
	slices.Sort(out)
	return out
}

// Claim is a build claimed for a project.
type Claim struct {
	BuildID, ProjectID string
}

// Fact is the winning step of one kind of a build, and the sequence of the
// message that carried it.
type Fact struct {
	Build *Build
	Kind  events.Kind
	Step  *fsm.Step
	Seq   uint64
	// Replaces says the store held a fact of this kind for the build (as
	// loaded): the write replaces it. Otherwise the fact is new, and a
	// store that holds one after all (it was not loaded: a memory that
	// assumed the build new) refuses the write on its key.
	Replaces bool
}

// Open is a build waiting on its worker (fsm.Build.Waiting) as the
// messages leave it: a projector_open_builds row.
type Open struct {
	BuildID, ProjectID string
	fsm.Wait
}

// Changes are what the messages added changed in what was loaded: what a
// store writes, each list in a fixed order (so that concurrent writers take
// row locks in one order).
type Changes struct {
	Claims  []Claim              // builds claimed, by build id
	Applied []Applied            // ids that counted, by id (none when Partition.Applied took them)
	Facts   []Fact               // steps won, by build id and kind
	Roles   map[string]fsm.Roles // projects whose role holders changed
	Plans   []fsm.Plan           // each project's writes (fsm.Decide), by project id; none if empty
	Refused []Refusal            // the dead letters, in the order added
	// Open are the builds waiting on their worker whose wait changed (a
	// first queued or started step), by build id; Closed the builds that
	// waited as loaded and no longer do (their completion won), by build id.
	Open   []Open
	Closed []string
}

// Changes computes what the messages added changed: for each project a
// message counted for, its claims, its facts won, its role holders and the
// plan (fsm.Decide) that takes its rows as loaded to the rows derived from
// its builds now.
func (p *Partition) Changes(ctx context.Context) (Changes, error) {
	c := Changes{Roles: map[string]fsm.Roles{}, Refused: p.refused}
	var touched []*Project
	for _, pr := range p.projects {
		if pr.touched {
			touched = append(touched, pr)
		}
	}
	slices.SortFunc(touched, func(a, b *Project) int { return strings.Compare(a.ID, b.ID) })
	for _, pr := range touched {
		var stored []fsm.Build
		if pr.loaded != nil {
			stored = pr.loaded.stored
		}
		for i, b := range pr.Builds {
			if b.claimed {
				c.Claims = append(c.Claims, Claim{BuildID: b.ID, ProjectID: pr.ID})
			}
			if b.won == 0 {
				continue
			}
			var was *fsm.Build // the build as loaded, nil if new (Builds[i] started as stored[i])
			if i < len(stored) {
				was = &stored[i]
			}
			for slot, k := range SlotKinds {
				if b.won&(1<<slot) != 0 {
					c.Facts = append(c.Facts, Fact{Build: b, Kind: k, Step: *b.Step(k), Seq: b.Seqs[slot],
						Replaces: was != nil && *was.Step(k) != nil})
				}
			}
			var before fsm.Wait
			waited := false
			if was != nil {
				before, waited = was.Waiting()
			}
			switch now, waits := b.Waiting(); {
			case waits && (!waited || now.For != before.For || !now.Since.Equal(before.Since)):
				c.Open = append(c.Open, Open{BuildID: b.ID, ProjectID: pr.ID, Wait: now})
			case !waits && waited:
				c.Closed = append(c.Closed, b.ID)
			}
		}
		after := pr.builds()
		var before fsm.Roles
		if pr.loaded != nil {
			before = pr.loaded.roles
		}
		if roles := fsm.RolesOf(after); roles != before {
			c.Roles[pr.ID] = roles
		}
		plan, err := fsm.Decide(ctx, pr.ID, fsm.Derive(pr.ID, pr.storedBuilds()), fsm.Derive(pr.ID, after))
		if err != nil {
			return Changes{}, fmt.Errorf("decide: %w", err)
		}
		if len(plan.Actions) > 0 {
			c.Plans = append(c.Plans, plan)
		}
	}
	slices.SortFunc(c.Claims, func(a, b Claim) int { return strings.Compare(a.BuildID, b.BuildID) })
	slices.SortFunc(c.Facts, func(a, b Fact) int {
		if x := strings.Compare(a.Build.ID, b.Build.ID); x != 0 {
			return x
		}
		return strings.Compare(string(a.Kind), string(b.Kind))
	})
	slices.SortFunc(c.Open, func(a, b Open) int { return strings.Compare(a.BuildID, b.BuildID) })
	slices.Sort(c.Closed)
	c.Applied = slices.SortedFunc(slices.Values(p.applied), func(a, b Applied) int { return strings.Compare(a.EventID, b.EventID) })
	return c, nil
}

// View is what the read model holds for project after the messages added so
// far (and what was loaded): its row (nil while it has no visible build)
// and its metrics rows.
func (p *Partition) View(project string) fsm.View {
	pr := p.projects[project]
	if pr == nil {
		return fsm.Derive(project, nil)
	}
	return fsm.Derive(project, pr.builds())
}

// Project is the partition's project id, nil if it knows none.
func (p *Partition) Project(id string) *Project { return p.projects[id] }

// Projects yields every project the partition knows, in no order.
func (p *Partition) Projects() iter.Seq[*Project] {
	return func(yield func(*Project) bool) {
		for _, pr := range p.projects {
			if !yield(pr) {
				return
			}
		}
	}
}

// Refusals are the messages refused so far, in the order added.
func (p *Partition) Refusals() []Refusal { return p.refused }

// Counts says what the partition did so far.
func (p *Partition) Counts() Counts {
	c := p.counts
	c.Refused = len(p.refused)
	return c
}

// Seal drops what only further messages would need (the ids seen, the
// biggest part of a long log's fold) before the partition's model is
// written. Add after Seal fails.
func (p *Partition) Seal() { p.ids = nil }
