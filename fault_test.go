package tasking_test

// Fault injection: a fleet of worker processes (internal/faultworker) on a
// PostgreSQL of the test's own (internal/faultenv) runs random tasks over a
// small universe of resources while the test kills, pauses and disconnects
// its parts. Each worker appends "start <task> <fence> <ns>" and
// "end <task> <ns>" around every handler run to an events file, and
// "cancel <task> <ns>" in between when the handler saw its task canceled;
// once the fleet has drained, the test judges the promise (docs/design.md §1,
// §2, §8) from those files and the final task records:
//
//   - every dispatched task is stored once and is final (nothing lost), and
//     the fleet got there within a generous deadline (it kept draining);
//   - no handler ran twice;
//   - no two conflicting handlers overlapped in time, except where the
//     earlier one's process was paused or killed and its task was already
//     final when the later one started, or Redis lost the earlier one's
//     grant and its task failed "lock lost" (reported separately: that is
//     what fencing tokens are for, so an excused overlap also needs the
//     earlier handler's token to be the smaller);
//   - no handler started after its task was final;
//   - conflicting tasks started in id order: a later one only after the
//     earlier one was final (and, where both completed, after its handler
//     ended); their fencing tokens grow in id order;
//   - a task was claimed within faultStartBound of becoming runnable (its
//     earlier conflicting tasks final), outages of PostgreSQL or Redis
//     (and the reconnect backoff after them) not counted;
//   - a task that did not complete failed because a fault cut it off
//     ("worker lost", "lock lost"; where Redis lost grants, only a task
//     running then may lose its lock), which the promise allows, or was
//     canceled by the test: a task ends canceled exactly when Cancel
//     returned nil for it, a task canceled before its claim never ran, and
//     a handler running when its task was canceled saw its context done
//     with cause ErrCanceled (scenario 6 also reports how long that took).
//
// Scenarios (one subtest each, two for 6, run one after another):
//
//	0 no faults (the control: the checks must find nothing)
//	1 kill -9 of busy worker processes, several times; replacements come
//	  back under the same name (takeover) or a new one (cleanup after TTL)
//	2 pg_terminate_backend of one worker's pool, LISTEN and lock sessions
//	3 the fleet on the Redis locker (leases of a second): Redis restarts
//	  empty, is flushed, and is killed for longer than a lease
//	4 PostgreSQL restarts on the same port: a fast stop and start, then a
//	  crash and an outage longer than the heartbeat TTL
//	5 SIGSTOP of a busy worker for longer than its heartbeat TTL, then SIGCONT
//	6 Client.Cancel in every phase of a task (waiting, just claimed,
//	  running, finishing, on a killed worker), on the PostgreSQL and the
//	  Redis locker
//
// The workload is drawn from a seed (TASKING_SEED replays it); the faults
// hit whatever the fleet is doing at the time, so a replay repeats the
// tasks and the kind and number of faults, not the exact interleaving.

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/faultenv"
)

const (
	faultWorkers  = 3
	faultSlots    = 4
	faultTTL      = time.Second
	faultLease    = time.Second // the Redis locker's lease
	faultUniverse = 6           // resource names r0..r5
	faultTasks    = 300         // per scenario
	faultWave     = 6           // tasks per DispatchMany
	faultWaveGap  = 50 * time.Millisecond
	// faultDrain bounds how long the fleet may take, after the last fault
	// and the last dispatch, to make every task final.
	faultDrain = 30 * time.Second
	// faultStartBound bounds how long a runnable task (dispatched, every
	// earlier conflicting task final) may wait to be claimed (P6).
	// Wake-ups take milliseconds; the bound leaves room for a lost wake-up
	// (the fallback poll) and a loaded machine.
	faultStartBound = 3 * faultTTL
	// faultOutageSlack is added to a PostgreSQL or Redis outage for P6:
	// the time it was down does not count, nor this long after it, in
	// which workers may still be backing off (their backoff doubles up to
	// 5 s) and finding the dead connections in their pools.
	faultOutageSlack = 5 * time.Second
	// faultCancelBound bounds how long a handler may run on after its task
	// was canceled without seeing it. A lost signal is caught by the
	// worker's heartbeat (every TTL/3); the target is 50 ms (p99),
	// which is reported, not enforced.
	faultCancelBound = faultTTL
)

