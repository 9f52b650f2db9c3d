package admit

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Test fixtures. Task names: "run" has a handler on this worker, "alien" has
// none. Resource lists are space-separated so the tables stay readable.

const (
	handledName   = "run"
	unhandledName = "alien"
)

func handles(name string) bool { return name != unhandledName }

func names(s string) []string { return strings.Fields(s) }

// tk is a waiting task this worker can run.
func tk(id int64, excl, shared string) Entry {
	return Entry{ID: id, Name: handledName, Exclusive: names(excl), Shared: names(shared)}
}

// alien is a waiting task this worker has no handler for.
func alien(id int64, excl, shared string) Entry {
	return Entry{ID: id, Name: unhandledName, Exclusive: names(excl), Shared: names(shared)}
}

// holding describes the resources of one running task.
type holding struct{ excl, shared string }

func ids(es []Entry) []int64 {
	out := make([]int64, len(es))
	for i, e := range es {
		out[i] = e.ID
	}
	return out
}

func TestTakenAdmissible(t *testing.T) {
	tests := []struct {
		name         string
		taken        []holding
		excl, shared string
		want         bool
	}{
		{"empty admits exclusive", nil, "x", "", true},
		{"empty admits shared", nil, "", "x", true},
		{"empty admits no resources", nil, "", "", true},
		{"no resources always admissible", []holding{{"x y", "z"}}, "", "", true},
		{"exclusive blocks exclusive", []holding{{"x", ""}}, "x", "", false},
		{"exclusive blocks shared", []holding{{"x", ""}}, "", "x", false},
		{"shared blocks exclusive", []holding{{"", "x"}}, "x", "", false},
		{"shared admits shared", []holding{{"", "x"}}, "", "x", true},
		{"many shared holders admit shared", []holding{{"", "x"}, {"", "x"}}, "", "x", true},
		{"other names do not block", []holding{{"x", "y"}}, "a", "b", true},
		{"one busy name of several blocks", []holding{{"x", ""}}, "a b x", "", false},
		{"busy exclusive name among shared blocks", []holding{{"x", ""}}, "a", "b x", false},
		{"shared taken, exclusive wanted among several", []holding{{"", "y"}}, "a y", "b", false},
		{"shared taken, shared wanted among several", []holding{{"", "y"}}, "a", "b y", true},
		{"exclusive and shared both taken", []holding{{"x", ""}, {"", "x"}}, "", "x", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			taken := NewTaken()
			for _, h := range tt.taken {
				taken.Add(names(h.excl), names(h.shared))
			}
			got := taken.Admissible(names(tt.excl), names(tt.shared))
			if got != tt.want {
				t.Errorf("taken %v: Admissible(excl %q, shared %q) = %v, want %v",
					tt.taken, tt.excl, tt.shared, got, tt.want)
			}
		})
	}
}

func TestTakenAddLenReset(t *testing.T) {
	taken := NewTaken()
	if n := taken.Len(); n != 0 {
		t.Fatalf("new Taken: Len() = %d, want 0", n)
	}

	taken.Add(names("a b"), names("c"))
	taken.Add(names("a"), names("c d")) // repeats are not counted twice
	taken.Add(nil, nil)
	if n := taken.Len(); n != 4 {
		t.Fatalf("after Add: Len() = %d, want 4 (a b exclusive, c d shared)", n)
	}
	for _, tc := range []struct {
		excl, shared string
		want         bool
	}{
		{"a", "", false},
		{"", "b", false},
		{"c", "", false},
		{"", "c", true},
		{"", "d", true},
		{"e", "f", true},
	} {
		if got := taken.Admissible(names(tc.excl), names(tc.shared)); got != tc.want {
			t.Errorf("after Add: Admissible(excl %q, shared %q) = %v, want %v", tc.excl, tc.shared, got, tc.want)
		}
	}

	taken.Reset()
	if n := taken.Len(); n != 0 {
		t.Fatalf("after Reset: Len() = %d, want 0", n)
	}
	if !taken.Admissible(names("a b c d"), nil) {
		t.Fatal("after Reset: exclusive a b c d not admissible, want every name free")
	}

	// The sets are usable again after Reset.
	taken.Add(names("b"), nil)
	if taken.Admissible(nil, names("b")) {
		t.Error("Add after Reset: shared b admissible over exclusive b")
	}
	if !taken.Admissible(names("a"), nil) {
		t.Error("Add after Reset: exclusive a not admissible, but only b was added")
	}
	if n := taken.Len(); n != 1 {
		t.Errorf("Add after Reset: Len() = %d, want 1", n)
	}
}

