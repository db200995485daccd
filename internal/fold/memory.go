package fold

import (
	"hash/maphash"

	"github.com/buildstate/buildstate/internal/fsm"
)

// Memory is what the single writer of a partition keeps between its batches
// (docs/engine.md §4): the builds of the projects it holds (every build of
// them it loaded or folded since, which includes their role holders), the
// event ids it applied last, and which other projects the store holds rows
// for. A batch folds on a fresh Partition that Prime fills from it, and the
// caller reads from the store only what Prime reports missing; once the
// batch commits, Keep takes its projects back.
//
// A Memory is right only while nobody else writes the partition: the caller
// proves that at every commit (projection's fence) and drops the Memory when
// the proof fails. What a Memory does not know it assumes new (a build not
// claimed, an id not applied); the store's inserts of claims and ids report
// the rare case it was wrong (a build claimed before this writer acquired the
// partition, an id applied longer ago than the Memory remembers), and the
// caller folds the batch again on what it reads. It is not safe for
// concurrent use.
type Memory struct {
	limits   Limits
	projects map[string]*memProject
	owners   map[string]*memProject // build id -> its project, for the builds in memory
	ids      map[idKey]idDigest
	idRing   []idKey // the ids in the order kept, for the bound
	idNext   int
	stored   map[uint64]struct{} // hashes of the projects the store holds that memory does not
	batch    uint64              // Keep calls so far
}

// memProject is a project in memory: its builds as the store holds them.
type memProject struct {
	id     string
	builds []fsm.Build
	whole  bool                // builds is its whole history
	cold   map[string]struct{} // builds it claimed whose facts memory does not hold (not whole)
	used   uint64              // the last Keep that kept it
}

// Limits bound a Memory.
type Limits struct {
	Projects int // projects held; past it, those not used by the last batch are dropped (default 50,000)
	IDs      int // event ids remembered, the most recent (default 500,000)
}

// DefaultLimits are the limits of a zero Limits.
var DefaultLimits = Limits{Projects: 50_000, IDs: 500_000}

// storedSeed hashes project ids for Memory.stored (a collision makes the
// store read a project it does not hold: harmless).
var storedSeed = maphash.MakeSeed()

func storedKey(project string) uint64 { return maphash.String(storedSeed, project) }

// NewMemory returns an empty Memory bounded by l (zero fields take
// DefaultLimits).
func NewMemory(l Limits) *Memory {
	if l.Projects <= 0 {
		l.Projects = DefaultLimits.Projects
	}
	if l.IDs <= 0 {
		l.IDs = DefaultLimits.IDs
	}
	return &Memory{
		limits:   l,
		projects: map[string]*memProject{},
		owners:   map[string]*memProject{},
		ids:      map[idKey]idDigest{},
		idRing:   make([]idKey, 0, min(l.IDs, 1<<16)),
		stored:   map[uint64]struct{}{},
	}
}

// InStore records that the store holds rows of project (what the partition's
// owner scans when it acquires it): a batch naming it reads it, unless
// memory holds it.
func (m *Memory) InStore(project string) {
	if _, ok := m.projects[project]; !ok {
		m.stored[storedKey(project)] = struct{}{}
	}
}

// Len is the number of projects in memory.
func (m *Memory) Len() int { return len(m.projects) }

// Prime loads into p, a fresh partition, what m holds for the messages of
// dec: their projects in memory, the projects in memory that own builds they
// name, and the ids they carry that m remembers. It returns the indices in
// dec of the valid events whose project the store holds and memory does not,
// or that name a build of their project whose facts memory does not hold:
// the caller reads what those need (Partition.Load, with Stored.Claimed for
// the projects it reads) before adding dec.
func (m *Memory) Prime(p *Partition, dec []Decoded) (misses []int) {
	for i := range dec {
		d := &dec[i]
		if d.err != nil {
			continue
		}
		ev := &d.ev
		if mp := m.projects[ev.ProjectID]; mp != nil {
			p.prime(mp)
			if _, ok := mp.cold[ev.BuildID]; ok {
				misses = append(misses, i)
			}
		} else if _, ok := m.stored[storedKey(ev.ProjectID)]; ok {
			misses = append(misses, i)
		}
		if mp := m.owners[ev.BuildID]; mp != nil && mp.id != ev.ProjectID {
			p.prime(mp)
		}
		if dg, ok := m.ids[d.key]; ok {
			p.ids[d.key] = dg
		}
	}
	return misses
}

