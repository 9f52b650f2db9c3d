package tasking_test

// Deep waiting lines: a long line of blocked tasks on one resource must
// neither break the order of the promise (P1, P2, P4, P5) nor hold up the
// tasks that do not wait on it (P6). The old engine scanned one page of the
// queue from its oldest task; a line longer than that page hid everything
// dispatched behind it.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

const (
	deepHead    = 600 // tasks exclusive on "h", dispatched first
	deepOthers  = 300 // then tasks on o0..o4 only,
	deepUniques = 300 // interleaved with tasks on a name of their own
	deepOs      = 5
	deepBatch   = 50 // head tasks per DispatchMany
	deepTail    = 10 // tail tasks per DispatchMany
)

const (
	deepKindHead = iota
	deepKindOther
	deepKindUnique
)

// deepTask is one task of the deep-lines workload; args "i" is its index.
type deepTask struct {
	kind         int
	excl, shared []string
	ms           int // for the worker processes: how long the handler works
}

// deepWorkload draws the workload: deepHead tasks exclusive on "h", about a
// third of which also name one of o0..o4 (exclusive or shared), then
// deepOthers tasks naming one or two of o0..o4 and deepUniques tasks naming
// a resource of their own, interleaved at random.
func deepWorkload(seed uint64) []deepTask {
	rng := rand.New(rand.NewPCG(seed, 0xdee9))
	name := func(n string, excl bool, t *deepTask) {
		if excl {
			t.excl = append(t.excl, n)
		} else {
			t.shared = append(t.shared, n)
		}
	}
	ms := func() int {
		if rng.IntN(7) == 0 {
			return 1
		}
		return 0
	}
	var out []deepTask
	for i := 0; i < deepHead; i++ {
		t := deepTask{kind: deepKindHead, excl: []string{"h"}, ms: ms()}
		if rng.IntN(3) == 0 {
			name(fmt.Sprintf("o%d", rng.IntN(deepOs)), rng.IntN(2) == 0, &t)
		}
		out = append(out, t)
	}
	tail := make([]int, 0, deepOthers+deepUniques)
	for range deepOthers {
		tail = append(tail, deepKindOther)
	}
	for range deepUniques {
		tail = append(tail, deepKindUnique)
	}
	rng.Shuffle(len(tail), func(i, j int) { tail[i], tail[j] = tail[j], tail[i] })
	for _, kind := range tail {
		t := deepTask{kind: kind, ms: ms()}
		if kind == deepKindOther {
			for _, n := range rng.Perm(deepOs)[:1+rng.IntN(2)] {
				name(fmt.Sprintf("o%d", n), rng.IntN(2) == 0, &t)
			}
		} else {
			name(fmt.Sprintf("u%d", len(out)), rng.IntN(2) == 0, &t)
		}
		out = append(out, t)
	}
	return out
}

func (w deepTask) spec(i int) tasking.TaskSpec {
	return tasking.Spec("t", map[string]int{"i": i, "ms": w.ms}, tasking.Exclusive(w.excl...), tasking.Shared(w.shared...))
}

