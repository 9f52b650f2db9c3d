// Package admit implements the admission walk of tasking's worker.
//
// The walk decides which waiting tasks may start now without breaking the
// order promise. Tasks are examined in dispatch order (seq). Two sets record
// the resources claimed by every task examined so far: names taken
// exclusively and names taken shared. A task is a candidate only if
//
//   - none of its exclusive names is taken in either mode, and
//   - none of its shared names is taken exclusively.
//
// Every examined task adds its own names to the sets, whether it becomes a
// candidate or not. That is what makes the walk safe: a task that cannot
// start (its resources are busy, or no handler runs it here) still holds its
// place in line on every one of its names, so no later conflicting task can
// overtake it (P2), and a shared task queued behind a waiting exclusive one
// waits for it (P4).
//
// A task is a candidate exactly when no earlier examined task conflicts with
// it, so the walk never holds back a task that could run. Candidates never
// conflict with each other.
//
// The walk is pure: it touches no database and no locker. The worker seeds
// the sets with the names of tasks that are already running (they hold their
// resources), feeds it pages of waiting tasks, and asks the locker for the
// candidates.
package admit

import "maps"

// Entry is one waiting task as the walk sees it.
type Entry struct {
	ID        int64
	Name      string // task name, used to check for a handler
	Exclusive []string
	Shared    []string
}

// Taken holds the names claimed by the tasks examined so far.
// The zero value is not ready; use NewTaken.
type Taken struct {
	excl   map[string]struct{}
	shared map[string]struct{}
}

// NewTaken returns empty sets.
func NewTaken() *Taken {
	return &Taken{excl: make(map[string]struct{}), shared: make(map[string]struct{})}
}

// Reset empties the sets for reuse, keeping their storage.
func (t *Taken) Reset() {
	clear(t.excl)
	clear(t.shared)
}

// Add records names as taken.
func (t *Taken) Add(exclusive, shared []string) {
	for _, n := range exclusive {
		t.excl[n] = struct{}{}
	}
	for _, n := range shared {
		t.shared[n] = struct{}{}
	}
}

// Admissible reports whether a task with these names conflicts with nothing
// recorded so far.
func (t *Taken) Admissible(exclusive, shared []string) bool {
	for _, n := range exclusive {
		if _, ok := t.excl[n]; ok {
			return false
		}
		if _, ok := t.shared[n]; ok {
			return false
		}
	}
	for _, n := range shared {
		if _, ok := t.excl[n]; ok {
			return false
		}
	}
	return true
}

// Clone returns a copy of the sets.
func (t *Taken) Clone() *Taken {
	return &Taken{excl: maps.Clone(t.excl), shared: maps.Clone(t.shared)}
}

// Sets returns the names taken exclusively, and the names taken in any
// mode, in no particular order.
func (t *Taken) Sets() (exclusive, any []string) {
	exclusive = make([]string, 0, len(t.excl))
	any = make([]string, 0, len(t.excl)+len(t.shared))
	for n := range t.excl {
		exclusive = append(exclusive, n)
		any = append(any, n)
	}
	for n := range t.shared {
		if _, ok := t.excl[n]; !ok {
			any = append(any, n)
		}
	}
	return exclusive, any
}

// Redundant reports whether the walk would pass over e without learning
// anything: e conflicts with the taken names, so it is no candidate, and all
// of its names are taken already in the same mode or a stronger one, so
// adding them changes no later decision. Skipping such an entry leaves a
// walk's outcome unchanged. The worker's deeper scan applies the same test
// on the server (queue.go, window) so that a long blocked head is not
// shipped to it.
func (t *Taken) Redundant(e Entry) bool {
	for _, n := range e.Exclusive {
		if _, ok := t.excl[n]; !ok {
			return false
		}
	}
	for _, n := range e.Shared {
		_, x := t.excl[n]
		_, s := t.shared[n]
		if !x && !s {
			return false
		}
	}
	return !t.Admissible(e.Exclusive, e.Shared)
}

// Len reports the sizes of the two sets added together (a name taken in
// both modes counts twice).
func (t *Taken) Len() int { return len(t.excl) + len(t.shared) }

// Walk examines entries in order and appends to out the candidates, at most
// max of them in all (len(out) counts). handles reports whether this worker
// can run a task name; a task it cannot run is never a candidate but still
// takes its names. Walk stops examining once out holds max candidates, and
// returns the extended slice and the number of entries it examined.
func Walk(entries []Entry, taken *Taken, handles func(name string) bool, max int, out []Entry) ([]Entry, int) {
	for i := range entries {
		if len(out) >= max {
			return out, i
		}
		e := &entries[i]
		if handles(e.Name) && taken.Admissible(e.Exclusive, e.Shared) {
			out = append(out, *e)
		}
		taken.Add(e.Exclusive, e.Shared)
	}
	return out, len(entries)
}

// Conflicts reports whether two tasks conflict: some resource is exclusive in
// one and named, in any mode, by the other.
func Conflicts(a, b Entry) bool {
	return overlaps(a.Exclusive, b.Exclusive) || overlaps(a.Exclusive, b.Shared) || overlaps(b.Exclusive, a.Shared)
}

func overlaps(a, b []string) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}