func TestWalk(t *testing.T) {
	tests := []struct {
		name         string
		running      []holding // seeded into Taken before the walk
		entries      []Entry
		max          int
		wantCands    []int64
		wantExamined int
	}{
		{
			name:         "empty window",
			max:          5,
			wantExamined: 0,
		},
		{
			name:         "independent tasks all run",
			entries:      []Entry{tk(1, "x", ""), tk(2, "y", ""), tk(3, "", "z")},
			max:          10,
			wantCands:    []int64{1, 2, 3},
			wantExamined: 3,
		},
		{
			name:         "exclusive blocks later exclusive",
			entries:      []Entry{tk(1, "x", ""), tk(2, "x", "")},
			max:          10,
			wantCands:    []int64{1},
			wantExamined: 2,
		},
		{
			name:         "exclusive blocks later shared",
			entries:      []Entry{tk(1, "x", ""), tk(2, "", "x")},
			max:          10,
			wantCands:    []int64{1},
			wantExamined: 2,
		},
		{
			name:         "shared and shared run together",
			entries:      []Entry{tk(1, "", "x"), tk(2, "", "x"), tk(3, "", "x")},
			max:          10,
			wantCands:    []int64{1, 2, 3},
			wantExamined: 3,
		},
		{
			name:         "shared blocks later exclusive",
			entries:      []Entry{tk(1, "", "x"), tk(2, "x", "")},
			max:          10,
			wantCands:    []int64{1},
			wantExamined: 2,
		},
		{
			name:         "blocked tasks do not hold back unrelated ones",
			entries:      []Entry{tk(1, "x", ""), tk(2, "x", ""), tk(3, "y", ""), tk(4, "x", ""), tk(5, "", "z")},
			max:          10,
			wantCands:    []int64{1, 3, 5},
			wantExamined: 5,
		},
		{
			name:         "unhandled task is never a candidate",
			entries:      []Entry{alien(1, "x", ""), alien(2, "", ""), tk(3, "y", "")},
			max:          10,
			wantCands:    []int64{3},
			wantExamined: 3,
		},
		{
			name:         "unhandled exclusive task blocks later conflicting tasks",
			entries:      []Entry{alien(1, "x", ""), tk(2, "x", ""), tk(3, "", "x"), tk(4, "y", "")},
			max:          10,
			wantCands:    []int64{4},
			wantExamined: 4,
		},
		{
			// 4 is shared on x behind 2, which is exclusive on x and waiting (P4).
			name:         "unhandled shared task blocks later exclusive",
			entries:      []Entry{alien(1, "", "x"), tk(2, "x", ""), tk(3, "", "y"), tk(4, "", "x")},
			max:          10,
			wantCands:    []int64{3},
			wantExamined: 4,
		},
		{
			name:         "unhandled shared task lets later shared run",
			entries:      []Entry{alien(1, "", "x"), tk(2, "", "x")},
			max:          10,
			wantCands:    []int64{2},
			wantExamined: 2,
		},
		{
			// The P2 trap: B is blocked on x, but it still holds its place on
			// y, so C must not overtake it.
			name:         "blocked task still takes its other exclusive names",
			entries:      []Entry{tk(1, "x", ""), tk(2, "x y", ""), tk(3, "y", "")},
			max:          10,
			wantCands:    []int64{1},
			wantExamined: 3,
		},
		{
			name:         "blocked task still takes its other shared names",
			entries:      []Entry{tk(1, "x", ""), tk(2, "x", "y"), tk(3, "", "y"), tk(4, "y", "")},
			max:          10,
			wantCands:    []int64{1, 3}, // 3 is shared with shared: no conflict with 2
			wantExamined: 4,
		},
		{
			name:         "task blocked by a running task still takes its other names",
			running:      []holding{{"x", ""}},
			entries:      []Entry{tk(1, "x y", ""), tk(2, "y", ""), tk(3, "", "y"), tk(4, "z", "")},
			max:          10,
			wantCands:    []int64{4},
			wantExamined: 4,
		},
		{
			name:         "chain of blocked tasks passes the block along",
			entries:      []Entry{tk(1, "a", ""), tk(2, "a b", ""), tk(3, "b c", ""), tk(4, "c", ""), tk(5, "d", "")},
			max:          10,
			wantCands:    []int64{1, 5},
			wantExamined: 5,
		},
		{
			// P4: a reader queued behind a waiting writer waits for it, even
			// though it would be compatible with the reader that is running.
			name:         "shared behind waiting exclusive is not a candidate",
			running:      []holding{{"", "x"}},
			entries:      []Entry{tk(1, "x", ""), tk(2, "", "x"), tk(3, "", "x")},
			max:          10,
			wantCands:    nil,
			wantExamined: 3,
		},
		{
			name:         "shared behind exclusive candidate is not a candidate",
			entries:      []Entry{tk(1, "x", ""), tk(2, "", "x")},
			max:          10,
			wantCands:    []int64{1},
			wantExamined: 2,
		},
		{
			name:         "shared behind unhandled exclusive is not a candidate",
			entries:      []Entry{alien(1, "x", ""), tk(2, "", "x")},
			max:          10,
			wantExamined: 2,
		},
		{
			name:         "running exclusive holder blocks exclusive and shared",
			running:      []holding{{"x", ""}},
			entries:      []Entry{tk(1, "x", ""), tk(2, "", "x"), tk(3, "y", "")},
			max:          10,
			wantCands:    []int64{3},
			wantExamined: 3,
		},
		{
			name:         "running shared holder blocks exclusive only",
			running:      []holding{{"", "x"}},
			entries:      []Entry{tk(1, "", "x"), tk(2, "x", "")},
			max:          10,
			wantCands:    []int64{1},
			wantExamined: 2,
		},
		{
			name:         "several running holders",
			running:      []holding{{"a", "s"}, {"b", "s"}},
			entries:      []Entry{tk(1, "a", ""), tk(2, "", "b"), tk(3, "c", "s"), tk(4, "s", ""), tk(5, "", "")},
			max:          10,
			wantCands:    []int64{3, 5},
			wantExamined: 5,
		},
		{
			name:         "no resources always a candidate when handled",
			running:      []holding{{"x", "y"}},
			entries:      []Entry{tk(1, "x", ""), tk(2, "", ""), alien(3, "", ""), tk(4, "", "")},
			max:          10,
			wantCands:    []int64{2, 4},
			wantExamined: 4,
		},
		{
			name:         "max stops the walk after the last candidate",
			entries:      []Entry{tk(1, "a", ""), tk(2, "b", ""), tk(3, "c", ""), tk(4, "d", "")},
			max:          2,
			wantCands:    []int64{1, 2},
			wantExamined: 2,
		},
		{
			name:         "max counts candidates, not examined entries",
			entries:      []Entry{tk(1, "a", ""), tk(2, "a", ""), alien(3, "b", ""), tk(4, "c", ""), tk(5, "d", "")},
			max:          2,
			wantCands:    []int64{1, 4},
			wantExamined: 4,
		},
		{
			name:         "max reached on the last entry",
			entries:      []Entry{tk(1, "a", ""), tk(2, "a", ""), tk(3, "b", "")},
			max:          2,
			wantCands:    []int64{1, 3},
			wantExamined: 3,
		},
		{
			name:         "max not reached examines everything",
			entries:      []Entry{tk(1, "a", ""), tk(2, "a", ""), tk(3, "a", "")},
			max:          2,
			wantCands:    []int64{1},
			wantExamined: 3,
		},
		{
			name:         "max zero examines nothing",
			entries:      []Entry{tk(1, "a", ""), tk(2, "b", "")},
			max:          0,
			wantExamined: 0,
		},
		{
			name:         "negative max examines nothing",
			entries:      []Entry{tk(1, "a", "")},
			max:          -1,
			wantExamined: 0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			taken := NewTaken()
			var running []Entry
			for _, h := range tt.running {
				taken.Add(names(h.excl), names(h.shared))
				running = append(running, Entry{Exclusive: names(h.excl), Shared: names(h.shared)})
			}
			before := slices.Clone(tt.entries)

			out, examined := Walk(tt.entries, taken, handles, tt.max, nil)

			if got := ids(out); !slices.Equal(got, tt.wantCands) {
				t.Errorf("candidates = %v, want %v", got, tt.wantCands)
			}
			if examined != tt.wantExamined {
				t.Errorf("examined = %d, want %d", examined, tt.wantExamined)
			}
			if !reflect.DeepEqual(tt.entries, before) {
				t.Errorf("Walk modified its entries:\n got  %+v\n want %+v", tt.entries, before)
			}
			// The oracle must agree with the table, or the table (or the
			// oracle the property tests rely on) is wrong.
			if msg := checkWalk(running, tt.entries, handles, tt.max, 0); msg != "" {
				t.Error(msg)
			}
		})
	}
}