// dispatchDeep dispatches the head in batches, one after another, then the
// rest in smaller batches from two dispatchers.
func dispatchDeep(ctx context.Context, t *testing.T, disp *tasking.Client, work []deepTask) {
	specs := make([]tasking.TaskSpec, len(work))
	for i, w := range work {
		specs[i] = w.spec(i)
	}
	for lo := 0; lo < deepHead; lo += deepBatch {
		if _, err := disp.DispatchMany(ctx, specs[lo:min(lo+deepBatch, deepHead)]...); err != nil {
			t.Errorf("dispatch head: %v", err)
			return
		}
	}
	var wg sync.WaitGroup
	for d := 0; d < 2; d++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for lo := deepHead + d*deepTail; lo < len(specs); lo += 2 * deepTail {
				if _, err := disp.DispatchMany(ctx, specs[lo:min(lo+deepTail, len(specs))]...); err != nil {
					t.Errorf("dispatch tail: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// checkDeepLiveness judges P6 on the deep workload from when handlers
// started and ended (on any one clock): the tasks on names of their own
// must not have waited for the head, so the median of them ended before the
// last head task started.
func checkDeepLiveness(t *testing.T, seed uint64, headStarts, uniqueEnds []int64) {
	t.Helper()
	if len(headStarts) != deepHead || len(uniqueEnds) != deepUniques {
		t.Errorf("seed %d: liveness: %d head starts and %d unique ends recorded, want %d and %d",
			seed, len(headStarts), len(uniqueEnds), deepHead, deepUniques)
		return
	}
	slices.Sort(uniqueEnds)
	lastHead := slices.Max(headStarts)
	median := uniqueEnds[len(uniqueEnds)/2]
	early := 0
	for _, e := range uniqueEnds {
		if e < lastHead {
			early++
		}
	}
	t.Logf("seed %d: %d of %d tasks on names of their own ended before the last head task started", seed, early, len(uniqueEnds))
	if median >= lastHead {
		t.Errorf("seed %d: P6: the tasks on names of their own waited for the head: the median of them ended at %d, "+
			"after the last head task started at %d (%d of %d ended before)", seed, median, lastHead, early, len(uniqueEnds))
	}
}

// TestDeepLines runs an in-process fleet (3 workers, 8 slots) over a line of
// deepHead exclusive tasks on "h", some of them also on o0..o4, followed by
// tasks on o0..o4 and tasks on names of their own, and checks the promise
// as TestOrderingProperty does, and that the line on "h" did not hold up the
// tasks that do not wait on it.
func TestDeepLines(t *testing.T) {
	t.Parallel()
	for _, lc := range lockerCases {
		t.Run(lc.name, func(t *testing.T) {
			t.Parallel()
			seed := testSeed(t)
			work := deepWorkload(seed)
			f := fleet{workers: 3, slots: 8, tasks: len(work), timeout: 60 * time.Second}
			start := time.Now()
			tasks, events := f.run(t, seed, lc.new(t), func(ctx context.Context, disp *tasking.Client) {
				dispatchDeep(ctx, t, disp, work)
			})
			t.Logf("seed %d: %d tasks ran in %v", seed, len(tasks), time.Since(start).Round(time.Millisecond))
			checkPromise(t, seed, tasks, events)

			var headStarts, uniqueEnds []int64
			for _, task := range tasks {
				i, ev := taskIndex(task), events[task.ID]
				require.True(t, i >= 0 && i < len(work), "task %d: args %s", task.ID, task.Args)
				if ev == nil {
					continue // reported by checkPromise
				}
				switch work[i].kind {
				case deepKindHead:
					headStarts = append(headStarts, ev.start)
				case deepKindUnique:
					uniqueEnds = append(uniqueEnds, ev.end)
				}
			}
			checkDeepLiveness(t, seed, headStarts, uniqueEnds)
		})
	}
}

// TestDeepLinesProcesses runs the deep-lines workload on a fleet of three
// worker processes (internal/faultworker, as the fault suite does, without
// faults) on the shared test servers, with the PostgreSQL and the Redis
// locker, and judges it with the fault suite's checker: every task ran once
// and completed, no conflicting overlap, conflicting tasks in id order, each
// claimed promptly once runnable; and the line on "h" did not hold up the
// tasks on names of their own.
func TestDeepLinesProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts worker processes; skipped with -short")
	}
	bin := buildFaultWorker(t)
	for _, locker := range []string{"postgres", "redis"} {
		t.Run(locker, func(t *testing.T) {
			runDeepProcesses(t, bin, locker)
		})
	}
}

func runDeepProcesses(t *testing.T, bin, locker string) {
	seed := testSeed(t)
	const nWorkers = 3
	pool := testdb.Pool(t, 4)
	fx := &faultRun{
		t: t, sc: faultScenario{name: "deep", locker: locker}, seed: seed, bin: bin, dir: faultDir(t),
		rng:    rand.New(rand.NewPCG(seed, 0xdee9)),
		schema: testdb.Schema(t, pool),
		dsn:    testdb.DatabaseURL(), slots: 8, ttl: 5 * time.Second,
	}
	opts := []tasking.Option{tasking.WithSchema(fx.schema), tasking.WithLogger(quietLogger())}
	if locker == "redis" {
		// The Redis namespace is the schema's, so the run has its own.
		fx.redisAddr = testdb.RedisAddr()
		opts = append(opts, tasking.WithLocker(tasking.NewRedisLocker(newRedis(t, fx.redisAddr))))
	}
	fx.pool = pool
	var err error
	fx.client, err = tasking.New(pool, opts...)
	require.NoError(t, err)
	require.NoError(t, fx.client.Migrate(ctxT(t, 30*time.Second)))
	t.Cleanup(fx.killAll) // whatever happens, no process outlives the test

	work := deepWorkload(seed)
	for slot := 0; slot < nWorkers; slot++ {
		fx.startProc(slot, fmt.Sprintf("w%d", slot))
	}
	start := time.Now()
	dispatchDeep(ctxT(t, 30*time.Second), t, fx.client, work)
	dispatched := time.Since(start)
	tasks, drained := fx.drain(len(work), time.Now().Add(30*time.Second))
	ran := time.Since(start)
	fx.stopFleet()
	for _, p := range fx.procs {
		p.readEvents()
	}
	rep := checkFaultRun(tasks, len(work), fx.procs, faultFacts{})
	rep.stuck = !drained
	fx.childProblems(&rep)
	t.Logf("seed %d, %s locker: %d tasks dispatched in %v, final in %v; lost %d, duplicates %d, violations %d, "+
		"worker lost %d, lock lost %d; longest start delay: %s",
		seed, locker, len(work), dispatched.Round(time.Millisecond), ran.Round(time.Millisecond),
		rep.lost, rep.duplicates, rep.violations, rep.workerLost, rep.lockLost, rep.maxDelayTask)
	for _, p := range rep.problems {
		t.Errorf("seed %d: %s", seed, p)
	}
	if rep.stuck {
		t.Errorf("seed %d: the fleet did not drain within 30s of the last dispatch", seed)
	}
	// No faults: every task must have completed.
	for _, task := range tasks {
		if task.State != tasking.StateCompleted {
			t.Errorf("seed %d: task %d ended %s %q", seed, task.ID, task.State, task.Error)
		}
	}

	index := make(map[int64]int, len(tasks))
	for _, task := range tasks {
		index[task.ID] = taskIndex(task)
	}
	var headStarts, uniqueEnds []int64
	for _, p := range fx.procs {
		for _, r := range p.runs {
			i, ok := index[r.task]
			require.True(t, ok && i >= 0 && i < len(work), "handler run of unknown task %d", r.task)
			switch work[i].kind {
			case deepKindHead:
				headStarts = append(headStarts, r.start)
			case deepKindUnique:
				uniqueEnds = append(uniqueEnds, r.end)
			}
		}
	}
	checkDeepLiveness(t, seed, headStarts, uniqueEnds)
	if t.Failed() {
		fx.dumpLogs()
	}
}
