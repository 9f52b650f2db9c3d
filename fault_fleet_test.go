package tasking_test

// The fleet of worker processes the fault suite (fault_test.go) runs:
// starting, killing and stopping them, dispatching, draining, and reading
// the events files they leave.

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
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

// faultDir is where a scenario's events files and worker logs go: a
// directory under $TASKING_FAULT_DIR, kept after the test, when that is set
// (to read them after a failure), else a temporary one.
func faultDir(t *testing.T) string {
	root := os.Getenv("TASKING_FAULT_DIR")
	if root == "" {
		return t.TempDir()
	}
	dir := filepath.Join(root, strings.ReplaceAll(t.Name(), "/", "_")+"-"+time.Now().Format("150405.000"))
	require.NoError(t, os.MkdirAll(dir, 0o755))
	t.Logf("events files and worker logs in %s", dir)
	return dir
}

// faultProc is one worker process, from start to exit.
type faultProc struct {
	slot    int // place in the fleet; a replacement takes its victim's slot
	name    string
	events  string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error

	// Set by the test while it runs (under faultRun.mu).
	workerID int64
	pid      int
	killedAt int64      // unix ns just before SIGKILL, 0 if never killed
	stops    [][2]int64 // SIGSTOP .. SIGCONT, unix ns
	stopping bool       // the test asked it to shut down

	// Filled by readEvents after the process exited.
	runs []*handlerRun
	bad  []string // lines that make no sense
}

// handlerRun is one handler run as the events file tells it.
type handlerRun struct {
	proc     *faultProc
	task     int64
	fence    int64
	start    int64
	canceled int64 // when the handler saw its context canceled by a cancel; 0: it did not
	end      int64 // 0: no end line (the process died first)
}

// faultRun is one scenario in progress.
type faultRun struct {
	t      *testing.T
	sc     faultScenario
	seed   uint64
	rng    *rand.Rand // for fault choices, apart from the workload's
	bin    string
	dir    string
	pg     *faultenv.Postgres
	redis  *faultenv.Redis // with the Redis locker
	pool   *pgxpool.Pool
	client *tasking.Client
	schema string

	// Without pg (redis), the workers use the PostgreSQL at dsn (the Redis
	// at redisAddr, "": none): the shared test servers.
	dsn, redisAddr string
	slots          int // handler slots per worker; 0 is faultSlots
	// ttl is the workers' heartbeat TTL; 0 is faultTTL. Runs without
	// faults use a longer one: on a loaded 2-core machine a worker's
	// heartbeat can be late by a second, and a live worker declared lost
	// fails its task.
	ttl time.Duration

	// onWave, when set (by the scenario's setup), is called by the
	// dispatcher with the tasks of every wave as soon as it is stored.
	onWave func(tasks []*tasking.Task)
	// quit is closed once the fleet has drained; goroutines the scenario
	// started end then, and bg waits for them.
	quit chan struct{}
	bg   sync.WaitGroup

	mu         sync.Mutex
	procs      []*faultProc // every process ever started
	live       []*faultProc // by slot
	faults     int
	notes      []string              // what was injected, when
	outages    [][2]time.Time        // PostgreSQL or Redis down, from Stop to Start's return plus faultOutageSlack
	lockLoss   [][2]int64            // Redis lost its grants (unix ns): a restart, a FLUSHALL
	cancels    map[int64]*cancelCall // scenario 6: the cancels the test made, by task
	canceler   *canceler
	started    time.Time
	nextNumber int
}