// TestWalkOutCountsTowardMax checks that candidates already in out count
// against max and are kept in front of the new ones.
func TestWalkOutCountsTowardMax(t *testing.T) {
	prev := []Entry{tk(100, "p", "")}
	entries := []Entry{tk(1, "a", ""), tk(2, "b", ""), tk(3, "c", "")}

	out, examined := Walk(entries, NewTaken(), handles, 2, prev)
	if got, want := ids(out), []int64{100, 1}; !slices.Equal(got, want) {
		t.Errorf("candidates = %v, want %v", got, want)
	}
	if examined != 1 {
		t.Errorf("examined = %d, want 1", examined)
	}

	full := []Entry{tk(100, "p", ""), tk(101, "q", "")}
	out, examined = Walk(entries, NewTaken(), handles, 2, full)
	if got, want := ids(out), []int64{100, 101}; !slices.Equal(got, want) {
		t.Errorf("out already full: candidates = %v, want %v", got, want)
	}
	if examined != 0 {
		t.Errorf("out already full: examined = %d, want 0", examined)
	}
}

// TestWalkTakenAfterWalk checks what the walk leaves in Taken: the names of
// every examined entry, candidate or not, and none of the entries it never
// examined. The worker's deeper scan carries Taken from page to page.
func TestWalkTakenAfterWalk(t *testing.T) {
	entries := []Entry{
		tk(1, "a", ""),
		alien(2, "b", "s"),   // never a candidate, still takes b and s
		tk(3, "a c", ""),     // blocked on a, still takes c
		tk(4, "d", ""),       // candidate number 2: the walk stops after it
		tk(5, "e", "f"),      // not examined
		alien(6, "g", ""),    // not examined
		tk(7, "", "h"),       // not examined
		tk(8, "a b c d", ""), // not examined
	}
	taken := NewTaken()
	_, examined := Walk(entries, taken, handles, 2, nil)
	if examined != 4 {
		t.Fatalf("examined = %d, want 4", examined)
	}
	for _, n := range []string{"a", "b", "c", "d"} {
		if taken.Admissible(nil, []string{n}) {
			t.Errorf("after walk: shared %s admissible, want it taken exclusively", n)
		}
	}
	if !taken.Admissible(nil, []string{"s"}) || taken.Admissible([]string{"s"}, nil) {
		t.Error("after walk: s should be taken shared only")
	}
	for _, n := range []string{"e", "f", "g", "h"} {
		if !taken.Admissible([]string{n}, nil) {
			t.Errorf("after walk: %s taken, but its entry was never examined", n)
		}
	}
	if n := taken.Len(); n != 5 {
		t.Errorf("after walk: Len() = %d, want 5 (a b c d exclusive, s shared)", n)
	}
}