// faultTask is a task of the workload, before it is dispatched.
type faultTask struct {
	args         map[string]int // "ms": how long the handler works; "i": its place in the workload
	excl, shared []string
}

type faultScenario struct {
	id     int
	name   string
	locker string // the workers' -locker; "" is "postgres"
	// task, when set, adjusts each task of the workload, drawing from the
	// workload's rng.
	task func(rng *rand.Rand, t *faultTask)
	// setup, when set, runs once the fleet is up, before the dispatcher.
	setup  func(fx *faultRun)
	inject func(fx *faultRun) // runs alongside the dispatcher
}

func (sc faultScenario) lockerKind() string { return cmp.Or(sc.locker, "postgres") }

// label names the scenario in its summary line.
func (sc faultScenario) label() string {
	if sc.locker == "" {
		return strconv.Itoa(sc.id)
	}
	return fmt.Sprintf("%d (%s locker)", sc.id, sc.locker)
}

var faultScenarios = []faultScenario{
	{id: 0, name: "none", inject: func(fx *faultRun) {}},
	{id: 1, name: "kill9", inject: injectKills},
	{id: 2, name: "terminate_backends", inject: injectTerminate},
	// The fence counter does not survive a FLUSHALL or a restart, but the
	// acquire script draws tokens as max(last + 1, server time in µs), so
	// they keep growing and the fence-order check applies as it is.
	{id: 3, name: "redis_restart", locker: "redis", task: slowTasks, inject: injectRedis},
	{id: 4, name: "pg_restart", inject: injectPGRestart},
	{id: 5, name: "sigstop", inject: injectSigstop},
	// The same workload and cancels on both lockers: their cancel signals
	// travel differently (NOTIFY, Redis pub/sub).
	{id: 6, name: "cancel", task: cancelPlan, setup: setupCancels, inject: injectCancels},
	{id: 6, name: "cancel_redis", locker: "redis", task: cancelPlan, setup: setupCancels, inject: injectCancels},
}

// TestFault runs the fault scenarios. Each starts its own PostgreSQL, so it
// needs the PostgreSQL server binaries (see internal/faultenv) and Go to
// build the worker program; it is skipped under -short.
func TestFault(t *testing.T) {
	if testing.Short() {
		t.Skip("fault injection suite: starts PostgreSQL and worker processes; skipped with -short")
	}
	if faultenv.PostgresBinDir() == "" {
		t.Skip("fault injection suite: PostgreSQL server binaries not found (see internal/faultenv)")
	}
	bin := buildFaultWorker(t)
	seed := testSeed(t)
	for _, sc := range faultScenarios {
		t.Run(fmt.Sprintf("%d_%s", sc.id, sc.name), func(t *testing.T) {
			runFaultScenario(t, bin, seed, sc)
		})
	}
}

// buildFaultWorker builds internal/faultworker into a temporary directory,
// with the race detector when this test binary has it.
func buildFaultWorker(t *testing.T) string {
	t.Helper()
	gobin := filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	if _, err := os.Stat(gobin); err != nil {
		if gobin, err = exec.LookPath("go"); err != nil {
			t.Skip("fault injection suite: the go command is needed to build internal/faultworker")
		}
	}
	bin := filepath.Join(t.TempDir(), "faultworker")
	args := []string{"build", "-o", bin}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "-race" && s.Value == "true" {
				args = append(args, "-race")
			}
		}
	}
	start := time.Now()
	out, err := exec.Command(gobin, append(args, "./internal/faultworker")...).CombinedOutput()
	require.NoError(t, err, "go build ./internal/faultworker:\n%s", out)
	t.Logf("built faultworker (%s) in %v", strings.Join(args[3:], " "), time.Since(start).Round(time.Millisecond))
	return bin
}

