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
	procs []*proc
	onPID func(pid uint32)
}

type proc struct {
	done  atomic.Int64
	ready chan struct{}
	start chan struct{} // in-process: closed to start
	stop  func()        // asks the worker to stop
	exit  chan error    // the worker's end
	mu    sync.Mutex
	final *procReport
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

func (p *proc) handle(m msg, onPID func(uint32)) {
	if m.PID != 0 {
		onPID(m.PID)
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

// startFleet starts the worker processes and waits until each is connected
// and ready; call go() to let them run.
func startFleet(ctx context.Context, specs []workerSpec, inProcess bool, onPID func(uint32)) (*fleet, error) {
	f := &fleet{onPID: onPID}
	for _, s := range specs {
		p := &proc{ready: make(chan struct{}), exit: make(chan error, 1)}
		f.procs = append(f.procs, p)
		if inProcess {
			p.start = make(chan struct{})
			wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
			p.stop = cancel
			var mu sync.Mutex
			go func() {
				p.exit <- runWorker(wctx, s, p.start, func(m msg) { mu.Lock(); p.handle(m, onPID); mu.Unlock() })
			}()
			continue
		}
		if err := p.spawn(s, onPID); err != nil {
			f.kill()
			return nil, err
		}
	}
	for i, p := range f.procs {
		select {
		case <-p.ready:
		case err := <-p.exit:
			f.kill()
			return nil, fmt.Errorf("worker process %d did not start: %v", i, err)
		case <-ctx.Done():
			f.kill()
			return nil, ctx.Err()
		case <-time.After(60 * time.Second):
			f.kill()
			return nil, fmt.Errorf("worker process %d not ready after 60s", i)
		}
	}
	return f, nil
}

func (p *proc) spawn(s workerSpec, onPID func(uint32)) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	js, _ := json.Marshal(s)
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), ChildEnv+"="+string(js))
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
			p.handle(m, onPID)
		}
		err := cmd.Wait()
		if err != nil && lastErr != "" {
			err = fmt.Errorf("%v: %s", err, lastErr)
		}
		p.exit <- err
	}()
	return nil
}

// go lets every worker run.
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

// shutdown stops every worker and collects their reports.
func (f *fleet) shutdown(timeout time.Duration) ([]procReport, error) {
	for _, p := range f.procs {
		p.stop()
	}
	var errs []error
	var reps []procReport
	deadline := time.After(timeout)
	for i, p := range f.procs {
		select {
		case err := <-p.exit:
			if err != nil {
				errs = append(errs, fmt.Errorf("worker process %d: %w", i, err))
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