func TestConflicts(t *testing.T) {
	tests := []struct {
		name string
		a, b Entry
		want bool
	}{
		{"exclusive and exclusive on one name", tk(1, "x", ""), tk(2, "x", ""), true},
		{"exclusive and shared on one name", tk(1, "x", ""), tk(2, "", "x"), true},
		{"shared and shared on one name", tk(1, "", "x"), tk(2, "", "x"), false},
		{"disjoint exclusive", tk(1, "x", ""), tk(2, "y", ""), false},
		{"disjoint mixed", tk(1, "x", "s"), tk(2, "y", "t"), false},
		{"shared overlap, exclusive elsewhere", tk(1, "x", "s"), tk(2, "y", "s"), false},
		{"overlap on a later name", tk(1, "a b c", ""), tk(2, "d", "e c"), true},
		{"exclusive in one is shared in other", tk(1, "a", "b"), tk(2, "b", "a"), true},
		{"no resources", tk(1, "", ""), tk(2, "", ""), false},
		{"no resources against exclusive", tk(1, "", ""), tk(2, "x", ""), false},
		{"handler does not matter", alien(1, "x", ""), tk(2, "x", ""), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Conflicts(tt.a, tt.b); got != tt.want {
				t.Errorf("Conflicts(%+v, %+v) = %v, want %v", tt.a, tt.b, got, tt.want)
			}
			if got := Conflicts(tt.b, tt.a); got != tt.want {
				t.Errorf("Conflicts(%+v, %+v) = %v, want %v (swapped)", tt.b, tt.a, got, tt.want)
			}
		})
	}
}

