package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ChildEnv marks a worker child process; its value is the workerSpec as JSON.
const ChildEnv = "TASKING_BENCH_CHILD"

// fleet is the worker processes of one trial: one in this process, or
// -procs children re-executed from this binary.
type fleet struct {
	procs  []*proc
	onConn func(ev connEvent, proc int)
}

type proc struct {
	index    int
	done     atomic.Int64
	connErrs atomic.Int64 // failed connection attempts
	ready    chan struct{}
	start    chan struct{} // in-process: closed to start
	stop     func()        // asks the worker to stop
	gone     chan struct{} // closed when the worker has ended; err is set then
	err      error
	stopped  atomic.Bool // stop was called: an end after it is not a loss
	mu       sync.Mutex
	final    *procReport
	cmd      *exec.Cmd
	stdin    io.WriteCloser
}

func (p *proc) handle(m msg, onConn func(connEvent, int)) {
	if m.PID != 0 || m.Port != 0 || m.ConnErr {
		onConn(connEvent{PID: m.PID, Port: m.Port, Failed: m.ConnErr}, p.index)
		if m.ConnErr {
			p.connErrs.Add(1)
		}
	}
	if m.Ready {
		close(p.ready)
	}
	if m.Done > 0 {
		p.done.Store(m.Done)
	}
	if m.Final != nil {
		p.mu.Lock()
		p.final = m.Final
		p.mu.Unlock()
	}
}

func (p *proc) exited(err error) {
	p.err = err
	close(p.gone)
}

// startFleet starts the worker processes and waits until each is connected
// and ready; call run() to let them run.
func startFleet(ctx context.Context, specs []workerSpec, inProcess bool, onConn func(connEvent, int)) (*fleet, error) {
	f := &fleet{onConn: onConn}
	for i, s := range specs {
		p := &proc{index: i, ready: make(chan struct{}), gone: make(chan struct{})}
		f.procs = append(f.procs, p)
		if inProcess {
			p.start = make(chan struct{})
			wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
			p.stop = cancel
			var mu sync.Mutex
			go func() {
				p.exited(runWorker(wctx, s, p.start, func(m msg) { mu.Lock(); p.handle(m, onConn); mu.Unlock() }))
			}()
			continue
		}
		if err := p.spawn(s, onConn); err != nil {
			f.kill()
			return nil, err
		}
	}
	timeout := time.After(60 * time.Second)
	for i, p := range f.procs {
		select {
		case <-p.ready:
		case <-p.gone:
			f.kill()
			return nil, fmt.Errorf("worker process %d did not start: %v", i, p.err)
		case <-ctx.Done():
			f.kill()
			return nil, ctx.Err()
		case <-timeout:
			f.kill()
			return nil, fmt.Errorf("worker processes not ready after 60s (%d of %d are)", i, len(f.procs))
		}
	}
	return f, nil
}

func (p *proc) spawn(s workerSpec, onConn func(connEvent, int)) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	js, _ := json.Marshal(s)
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), ChildEnv+"="+string(js))
	if s.MaxProcs > 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("GOMAXPROCS=%d", s.MaxProcs))
	}
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	p.cmd = cmd
	p.stop = func() { p.stdin.Close() }
	var lastErr string
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			var m msg
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				continue
			}
			if m.Err != "" {
				lastErr = m.Err
			}
			p.handle(m, onConn)
		}
		err := cmd.Wait()
		if err != nil && lastErr != "" {
			err = fmt.Errorf("%v: %s", err, lastErr)
		}
		p.exited(err)
	}()
	return nil
}

// run lets every worker run.
func (f *fleet) run() {
	for _, p := range f.procs {
		if p.start != nil {
			close(p.start)
		} else {
			_, _ = io.WriteString(p.stdin, "go\n")
		}
	}
}

// done is how many handlers have returned, over all processes.
func (f *fleet) done() int64 {
	var n int64
	for _, p := range f.procs {
		n += p.done.Load()
	}
	return n
}

// connErrors is how many connection attempts of the workers failed.
func (f *fleet) connErrors() int64 {
	var n int64
	for _, p := range f.procs {
		n += p.connErrs.Load()
	}
	return n
}

// lost returns the worker processes that ended before they were asked to
// stop, with their errors.
func (f *fleet) lost() (procs []int, errs []error) {
	for _, p := range f.procs {
		select {
		case <-p.gone:
			if !p.stopped.Load() {
				procs = append(procs, p.index)
				errs = append(errs, p.err)
			}
		default:
		}
	}
	return procs, errs
}

// shutdown stops every worker and collects their reports. A worker that
// had ended before (see lost) is not an error here.
func (f *fleet) shutdown(timeout time.Duration) ([]procReport, error) {
	lost, _ := f.lost()
	for _, p := range f.procs {
		p.stopped.Store(true)
		p.stop()
	}
	var errs []error
	var reps []procReport
	deadline := time.After(timeout)
	for i, p := range f.procs {
		select {
		case <-p.gone:
			if p.err != nil && !slices.Contains(lost, i) {
				errs = append(errs, fmt.Errorf("worker process %d: %w", i, p.err))
			}
		case <-deadline:
			f.kill()
			return nil, fmt.Errorf("worker processes did not stop within %v", timeout)
		}
		p.mu.Lock()
		if p.final != nil {
			reps = append(reps, *p.final)
		}
		p.mu.Unlock()
	}
	return reps, errors.Join(errs...)
}

func (f *fleet) kill() {
	for _, p := range f.procs {
		p.stopped.Store(true)
		if p.cmd != nil && p.cmd.Process != nil {
			_ = p.cmd.Process.Kill()
		} else if p.stop != nil {
			p.stop()
		}
	}
}

// ChildMain runs a worker child process: spec from the environment, "go" on
// stdin starts it, end of stdin (or SIGINT/SIGTERM) stops it; reports go to
// stdout as JSON lines.
func ChildMain() int {
	var spec workerSpec
	if err := json.Unmarshal([]byte(os.Getenv(ChildEnv)), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "bench child: bad spec:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var mu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	emit := func(m msg) { mu.Lock(); _ = enc.Encode(m); mu.Unlock() }
	start := make(chan struct{})
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			if sc.Text() == "go" {
				close(start)
			}
		}
		cancel() // stdin closed: the bench wants us to stop (or is gone)
	}()
	if err := runWorker(ctx, spec, start, emit); err != nil {
		emit(msg{Err: err.Error()})
		return 1
	}
	return 0
}