// prime loads mp into p, once.
func (p *Partition) prime(mp *memProject) {
	if pr := p.projects[mp.id]; pr != nil && pr.loaded != nil {
		return
	}
	p.loadBuilds(mp.id, mp.whole, func(yield func(*fsm.Build) bool) {
		for i := range mp.builds {
			if !yield(&mp.builds[i]) {
				return
			}
		}
	})
}

// Keep takes back, once the batch folded in p committed, the projects its
// valid events named (projects) as p holds them now, and the ids p applied;
// past the limits it drops the projects and ids used longest ago (the
// projects back to "in the store").
func (m *Memory) Keep(p *Partition, projects []string) {
	m.batch++
	for _, id := range projects {
		pr := p.projects[id]
		if pr == nil {
			continue // only refused events, and nothing stored: no rows
		}
		mp := m.projects[id]
		if mp == nil {
			mp = &memProject{id: id}
			m.projects[id] = mp
			delete(m.stored, storedKey(id))
		}
		// A project that nothing loaded started with this batch's messages:
		// they are its whole history.
		mp.whole = pr.loaded == nil || pr.loaded.whole
		mp.used = m.batch
		mp.builds = mp.builds[:0]
		for _, b := range pr.Builds {
			mp.builds = append(mp.builds, b.Build)
			m.owners[b.ID] = mp
		}
		// The builds it claimed that were not loaded stay names: a message
		// naming one is a miss (read its facts), not a new build.
		if mp.whole {
			mp.cold = nil
		} else {
			for _, b := range pr.loaded.claimed { // not whole: loaded
				if mp.cold == nil {
					mp.cold = map[string]struct{}{}
				}
				mp.cold[b] = struct{}{}
			}
		}
		for _, b := range pr.Builds {
			delete(mp.cold, b.ID)
		}
	}
	for _, a := range p.applied {
		m.remember(keyOf(a.EventID), idDigest(a.Digest[:16]))
	}
	for id, mp := range m.projects {
		if len(m.projects) <= m.limits.Projects {
			break
		}
		if mp.used == m.batch {
			continue
		}
		m.drop(id, mp)
	}
}

func (m *Memory) drop(id string, mp *memProject) {
	for i := range mp.builds {
		if m.owners[mp.builds[i].ID] == mp {
			delete(m.owners, mp.builds[i].ID)
		}
	}
	delete(m.projects, id)
	m.stored[storedKey(id)] = struct{}{}
}

// remember keeps an applied id, forgetting the oldest past the limit.
func (m *Memory) remember(k idKey, d idDigest) {
	if _, ok := m.ids[k]; ok {
		return
	}
	m.ids[k] = d
	if len(m.idRing) < m.limits.IDs {
		m.idRing = append(m.idRing, k)
		return
	}
	delete(m.ids, m.idRing[m.idNext])
	m.idRing[m.idNext] = k
	m.idNext = (m.idNext + 1) % len(m.idRing)
}

// DropIf drops the projects drop reports, without counting them as in the
// store: their partition went to another writer (projection.Fence.Release).
func (m *Memory) DropIf(drop func(project string) bool) {
	for id, mp := range m.projects {
		if drop(id) {
			m.drop(id, mp)
			delete(m.stored, storedKey(id))
		}
	}
}

// Forget drops every project and id m holds, the projects back to "in the
// store": what a caller does when a batch it kept (Keep) before its commit
// did not commit. A project that batch started, which the store does not
// hold, is then read and found empty: harmless.
func (m *Memory) Forget() {
	for id, mp := range m.projects {
		m.drop(id, mp)
	}
	clear(m.ids)
	m.idRing = m.idRing[:0]
	m.idNext = 0
}