// checkWalk runs Walk over entries, with Taken seeded from running and have
// candidates already in out, and checks it against a brute-force oracle built
// on Conflicts. It returns "" or a description of every disagreement.
//
// The oracle: entries are examined in order until have+candidates reaches max;
// an examined entry is a candidate iff it is handled and conflicts with no
// running entry and no earlier examined entry. It also checks that candidates
// never conflict with each other or with running tasks, that Walk leaves
// entries and the existing out alone, that Taken afterwards holds exactly the
// names of running and examined entries, and that walking the entries in two
// pages with the same Taken (the worker's deeper scan) gives the same answer.
func checkWalk(running, entries []Entry, handles func(string) bool, limit, have int) string {
	var errs []string
	fail := func(format string, args ...any) { errs = append(errs, fmt.Sprintf(format, args...)) }

	// Oracle.
	var want []Entry
	wantExamined := len(entries)
	for i, e := range entries {
		if have+len(want) >= limit {
			wantExamined = i
			break
		}
		ok := handles(e.Name)
		for _, r := range running {
			ok = ok && !Conflicts(r, e)
		}
		for _, p := range entries[:i] {
			ok = ok && !Conflicts(p, e)
		}
		if ok {
			want = append(want, e)
		}
	}

	// Walk, with a prefix already in out.
	prefix := make([]Entry, have)
	for i := range prefix {
		prefix[i] = Entry{ID: -int64(i) - 1, Name: "prefix"}
	}
	prefixCopy := slices.Clone(prefix)
	before := cloneEntries(entries)
	taken := NewTaken()
	for _, r := range running {
		taken.Add(r.Exclusive, r.Shared)
	}
	out, examined := Walk(entries, taken, handles, limit, prefix)

	if !reflect.DeepEqual(entries, before) {
		fail("Walk modified its entries")
	}
	if len(out) < have || !reflect.DeepEqual(out[:have], prefixCopy) {
		fail("Walk did not keep the %d entries already in out: got %v", have, ids(out))
		return strings.Join(errs, "\n")
	}
	got := out[have:]
	if !reflect.DeepEqual(got, want) && !(len(got) == 0 && len(want) == 0) {
		fail("candidates = %v, oracle wants %v", ids(got), ids(want))
	}
	if examined != wantExamined {
		fail("examined = %d, oracle wants %d", examined, wantExamined)
	}
	if len(out) > max(limit, have) {
		fail("len(out) = %d exceeds max %d", len(out), limit)
	}
	for i, a := range got {
		if !handles(a.Name) {
			fail("candidate %d has no handler", a.ID)
		}
		for _, r := range running {
			if Conflicts(a, r) {
				fail("candidate %d conflicts with running %+v", a.ID, r)
			}
		}
		for _, b := range got[i+1:] {
			if Conflicts(a, b) {
				fail("candidates %d and %d conflict", a.ID, b.ID)
			}
		}
	}

	// Taken afterwards: exactly the names of running and examined entries.
	holders := append(slices.Clone(running), entries[:examined]...)
	exclHeld, sharedHeld := map[string]bool{}, map[string]bool{}
	for _, h := range holders {
		for _, n := range h.Exclusive {
			exclHeld[n] = true
		}
		for _, n := range h.Shared {
			sharedHeld[n] = true
		}
	}
	probe := map[string]bool{}
	for _, e := range append(slices.Clone(running), entries...) {
		for _, n := range slices.Concat(e.Exclusive, e.Shared) {
			probe[n] = true
		}
	}
	for n := range probe {
		if got, want := taken.Admissible([]string{n}, nil), !exclHeld[n] && !sharedHeld[n]; got != want {
			fail("after walk: exclusive %q admissible = %v, want %v", n, got, want)
		}
		if got, want := taken.Admissible(nil, []string{n}), !exclHeld[n]; got != want {
			fail("after walk: shared %q admissible = %v, want %v", n, got, want)
		}
	}

	// Two pages with Taken carried over give the same result as one walk,
	// for every split point.
	for split := 0; split <= len(entries); split++ {
		t2 := NewTaken()
		for _, r := range running {
			t2.Add(r.Exclusive, r.Shared)
		}
		out2, n1 := Walk(entries[:split], t2, handles, limit, slices.Clone(prefixCopy))
		n := n1
		if n1 == split {
			var n2 int
			out2, n2 = Walk(entries[split:], t2, handles, limit, out2)
			n += n2
		}
		if !reflect.DeepEqual(out2, out) || n != examined {
			fail("paged at %d: candidates %v examined %d, one walk gave %v examined %d",
				split, ids(out2), n, ids(out), examined)
			break
		}
	}

	return strings.Join(errs, "\n")
}