// startProc starts a worker process in slot and waits until it registered.
func (fx *faultRun) startProc(slot int, name string) *faultProc {
	t := fx.t
	fx.mu.Lock()
	n := fx.nextNumber
	fx.nextNumber++
	fx.mu.Unlock()
	p := &faultProc{
		slot: slot, name: name,
		events:  filepath.Join(fx.dir, fmt.Sprintf("events-%02d-%s", n, name)),
		logPath: filepath.Join(fx.dir, fmt.Sprintf("worker-%02d-%s.log", n, name)),
		done:    make(chan struct{}),
	}
	logf, err := os.Create(p.logPath)
	require.NoError(t, err)
	defer logf.Close()
	// The pool's sessions carry the worker's name, so scenario 2 can find
	// them; the lock session is "tasking lock <worker id>".
	dsn, redisAddr, slots := fx.dsn, fx.redisAddr, cmp.Or(fx.slots, faultSlots)
	if fx.pg != nil {
		dsn = fx.pg.URL()
	}
	if fx.redis != nil {
		redisAddr = fx.redis.Addr()
	}
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	dsn += sep + "pool_max_conns=6&application_name=" + url.QueryEscape(name)
	args := []string{
		"-dsn", dsn, "-schema", fx.schema, "-locker", fx.sc.lockerKind(),
		"-slots", strconv.Itoa(slots), "-name", name, "-ttl", cmp.Or(fx.ttl, faultTTL).String(),
		"-poll", "200ms", "-grace", "2s", "-lock-check", "50ms",
		"-events", p.events}
	if redisAddr != "" {
		args = append(args, "-redis", redisAddr, "-redis-lease", faultLease.String())
	}
	p.cmd = exec.Command(fx.bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	require.NoError(t, p.cmd.Start())
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.done)
	}()
	fx.mu.Lock()
	p.pid = p.cmd.Process.Pid
	fx.procs = append(fx.procs, p)
	for len(fx.live) <= slot {
		fx.live = append(fx.live, nil)
	}
	fx.live[slot] = p
	fx.mu.Unlock()

	deadline := time.After(20 * time.Second)
	for pause := time.Millisecond; ; pause = min(2*pause, 20*time.Millisecond) {
		if id := p.readyID(); id != 0 {
			fx.mu.Lock()
			p.workerID = id
			fx.mu.Unlock()
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("worker %s exited during startup (%v):\n%s", name, p.waitErr, tail(p.logPath, 30))
		case <-deadline:
			t.Fatalf("worker %s not registered after 20s:\n%s", name, tail(p.logPath, 30))
		case <-time.After(pause):
		}
	}
}

// readyID returns the worker id from the process's ready line, 0 before it.
func (p *faultProc) readyID() int64 {
	f, err := os.Open(p.events)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 4 && f[0] == "ready" {
			id, _ := strconv.ParseInt(f[1], 10, 64)
			return id
		}
	}
	return 0
}

// busy returns how many handlers of the process have started and not
// ended, and how many of those hold resources (a fence above 0).
func (p *faultProc) busy() (running, holding int) {
	open := p.openRuns()
	for _, fence := range open {
		if fence > 0 {
			holding++
		}
	}
	return len(open), holding
}

// openRuns returns the fences of the tasks whose handlers have started
// and not ended in the process, by task id.
func (p *faultProc) openRuns() map[int64]int64 {
	b, err := os.ReadFile(p.events)
	if err != nil {
		return nil
	}
	fences := make(map[int64]int64)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || (f[0] != "start" && f[0] != "end") {
			continue
		}
		id, _ := strconv.ParseInt(f[1], 10, 64)
		switch {
		case len(f) == 4 && f[0] == "start":
			fences[id], _ = strconv.ParseInt(f[2], 10, 64)
		case len(f) == 3 && f[0] == "end":
			delete(fences, id)
		}
	}
	return fences
}

// fleetBusy sums busy over the live workers.
func (fx *faultRun) fleetBusy() (running, holding int) {
	fx.mu.Lock()
	live := slices.Clone(fx.live)
	fx.mu.Unlock()
	for _, p := range live {
		if p != nil {
			r, h := p.busy()
			running, holding = running+r, holding+h
		}
	}
	return running, holding
}