// runFaultScenario starts PostgreSQL and the fleet, dispatches the
// workload while sc injects its faults, waits for the fleet to drain, and
// judges the run.
func runFaultScenario(t *testing.T, bin string, seed uint64, sc faultScenario) {
	start := time.Now()
	fx := &faultRun{
		t: t, sc: sc, seed: seed, bin: bin, dir: faultDir(t),
		rng:    rand.New(rand.NewPCG(seed, uint64(sc.id)<<32|0xfa17)),
		schema: "fault",
		quit:   make(chan struct{}),
	}
	fx.pg = faultenv.StartPostgres(t)
	opts := []tasking.Option{tasking.WithSchema(fx.schema), tasking.WithLogger(quietLogger())}
	if sc.locker == "redis" {
		// The test's client takes the Redis locker too, for its wake-ups
		// and cancel signals (Redis pub/sub); it never locks.
		fx.redis = faultenv.StartRedis(t)
		opts = append(opts, tasking.WithLocker(tasking.NewRedisLocker(newRedis(t, fx.redis.Addr()), tasking.WithRedisLease(faultLease))))
	}
	cfg, err := pgxpool.ParseConfig(fx.pg.URL() + "&application_name=fault-test")
	require.NoError(t, err)
	cfg.MaxConns = 4
	fx.pool, err = pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(fx.pool.Close)
	fx.client, err = tasking.New(fx.pool, opts...)
	require.NoError(t, err)
	require.NoError(t, fx.client.Migrate(ctxT(t, 30*time.Second)))
	t.Cleanup(fx.killAll) // whatever happens, no process outlives the test

	// The workload: drawn from the seed before anything runs.
	wrng := rand.New(rand.NewPCG(seed, uint64(sc.id)))
	specs := make([]tasking.TaskSpec, faultTasks)
	for i := range specs {
		var excl, shared []string
		for _, n := range wrng.Perm(faultUniverse)[:wrng.IntN(4)] {
			if wrng.IntN(3) == 0 {
				excl = append(excl, fmt.Sprintf("r%d", n))
			} else {
				shared = append(shared, fmt.Sprintf("r%d", n))
			}
		}
		ft := faultTask{args: map[string]int{"ms": 5 + wrng.IntN(46), "i": i}, excl: excl, shared: shared}
		if sc.task != nil {
			sc.task(wrng, &ft)
		}
		specs[i] = tasking.Spec("t", ft.args, tasking.Exclusive(ft.excl...), tasking.Shared(ft.shared...))
	}

	for slot := 0; slot < faultWorkers; slot++ {
		fx.startProc(slot, fmt.Sprintf("w%d", slot))
	}
	fx.started = time.Now()
	t.Logf("scenario %s: PostgreSQL and %d workers up in %v", sc.label(), faultWorkers, fx.started.Sub(start).Round(time.Millisecond))
	if sc.setup != nil {
		sc.setup(fx)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	var dispatchErr error
	dispatched := make(chan struct{})
	go func() {
		defer close(dispatched)
		dispatchErr = fx.dispatch(ctx, specs)
	}()
	t.Cleanup(func() { cancel(); recv(t, dispatched, time.Minute) }) // the dispatcher never outlives the test
	stopBg := sync.OnceFunc(func() { close(fx.quit); fx.bg.Wait() })
	t.Cleanup(stopBg) // nor does anything the scenario started
	sc.inject(fx)
	recv(t, dispatched, 3*time.Minute) // dispatch gives up after 2 minutes
	if dispatchErr != nil {
		t.Fatalf("dispatch: %v", dispatchErr)
	}
	quiet := time.Now()

	tasks, drained := fx.drain(faultTasks, quiet.Add(faultDrain))
	drainTime := time.Since(quiet)
	stopBg()
	fx.stopFleet()
	for _, p := range fx.procs {
		p.readEvents()
	}
	rep := checkFaultRun(tasks, faultTasks, fx.procs, faultFacts{outages: fx.outages, lockLoss: fx.lockLoss, cancels: fx.cancels})
	rep.faults = fx.faults
	if !drained {
		rep.stuck = true
	}
	fx.childProblems(&rep)

	t.Logf("scenario %s: tasks %d, faults %d, lost %d, duplicates %d, violations %d "+
		"(cut off: worker lost %d, lock lost %d; excused overlaps %d; drained %v after the last fault/dispatch; longest start delay: %s)%s",
		sc.label(), rep.tasks, rep.faults, rep.lost, rep.duplicates, rep.violations,
		rep.workerLost, rep.lockLost, len(rep.excused), drainTime.Round(time.Millisecond), rep.maxDelayTask, rep.cancelSummary())
	for _, n := range fx.notes {
		t.Log("  fault: " + n)
	}
	for _, e := range rep.excused {
		t.Log("  excused overlap: " + e)
	}
	if rep.failed() {
		for _, p := range rep.problems {
			t.Errorf("seed %d: %s", seed, p)
		}
		if rep.stuck {
			t.Errorf("seed %d: the fleet did not drain within %v of the last fault/dispatch", seed, faultDrain)
		}
		t.Errorf("scenario %d failed (replay the workload with TASKING_SEED=%d)", sc.id, seed)
		fx.dumpLogs()
	}
}

// Scenario 1: kill -9 busy workers several times; every replacement comes
// back at once, half of them under the victim's name (it takes the dead
// instance over: its tasks fail "worker lost" at once) and half under a new
// name (the dead instance is cleaned up after its heartbeat TTL).
func injectKills(fx *faultRun) {
	for k := 0; k < 4; k++ {
		fx.pause(600 * time.Millisecond)
		victim := fx.pickBusy(nil)
		busy, holding := victim.busy()
		at := time.Now()
		fx.kill(victim)
		name := victim.name
		if k%2 == 1 {
			name = fmt.Sprintf("w%d-%d", victim.slot, k)
		}
		fx.note(at, "kill -9 %s (worker %d, pid %d, %d handlers running, %d holding resources); replacement %q",
			victim.name, victim.workerID, victim.pid, busy, holding, name)
		fx.startProc(victim.slot, name)
	}
}

// Scenario 2: end every PostgreSQL session of one busy worker: its pool's
// (application_name is its worker name) and its lock session's ("tasking
// lock <id>"). Its handlers lose their locks and fail "lock lost"; the
// worker must reconnect and carry on.
func injectTerminate(fx *faultRun) {
	var prev *faultProc
	for k := 0; k < 3; k++ {
		fx.pause(700 * time.Millisecond)
		victim := fx.pickBusy(prev)
		prev = victim
		busy, holding := victim.busy()
		at := time.Now()
		lockName := fmt.Sprintf("tasking worker %d ", victim.workerID) // then the schema's hash
		names, err := fx.pg.TerminateBackends("application_name = $1 OR application_name LIKE $2",
			victim.name, lockName+"%")
		if err != nil {
			fx.t.Errorf("terminate backends of %s: %v", victim.name, err)
			continue
		}
		fx.note(at, "terminated %d sessions of %s (worker %d, %d handlers running, %d holding resources): %v",
			len(names), victim.name, victim.workerID, busy, holding, names)
		if !slices.ContainsFunc(names, func(n string) bool { return strings.HasPrefix(n, lockName) }) {
			fx.t.Errorf("no lock session found for worker %d (%s): %v", victim.workerID, victim.name, names)
		}
	}
}

// Scenario 4: restart PostgreSQL under the fleet: first a fast shutdown
// and an immediate start; then a crash (immediate shutdown, recovery at
// start) and an outage longer than the heartbeat TTL, so every worker looks
// dead to the first cleanup after the restart.
func injectPGRestart(fx *faultRun) {
	for k, down := range []time.Duration{0, faultTTL + faultTTL/2} {
		stop, how := fx.pg.Stop, "stop (fast)"
		if k == 1 {
			stop, how = fx.pg.Crash, "crash (immediate)"
		}
		fx.pause(time.Second)
		busy, _ := fx.fleetBusy()
		start := time.Now()
		if err := stop(); err != nil {
			fx.t.Errorf("%s PostgreSQL: %v", how, err)
		}
		time.Sleep(down) // the outage itself
		if err := fx.pg.Start(); err != nil {
			fx.t.Fatalf("start PostgreSQL again: %v", err)
		}
		fx.mu.Lock()
		fx.outages = append(fx.outages, [2]time.Time{start, time.Now().Add(faultOutageSlack)})
		fx.mu.Unlock()
		fx.note(start, "PostgreSQL %s and start: down %v (%d handlers running)", how, time.Since(start).Round(time.Millisecond), busy)
	}
}

// Scenario 5: pause a busy worker (SIGSTOP) for longer than its heartbeat
// TTL, then let it go on (SIGCONT). The fleet declares it lost and fails
// its tasks "worker lost"; when it wakes up it must cancel those handlers
// and rejoin, and its late writes must change nothing. The first pause,
// while tasks are still being dispatched, is long enough that the tasks
// queued behind the paused worker's, runnable once cleanup failed those,
// must start before it ends (P6).
func injectSigstop(fx *faultRun) {
	var prev *faultProc
	for _, pause := range []time.Duration{2*faultTTL + faultStartBound + faultTTL, faultTTL*2 + faultTTL/2} {
		fx.pause(700 * time.Millisecond)
		victim := fx.pickBusy(prev)
		prev = victim
		busy, holding := victim.busy()
		at := time.Now()
		from := at.UnixNano()
		_ = victim.cmd.Process.Signal(syscall.SIGSTOP)
		time.Sleep(pause) // the pause itself
		to := time.Now().UnixNano()
		_ = victim.cmd.Process.Signal(syscall.SIGCONT)
		fx.mu.Lock()
		victim.stops = append(victim.stops, [2]int64{from, to})
		fx.mu.Unlock()
		fx.note(at, "SIGSTOP %s (worker %d, %d handlers running, %d holding resources) for %v, then SIGCONT",
			victim.name, victim.workerID, busy, holding, time.Duration(to-from).Round(time.Millisecond))
	}
}

// slowTasks makes one task in twenty-five run 2 to 2.5 s, longer than a
// Redis lease, so that scenario 3's outage outlasts the leases of handlers
// that are still running (those must be given up, not just found missing),
// and a handler whose grant is lost runs long enough after the loss for
// the check to tell whether it was cut off. A slow task holds a name of its
// own: a chain of them on shared names would hold the fleet up for seconds.
func slowTasks(rng *rand.Rand, t *faultTask) {
	if rng.IntN(25) == 0 {
		t.args["ms"] = 2000 + rng.IntN(501)
		t.excl, t.shared = []string{fmt.Sprintf("slow%d", t.args["i"])}, nil
	}
}

// Scenario 3: the fleet runs on the Redis locker, with leases of
// faultLease, and Redis loses its grants under it: a restart (it comes back
// empty), a FLUSHALL, and a kill with an outage longer than a lease. A
// handler whose grant is gone is canceled once its worker's renewal finds
// it missing, or its lease deadline passes while Redis is down, and its
// task fails "lock lost". Until then another worker could be granted the
// names; the database's view of running tasks should keep that from
// happening, and any overlap it lets through must show in the fencing
// tokens (the earlier holder's is the smaller).
func injectRedis(fx *faultRun) {
	for _, how := range []string{"restart", "flushall", "kill", "flushall"} {
		fx.pause(700 * time.Millisecond)
		running, holding := fx.fleetBusy()
		start := time.Now()
		var err error
		switch how {
		case "restart":
			err = fx.redis.Restart()
		case "flushall":
			err = fx.redis.FlushAll()
		case "kill":
			if err = fx.redis.Kill(); err == nil {
				time.Sleep(faultLease + faultLease/2) // the outage itself
				err = fx.redis.Start()
			}
		}
		if err != nil {
			fx.t.Fatalf("Redis %s: %v", how, err)
		}
		end := time.Now()
		fx.mu.Lock()
		fx.lockLoss = append(fx.lockLoss, [2]int64{start.UnixNano(), end.UnixNano()})
		if how != "flushall" {
			fx.outages = append(fx.outages, [2]time.Time{start, end.Add(faultOutageSlack)})
		}
		fx.mu.Unlock()
		fx.note(start, "Redis %s: took %v (%d handlers running, %d holding resources)",
			how, end.Sub(start).Round(time.Millisecond), running, holding)
	}
}

// Scenario 6 cancels tasks in each phase of their life. The phase is part
// of the workload (args "cancel"), so a replay cancels the same tasks.
const (
	cancelNever      = iota
	cancelDispatched // right after its DispatchMany returned: waiting, or just claimed
	cancelStarted    // as soon as its handler's start line appears
	cancelRunning    // 5 to 30 ms into its handler, which would run 1.5 s
	cancelFinished   // as soon as its handler's end line appears: while the final state is written
	cancelKilled     // running on a worker that was just killed (chosen by the injector)
	cancelPaused     // running on a worker that is paused for longer than its TTL (chosen by the injector)
)

var cancelPhases = [...]string{"never", "dispatched", "started", "running", "finishing", "killed worker", "paused worker"}

// cancelPlan draws the phase in which a task will be canceled, if at all.
func cancelPlan(rng *rand.Rand, t *faultTask) {
	args := t.args
	switch n := rng.IntN(100); {
	case n < 14:
		args["cancel"] = cancelDispatched
	case n < 26:
		args["cancel"] = cancelStarted
	case n < 36:
		args["cancel"] = cancelRunning
		args["ms"] = 1500
	case n < 50:
		args["cancel"] = cancelFinished
	}
}

// cancelCall is one Client.Cancel the test made.
type cancelCall struct {
	phase int
	at    int64 // unix ns just before the call
	err   error
}

// canceler cancels each task in its planned phase: right after its wave
// was dispatched (in the dispatcher), or when the worker's events file
// shows its handler started or ended (followed about every millisecond).
type canceler struct {
	fx *faultRun

	mu    sync.Mutex
	phase map[int64]int      // by task id, once its wave returned
	early map[int64][]string // events seen before the task's wave returned
	calls map[int64]*cancelCall
}

func setupCancels(fx *faultRun) {
	c := &canceler{fx: fx, phase: make(map[int64]int), early: make(map[int64][]string), calls: make(map[int64]*cancelCall)}
	fx.cancels = c.calls // read once the scenario's goroutines are done
	fx.canceler = c
	fx.onWave = c.dispatched
	fx.follow(c.event)
}

func (c *canceler) dispatched(tasks []*tasking.Task) {
	for _, t := range tasks {
		var a struct {
			Cancel int `json:"cancel"`
		}
		_ = json.Unmarshal(t.Args, &a)
		c.mu.Lock()
		c.phase[t.ID] = a.Cancel
		early := c.early[t.ID]
		delete(c.early, t.ID)
		c.mu.Unlock()
		if a.Cancel == cancelDispatched {
			c.cancel(t.ID, a.Cancel)
		}
		for _, kind := range early {
			c.react(t.ID, a.Cancel, kind)
		}
	}
}

// event is the events follower's callback.
func (c *canceler) event(_ *faultProc, kind string, id, _ int64) {
	c.mu.Lock()
	phase, known := c.phase[id]
	if !known {
		c.early[id] = append(c.early[id], kind)
	}
	c.mu.Unlock()
	if known {
		c.react(id, phase, kind)
	}
}

// react cancels the task if kind is the event its phase waits for. The
// cancel runs in a goroutine of its own, so the follower keeps up.
func (c *canceler) react(id int64, phase int, kind string) {
	var delay time.Duration
	switch {
	case phase == cancelStarted && kind == "start", phase == cancelFinished && kind == "end":
	case phase == cancelRunning && kind == "start":
		c.fx.mu.Lock()
		delay = time.Duration(5+c.fx.rng.IntN(26)) * time.Millisecond
		c.fx.mu.Unlock()
	default:
		return
	}
	c.fx.bg.Add(1)
	go func() {
		defer c.fx.bg.Done()
		time.Sleep(delay)
		c.cancel(id, phase)
	}()
}

// cancel cancels task id once, recording when and what Cancel returned.
func (c *canceler) cancel(id int64, phase int) {
	call := &cancelCall{phase: phase}
	c.mu.Lock()
	if c.calls[id] != nil {
		c.mu.Unlock()
		return
	}
	c.calls[id] = call
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	call.at = time.Now().UnixNano()
	call.err = c.fx.client.Cancel(ctx, id)
}

// Scenario 6: cancel tasks in every phase (see cancelPlan), while the
// fleet runs them. Also, once, kill a busy worker and cancel the tasks its
// handlers were running: cleanup ends them canceled after its TTL. And
// once, pause a busy worker (SIGSTOP) for longer than its TTL and cancel
// the tasks its handlers run: cleanup ends them canceled, and when the
// worker goes on its handlers must stop and its late writes change nothing.
func injectCancels(fx *faultRun) {
	c := fx.canceler
	uncanceled := func(p *faultProc) (open map[int64]int64, ids []int64) {
		open = p.openRuns()
		c.mu.Lock()
		defer c.mu.Unlock()
		for id := range open {
			if c.calls[id] == nil {
				ids = append(ids, id)
			}
		}
		return open, ids
	}
	cancelOpen := func(p *faultProc, phase int) (running, canceled int) {
		open, ids := uncanceled(p)
		for _, id := range ids {
			c.cancel(id, phase) // does nothing if canceled meanwhile
		}
		return len(open), len(ids)
	}
	// pick waits up to a second for a live worker (other than skip)
	// running handlers of tasks not canceled yet.
	pick := func(skip *faultProc) *faultProc {
		for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			fx.mu.Lock()
			live := slices.Clone(fx.live)
			fx.mu.Unlock()
			for _, p := range live {
				if _, ids := uncanceled(p); p != skip && len(ids) > 0 {
					return p
				}
			}
		}
		return fx.pickBusy(skip)
	}

	fx.pause(1200 * time.Millisecond)
	victim := pick(nil)
	at := time.Now()
	fx.kill(victim)
	running, n := cancelOpen(victim, cancelKilled)
	name := victim.name + "-2"
	fx.note(at, "kill -9 %s (worker %d, pid %d, %d handlers running), then canceled %d of their tasks; replacement %q",
		victim.name, victim.workerID, victim.pid, running, n, name)
	replacement := fx.startProc(victim.slot, name)

	fx.pause(600 * time.Millisecond)
	victim = pick(replacement)
	at = time.Now()
	_ = victim.cmd.Process.Signal(syscall.SIGSTOP)
	running, n = cancelOpen(victim, cancelPaused)
	time.Sleep(2*faultTTL + faultTTL/2) // the pause itself
	to := time.Now().UnixNano()
	_ = victim.cmd.Process.Signal(syscall.SIGCONT)
	fx.mu.Lock()
	victim.stops = append(victim.stops, [2]int64{at.UnixNano(), to})
	fx.mu.Unlock()
	fx.note(at, "SIGSTOP %s (worker %d, %d handlers running), canceled %d of their tasks, SIGCONT after %v",
		victim.name, victim.workerID, running, n, time.Duration(to-at.UnixNano()).Round(time.Millisecond))
}