func cloneEntries(es []Entry) []Entry {
	if es == nil {
		return nil
	}
	out := make([]Entry, len(es))
	for i, e := range es {
		e.Exclusive = slices.Clone(e.Exclusive)
		e.Shared = slices.Clone(e.Shared)
		out[i] = e
	}
	return out
}

// Property test.

var seedFlag = flag.String("seed", "", "seed for TestWalkProperty (default: $TASKING_SEED, else time-based)")

// testSeed returns the seed for randomised tests: -seed, else TASKING_SEED,
// else the clock.
var testSeed = sync.OnceValues(func() (uint64, error) {
	s := *seedFlag
	if s == "" {
		s = os.Getenv("TASKING_SEED")
	}
	if s == "" {
		return uint64(time.Now().UnixNano()), nil
	}
	return strconv.ParseUint(s, 10, 64)
})

var universe = []string{"a", "b", "c", "d", "e", "f"}

// randomNames picks up to three names of universe not in used, and marks
// them used, so a task's exclusive and shared names are disjoint.
func randomNames(r *rand.Rand, used map[string]bool) []string {
	var out []string
	for k := r.IntN(4); k > 0; k-- {
		n := universe[r.IntN(len(universe))]
		if !used[n] {
			used[n] = true
			out = append(out, n)
		}
	}
	return out
}