// pickBusy waits up to a second for a live worker (other than skip) whose
// running handlers hold resources, else one with any running handler, else
// any live worker.
func (fx *faultRun) pickBusy(skip *faultProc) *faultProc {
	deadline := time.Now().Add(time.Second)
	for {
		fx.mu.Lock()
		order := fx.rng.Perm(len(fx.live))
		cands := make([]*faultProc, 0, len(order))
		for _, i := range order {
			if p := fx.live[i]; p != nil && p != skip {
				cands = append(cands, p)
			}
		}
		fx.mu.Unlock()
		var running *faultProc
		for _, p := range cands {
			switch r, h := p.busy(); {
			case h > 0:
				return p
			case r > 0 && running == nil:
				running = p
			}
		}
		if time.Now().After(deadline) {
			if running != nil {
				return running
			}
			return cands[0]
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// note records a fault injected from at until now.
func (fx *faultRun) note(at time.Time, format string, a ...any) {
	fx.mu.Lock()
	defer fx.mu.Unlock()
	fx.faults++
	fx.notes = append(fx.notes, fmt.Sprintf("at %6.3fs: ", at.Sub(fx.started).Seconds())+fmt.Sprintf(format, a...))
}

// pause sleeps d ± 25%: the spacing between faults, drawn from the fault
// rng. Nothing waits on it for correctness.
func (fx *faultRun) pause(d time.Duration) {
	fx.mu.Lock()
	j := time.Duration(fx.rng.Int64N(int64(d)/2+1)) - d/4
	fx.mu.Unlock()
	time.Sleep(d + j)
}

// kill ends p with SIGKILL and waits for it to be gone.
func (fx *faultRun) kill(p *faultProc) {
	fx.mu.Lock()
	p.killedAt = time.Now().UnixNano()
	fx.mu.Unlock()
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	recv(fx.t, p.done, 30*time.Second)
}

// dispatch stores the workload in waves. A dispatch that fails (the server
// went away) may still have committed: the tasks of a wave are looked up
// by their "i" before the wave is sent again.
func (fx *faultRun) dispatch(ctx context.Context, specs []tasking.TaskSpec) error {
	for lo := 0; lo < len(specs); lo += faultWave {
		wave := specs[lo:min(lo+faultWave, len(specs))]
		for attempt := 0; ; attempt++ {
			tasks, err := fx.client.DispatchMany(ctx, wave...)
			if err == nil {
				if fx.onWave != nil {
					fx.onWave(tasks)
				}
				break
			}
			if ctx.Err() != nil {
				return fmt.Errorf("tasks %d..: %w", lo, err)
			}
			if stored, lerr := fx.storedIs(ctx, lo); lerr == nil && stored {
				break
			}
			time.Sleep(time.Duration(min(attempt+1, 10)) * 20 * time.Millisecond)
		}
		time.Sleep(faultWaveGap)
	}
	return nil
}

// storedIs reports whether the task with args i is stored.
func (fx *faultRun) storedIs(ctx context.Context, i int) (bool, error) {
	tasks, err := fx.listAll(ctx)
	if err != nil {
		return false, err
	}
	for _, task := range tasks {
		if taskIndex(task) == i {
			return true, nil
		}
	}
	return false, nil
}

func (fx *faultRun) listAll(ctx context.Context) ([]*tasking.Task, error) {
	var out []*tasking.Task
	var cursor int64
	for {
		page, next, err := fx.client.List(ctx, tasking.ListFilter{After: cursor, Limit: 1000})
		if err != nil {
			return nil, err
		}
		out = append(out, page...)
		if next == 0 {
			return out, nil
		}
		cursor = next
	}
}

func taskIndex(t *tasking.Task) int {
	var a struct {
		I *int `json:"i"`
	}
	if json.Unmarshal(t.Args, &a) != nil || a.I == nil {
		return -1
	}
	return *a.I
}

// drain waits until want tasks are stored and every one is final, or the
// deadline passes, and returns the tasks as last read.
func (fx *faultRun) drain(want int, deadline time.Time) ([]*tasking.Task, bool) {
	var last []*tasking.Task
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		tasks, err := fx.listAll(ctx)
		cancel()
		if err == nil {
			last = tasks
			if len(tasks) >= want && countFinal(tasks) == len(tasks) {
				return tasks, true
			}
		}
		if time.Now().After(deadline) {
			if err != nil {
				fx.t.Errorf("list tasks: %v", err)
			}
			return last, false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stopFleet shuts every live worker down gracefully (SIGCONT first, in
// case one is paused) and waits for them.
func (fx *faultRun) stopFleet() {
	fx.mu.Lock()
	live := slices.Clone(fx.live)
	for _, p := range live {
		if p != nil {
			p.stopping = true
		}
	}
	fx.mu.Unlock()
	for _, p := range live {
		if p != nil {
			_ = p.cmd.Process.Signal(syscall.SIGCONT)
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, p := range live {
		if p == nil {
			continue
		}
		select {
		case <-p.done:
		case <-time.After(20 * time.Second):
			fx.t.Errorf("worker %s (pid %d) did not stop within 20s of SIGTERM; killing it", p.name, p.pid)
			fx.kill(p)
		}
	}
}

// killAll is the last-resort cleanup: nothing outlives the test.
func (fx *faultRun) killAll() {
	fx.mu.Lock()
	procs := slices.Clone(fx.procs)
	fx.mu.Unlock()
	for _, p := range procs {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Signal(syscall.SIGCONT)
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
			select { // not recv: a stuck one must not keep the rest alive
			case <-p.done:
			case <-time.After(30 * time.Second):
				fx.t.Errorf("worker %s (pid %d) still there 30s after SIGKILL", p.name, p.pid)
			}
		}
	}
}

// childProblems adds what the processes themselves reported: a data race
// or a panic in a worker, or a worker that exited on its own.
func (fx *faultRun) childProblems(rep *faultReport) {
	for _, p := range fx.procs {
		b, _ := os.ReadFile(p.logPath)
		log := string(b)
		for _, bad := range []string{"WARNING: DATA RACE", "panic:", "fatal error:"} {
			if strings.Contains(log, bad) {
				rep.violation("worker %s (pid %d) logged %q; see %s", p.name, p.pid, bad, p.logPath)
			}
		}
		switch {
		case p.killedAt != 0:
		case !p.stopping:
			rep.violation("worker %s (pid %d) exited on its own (%v):\n%s", p.name, p.pid, p.waitErr, tail(p.logPath, 15))
		case p.waitErr != nil:
			rep.violation("worker %s (pid %d) did not shut down cleanly (%v):\n%s", p.name, p.pid, p.waitErr, tail(p.logPath, 15))
		}
		for _, b := range p.bad {
			rep.violation("worker %s events: %s", p.name, b)
		}
	}
}

func (fx *faultRun) dumpLogs() {
	for _, p := range fx.procs {
		fx.t.Logf("--- worker %s (pid %d, id %d) log tail:\n%s", p.name, p.pid, p.workerID, tail(p.logPath, 25))
	}
	if fx.pg != nil {
		fx.t.Logf("--- PostgreSQL log tail:\n%s", tail(fx.pg.LogPath(), 15))
	}
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "\t" + strings.Join(lines, "\n\t")
}

// readEvents parses the process's events file.
func (p *faultProc) readEvents() {
	f, err := os.Open(p.events)
	if err != nil {
		p.bad = append(p.bad, err.Error())
		return
	}
	defer f.Close()
	open := make(map[int64]*handlerRun)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fs := strings.Fields(line)
		num := func(i int) int64 {
			if i >= len(fs) {
				p.bad = append(p.bad, "short line "+strconv.Quote(line))
				return 0
			}
			v, err := strconv.ParseInt(fs[i], 10, 64)
			if err != nil {
				p.bad = append(p.bad, "bad number in "+strconv.Quote(line))
			}
			return v
		}
		switch {
		case len(fs) == 0:
		case fs[0] == "ready":
		case fs[0] == "start":
			r := &handlerRun{proc: p, task: num(1), fence: num(2), start: num(3)}
			if open[r.task] != nil {
				p.bad = append(p.bad, fmt.Sprintf("task %d started again while running in the same process", r.task))
			}
			open[r.task] = r
			p.runs = append(p.runs, r)
		case fs[0] == "cancel":
			id, at := num(1), num(2)
			r := open[id]
			if r == nil {
				p.bad = append(p.bad, fmt.Sprintf("cancel of task %d without a start", id))
				continue
			}
			if r.canceled != 0 {
				p.bad = append(p.bad, fmt.Sprintf("task %d saw its cancel twice", id))
			}
			r.canceled = at
		case fs[0] == "end":
			id, at := num(1), num(2)
			r := open[id]
			if r == nil {
				p.bad = append(p.bad, fmt.Sprintf("end of task %d without a start", id))
				continue
			}
			r.end = at
			delete(open, id)
		default:
			p.bad = append(p.bad, "unknown line "+strconv.Quote(line))
		}
	}
	if err := sc.Err(); err != nil {
		p.bad = append(p.bad, err.Error())
	}
}

// follow calls fn, from one goroutine, for every start, cancel and end line
// the processes append to their events files, about a millisecond after it
// was written, until fx.quit is closed.
func (fx *faultRun) follow(fn func(p *faultProc, kind string, task int64, at int64)) {
	fx.bg.Add(1)
	go func() {
		defer fx.bg.Done()
		type tail struct {
			f   *os.File
			off int64
		}
		tails := make(map[*faultProc]*tail)
		defer func() {
			for _, tl := range tails {
				tl.f.Close()
			}
		}()
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		buf := make([]byte, 64<<10)
		for {
			select {
			case <-fx.quit:
				return
			case <-tick.C:
			}
			fx.mu.Lock()
			procs := slices.Clone(fx.procs)
			fx.mu.Unlock()
			for _, p := range procs {
				tl := tails[p]
				if tl == nil {
					f, err := os.Open(p.events)
					if err != nil {
						continue
					}
					tl = &tail{f: f}
					tails[p] = tl
				}
				for {
					n, _ := tl.f.ReadAt(buf, tl.off)
					// Only whole lines: a line is one write, but a read may
					// still catch it half copied.
					whole := bytes.LastIndexByte(buf[:n], '\n') + 1
					if whole == 0 {
						break
					}
					tl.off += int64(whole)
					for _, line := range strings.Split(string(buf[:whole-1]), "\n") {
						f := strings.Fields(line)
						if len(f) < 3 || (f[0] != "start" && f[0] != "cancel" && f[0] != "end") {
							continue
						}
						id, _ := strconv.ParseInt(f[1], 10, 64)
						at, _ := strconv.ParseInt(f[len(f)-1], 10, 64)
						fn(p, f[0], id, at)
					}
					if n < len(buf) {
						break
					}
				}
			}
		}
	}()
}

// stoppedDuring reports whether the process was paused or killed while
// [from, to] (to 0: open-ended).
func (p *faultProc) stoppedDuring(from, to int64) bool {
	if to == 0 {
		to = 1<<63 - 1
	}
	if p.killedAt != 0 && p.killedAt >= from {
		return true
	}
	for _, s := range p.stops {
		if s[0] <= to && s[1] >= from {
			return true
		}
	}
	return false
}

// resumedAfter returns when the process went on after the last pause that
// overlapped [from, to], 0 when none did.
func (p *faultProc) resumedAfter(from, to int64) int64 {
	var resumed int64
	for _, s := range p.stops {
		if s[0] <= to && s[1] >= from {
			resumed = max(resumed, s[1])
		}
	}
	return resumed
}
