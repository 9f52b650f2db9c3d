package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/redis/rueidis"

	"github.com/tasking-go/tasking"
)

// DispatchChildEnv marks a dispatching child process (stream mode with
// -dispatch-procs); it reads its dispatchSpec as JSON from stdin (a share
// of a long stream is too large for the environment).
const DispatchChildEnv = "TASKING_BENCH_DISPATCH_CHILD"

// dispatchSpec is what one dispatching process sends: its share of the
// stream (every procs-th task), paced on the stream's common clock, so the
// processes together dispatch the stream one process would.
type dispatchSpec struct {
	DSN, Schema, Locker, Redis string
	Tasks                      []streamTask
	Rate                       float64   // of the whole stream, tasks/s; 0: as fast as it can
	Start                      time.Time // the stream's time zero
	Dispatchers                int       // Dispatch loops in this process
	LogLevel                   string
}

// streamTask is one task of a stream: Seq is its place in the whole stream
// (it is due at Start + Seq/Rate).
type streamTask struct {
	Seq       int64
	Name      string
	Exclusive []string `json:",omitempty"`
	Shared    []string `json:",omitempty"`
}

// dispatchMsg is a dispatching child's report line: Dispatched so far, or
// Err once it failed.
type dispatchMsg struct {
	Dispatched int64  `json:",omitempty"`
	Err        string `json:",omitempty"`
}

// dispatchStreamProcs runs the stream from cfg.DispatchProcs child
// processes, cfg.Dispatchers loops in all, and adds what they report to
// t.dispatched as they go.
func (t *trial) dispatchStreamProcs(ctx context.Context, all []streamTask) error {
	n := t.cfg.DispatchProcs
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	// Time zero is a little ahead, so that every process is connected when
	// the first task is due.
	start := time.Now().Add(time.Second)
	errc := make(chan error, n)
	var wg sync.WaitGroup
	for k := range n {
		spec := dispatchSpec{DSN: t.cfg.DSN, Schema: t.schema, Locker: t.locker, Redis: t.cfg.Redis,
			Rate: t.cfg.Rate, Start: start, Dispatchers: max(1, t.cfg.Dispatchers/n), LogLevel: t.cfg.LogLevel}
		if k < t.cfg.Dispatchers%n {
			spec.Dispatchers++
		}
		for i := k; i < len(all); i += n {
			spec.Tasks = append(spec.Tasks, all[i])
		}
		js, err := json.Marshal(spec)
		if err != nil {
			return err
		}
		cmd := exec.CommandContext(ctx, exe)
		cmd.Env = append(os.Environ(), DispatchChildEnv+"=1")
		cmd.Stdin = bytes.NewReader(js)
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var seen int64
			var failed string
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				var m dispatchMsg
				if json.Unmarshal(sc.Bytes(), &m) != nil {
					continue
				}
				if m.Dispatched > seen {
					t.dispatched.Add(m.Dispatched - seen)
					seen = m.Dispatched
				}
				if m.Err != "" {
					failed = m.Err
				}
			}
			if err := cmd.Wait(); err != nil || failed != "" {
				errc <- fmt.Errorf("dispatching process %d: %v %s", k, err, failed)
			}
		}()
	}
	wg.Wait()
	close(errc)
	return errors.Join(drain(errc)...)
}

// dispatchPaced calls Dispatch once per task from loops goroutines; with
// rate > 0, a task is due at start + Seq/rate. done counts the dispatched.
func dispatchPaced(ctx context.Context, c *tasking.Client, tasks []streamTask, loops int, rate float64, start time.Time, done *atomic.Int64) error {
	var next atomic.Int64
	errc := make(chan error, loops)
	var wg sync.WaitGroup
	for range loops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(len(tasks)) {
					return
				}
				s := tasks[i]
				if rate > 0 {
					due := start.Add(time.Duration(float64(s.Seq) / rate * float64(time.Second)))
					if err := sleep(ctx, time.Until(due)); err != nil {
						errc <- err
						return
					}
				}
				if _, err := c.Dispatch(ctx, s.Name, nil, tasking.Exclusive(s.Exclusive...), tasking.Shared(s.Shared...)); err != nil {
					errc <- fmt.Errorf("dispatch: %w", err)
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errc)
	return <-errc
}

// streamTasks is the stream of specs, numbered in order. The workloads
// dispatch no arguments.
func streamTasks(specs []tasking.TaskSpec) []streamTask {
	out := make([]streamTask, len(specs))
	for i, s := range specs {
		out[i] = streamTask{Seq: int64(i), Name: s.Name, Exclusive: s.Exclusive, Shared: s.Shared}
	}
	return out
}

func drain(errc <-chan error) []error {
	var errs []error
	for err := range errc {
		errs = append(errs, err)
	}
	return errs
}

// DispatchChildMain runs a dispatching child process: spec from the
// environment, a report line on stdout every 100 ms and at the end.
func DispatchChildMain() int {
	var spec dispatchSpec
	if err := json.NewDecoder(os.Stdin).Decode(&spec); err != nil {
		fmt.Fprintln(os.Stderr, "bench dispatch child: bad spec:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	enc := json.NewEncoder(os.Stdout)
	var done atomic.Int64
	err := dispatchChild(ctx, spec, &done, func() { _ = enc.Encode(dispatchMsg{Dispatched: done.Load()}) })
	if err != nil {
		_ = enc.Encode(dispatchMsg{Dispatched: done.Load(), Err: err.Error()})
		return 1
	}
	_ = enc.Encode(dispatchMsg{Dispatched: done.Load()})
	return 0
}

func dispatchChild(ctx context.Context, spec dispatchSpec, done *atomic.Int64, report func()) error {
	pool, err := newPool(ctx, spec.DSN, int32(spec.Dispatchers+1), nil, "tasking_bench dispatch")
	if err != nil {
		return err
	}
	defer pool.Close()
	locker := tasking.NewPostgresLocker()
	if spec.Locker == "redis" {
		rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{spec.Redis}})
		if err != nil {
			return fmt.Errorf("redis at %s: %w", spec.Redis, err)
		}
		defer rdb.Close()
		locker = tasking.NewRedisLocker(rdb, tasking.WithRedisNamespace(spec.Schema))
	}
	c, err := tasking.New(pool, tasking.WithSchema(spec.Schema), tasking.WithLocker(locker), tasking.WithLogger(logger(spec.LogLevel)))
	if err != nil {
		return err
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	finished := make(chan struct{})
	go func() {
		for {
			select {
			case <-tick.C:
				report()
			case <-finished:
				return
			}
		}
	}()
	defer close(finished)
	if err := warmDispatch(ctx, c, pool, spec.Schema, spec.Dispatchers); err != nil {
		return err
	}
	if err := sleep(ctx, time.Until(spec.Start)); err != nil {
		return err
	}
	if err := dispatchPaced(ctx, c, spec.Tasks, spec.Dispatchers, spec.Rate, spec.Start, done); err != nil {
		return err
	}
	// The last wake-ups go out before the pool closes.
	return c.Close(ctx)
}