func randomEntry(r *rand.Rand, id int64) Entry {
	used := map[string]bool{}
	e := Entry{ID: id, Name: handledName, Exclusive: randomNames(r, used), Shared: randomNames(r, used)}
	if r.IntN(4) == 0 {
		e.Name = unhandledName
	}
	return e
}

func TestWalkProperty(t *testing.T) {
	seed, err := testSeed()
	if err != nil {
		t.Fatalf("bad seed (-seed or TASKING_SEED): %v", err)
	}
	t.Logf("seed %d (rerun with TASKING_SEED=%d or -seed=%d)", seed, seed, seed)

	iterations := 5000
	if testing.Short() {
		iterations = 500
	}
	for iter := range iterations {
		r := rand.New(rand.NewPCG(seed, uint64(iter)))
		running := make([]Entry, r.IntN(4))
		for i := range running {
			running[i] = randomEntry(r, 0)
			running[i].Name = handledName
		}
		entries := make([]Entry, r.IntN(13))
		for i := range entries {
			entries[i] = randomEntry(r, int64(i+1))
		}
		limit := r.IntN(len(entries)+2) - 1 // -1 up to len(entries)
		have := 0
		if limit > 0 && r.IntN(4) == 0 {
			have = r.IntN(limit + 1)
		}
		if msg := checkWalk(running, entries, handles, limit, have); msg != "" {
			t.Fatalf("seed %d iteration %d (rerun with TASKING_SEED=%d):\nrunning %+v\nentries %+v\nmax %d, %d already in out\n%s",
				seed, iter, seed, running, entries, limit, have, msg)
		}
	}
}

// Fuzzing.

// decodeWalk turns fuzz bytes into a walk deterministically. Byte 0 gives
// max (-1..14) and the number of already-found candidates, byte 1 the number
// of running tasks (0..3); then every task takes three bytes: its task name,
// a bit mask of exclusive names and one of shared names over eight names.
// Shared bits that are also exclusive are dropped: the dispatch normalises
// resources so a name is never both.
func decodeWalk(data []byte) (running, entries []Entry, limit, have int) {
	const fuzzNames = "abcdefgh"
	if len(data) < 2 {
		return nil, nil, 0, 0
	}
	limit = int(data[0]&0x0f) - 1
	if limit > 0 {
		have = int(data[0]>>4) % (limit + 1)
	}
	nRunning := int(data[1] % 4)
	data = data[2:]
	task := func(b [3]byte, id int64) Entry {
		e := Entry{ID: id, Name: handledName}
		if b[0]%3 == 0 {
			e.Name = unhandledName
		}
		sharedMask := b[2] &^ b[1]
		for i := range 8 {
			if b[1]&(1<<i) != 0 {
				e.Exclusive = append(e.Exclusive, fuzzNames[i:i+1])
			}
			if sharedMask&(1<<i) != 0 {
				e.Shared = append(e.Shared, fuzzNames[i:i+1])
			}
		}
		return e
	}
	for i := int64(1); len(data) >= 3 && len(entries) < 64; i++ {
		e := task([3]byte(data[:3]), i)
		data = data[3:]
		if len(running) < nRunning {
			e.ID, e.Name = 0, handledName
			running = append(running, e)
			continue
		}
		e.ID = int64(len(entries) + 1)
		entries = append(entries, e)
	}
	return running, entries, limit, have
}

func FuzzWalk(f *testing.F) {
	f.Add([]byte{})
	// max 4, no running: A excl{a}, B excl{a,b}, C excl{b} (the P2 trap).
	f.Add([]byte{0x05, 0x00, 1, 0x01, 0x00, 1, 0x03, 0x00, 1, 0x02, 0x00})
	// max 4, one running reader on a: writer on a, then a reader on a (P4).
	f.Add([]byte{0x05, 0x01, 1, 0x00, 0x01, 1, 0x01, 0x00, 1, 0x00, 0x01})
	// max 2, an unhandled writer on a, then tasks on a, b, c, d.
	f.Add([]byte{0x03, 0x00, 0, 0x01, 0x00, 1, 0x00, 0x01, 1, 0x02, 0x00, 1, 0x04, 0x00, 1, 0x08, 0x00})
	// max 3 with two already found, tasks without resources.
	f.Add([]byte{0x24, 0x00, 1, 0x00, 0x00, 1, 0x00, 0x00, 0, 0x00, 0x00})
	// max 0.
	f.Add([]byte{0x01, 0x00, 1, 0x01, 0x00})
	// Overlapping bits: shared bits that are also exclusive are dropped.
	f.Add([]byte{0x0f, 0x02, 1, 0xf0, 0x0f, 1, 0x0f, 0xff, 1, 0x33, 0xcc, 1, 0x00, 0xff, 2, 0x80, 0x00})

	f.Fuzz(func(t *testing.T, data []byte) {
		running, entries, limit, have := decodeWalk(data)
		if msg := checkWalk(running, entries, handles, limit, have); msg != "" {
			t.Fatalf("running %+v\nentries %+v\nmax %d, %d already in out\n%s", running, entries, limit, have, msg)
		}
	})
}

// Benchmarks.

func BenchmarkWalk(b *testing.B) {
	const window = 200

	// Spread: 1-3 names each, over 1,000 names, a quarter of them shared.
	r := rand.New(rand.NewPCG(1, 2))
	spread := make([]Entry, window)
	for i := range spread {
		e := Entry{ID: int64(i + 1), Name: handledName}
		used := map[int]bool{}
		for k := 1 + r.IntN(3); k > 0; k-- {
			n := r.IntN(1000)
			if used[n] {
				continue
			}
			used[n] = true
			if r.IntN(4) == 0 {
				e.Shared = append(e.Shared, "res:"+strconv.Itoa(n))
			} else {
				e.Exclusive = append(e.Exclusive, "res:"+strconv.Itoa(n))
			}
		}
		spread[i] = e
	}

	// Blocked head: every task is exclusive on one name (and on one of its
	// own), and a running task holds that name, so nothing is a candidate and
	// the walk examines the whole window.
	blocked := make([]Entry, window)
	for i := range blocked {
		blocked[i] = Entry{ID: int64(i + 1), Name: handledName,
			Exclusive: []string{"repo:1", "own:" + strconv.Itoa(i)}}
	}

	run := func(b *testing.B, entries []Entry, running [][2][]string, limit, wantCands int) {
		taken := NewTaken()
		out := make([]Entry, 0, window)
		var examined int
		b.ReportAllocs()
		for b.Loop() {
			taken.Reset()
			for _, h := range running {
				taken.Add(h[0], h[1])
			}
			out, examined = Walk(entries, taken, handles, limit, out[:0])
		}
		if len(out) != wantCands || examined != len(entries) {
			b.Fatalf("walk found %d candidates after examining %d, want %d after %d",
				len(out), examined, wantCands, len(entries))
		}
	}

	b.Run("spread", func(b *testing.B) {
		// A max above the window so the whole window is walked.
		want, _ := Walk(spread, NewTaken(), handles, window+1, nil)
		run(b, spread, nil, window+1, len(want))
	})
	b.Run("blocked-head", func(b *testing.B) {
		run(b, blocked, [][2][]string{{{"repo:1"}, nil}}, 10, 0)
	})
}
