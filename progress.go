package tasking

import (
	"context"
	"encoding/json"
	"sync"
	"time"
)

// Progress reports: a running handler says how far it has got, in one or
// more named reports (a download and an import, say). Reports are kept on
// the running task in memory; the worker writes the changed ones of all its
// tasks in one statement at most every progressEvery, and the last reports
// of a task go to the database with its final state, in the step that
// writes it (step.go). A handler that reports in a tight loop therefore
// costs its worker a few writes a second, not one per call.

// ProgressState is the state of one progress report.
type ProgressState string

// The states of a progress report. An empty state is taken as running.
const (
	ProgressWaiting   ProgressState = "waiting"
	ProgressRunning   ProgressState = "running"
	ProgressCompleted ProgressState = "completed"
	ProgressFailed    ProgressState = "failed"
	ProgressCanceled  ProgressState = "canceled"
	ProgressSkipped   ProgressState = "skipped"
)

// Limits on progress reports. Larger input is rejected with an [*InputError].
const (
	MaxProgressReports    = 64   // distinct report names per task
	MaxProgressNameLen    = 255  // bytes
	MaxProgressMessageLen = 4096 // bytes
)

// Progress is one named progress report of a running task.
type Progress struct {
	Name    string        `json:"name"`              // identifies the report within its task
	Message string        `json:"message,omitempty"` // for people: "Downloading artifacts"
	Done    int64         `json:"done"`              // units done so far
	Total   int64         `json:"total,omitempty"`   // units in all, 0 when unknown
	State   ProgressState `json:"state"`
}

// progressEvery is the least time between two progress writes of a worker.
const progressEvery = 250 * time.Millisecond

// ReportProgress sets the report named p.Name of the running task (adding
// it, after the others, the first time a name is used). Call it from the
// handler on the task it was given, as often as you like: the worker
// writes the latest reports of its tasks at most every 250 ms, in one
// statement for all of them, and the last reports are written with the
// task's final state. [Client.Get] and [Client.List] show them in
// [Task.Progress] while the task runs. It returns [ErrNotRunning] on a task
// that no handler of this process runs, or whose handler has returned.
func (t *Task) ReportProgress(p Progress) error {
	if t.live == nil {
		return ErrNotRunning
	}
	if err := checkProgress(&p); err != nil {
		return err
	}
	l := t.live
	l.mu.Lock()
	if l.ended {
		l.mu.Unlock()
		return ErrNotRunning
	}
	i := 0
	for i < len(l.progress) && l.progress[i].Name != p.Name {
		i++
	}
	if i == len(l.progress) {
		if i == MaxProgressReports {
			l.mu.Unlock()
			return inputErr("progress", "more than %d reports (MaxProgressReports)", MaxProgressReports)
		}
		l.progress = append(l.progress, p)
	} else {
		l.progress[i] = p
	}
	first := !l.dirty
	l.dirty = true
	mark := l.mark
	l.mu.Unlock()
	if first && mark != nil {
		mark(t)
	}
	return nil
}

func checkProgress(p *Progress) error {
	if err := checkName("progress name", p.Name, MaxProgressNameLen); err != nil {
		return err
	}
	if p.Message != "" {
		if err := checkName("progress message", p.Message, MaxProgressMessageLen); err != nil {
			return err
		}
	}
	if p.Done < 0 || p.Total < 0 {
		return inputErr("progress", "done %d and total %d must not be negative", p.Done, p.Total)
	}
	switch p.State {
	case "":
		p.State = ProgressRunning
	case ProgressWaiting, ProgressRunning, ProgressCompleted, ProgressFailed, ProgressCanceled, ProgressSkipped:
	default:
		return inputErr("progress state", "unknown state %q", p.State)
	}
	return nil
}

// snapshotProgress returns the task's reports as JSON (nil when it has
// none) and marks them written.
func (l *liveTask) snapshotProgress() json.RawMessage {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.dirty = false
	if len(l.progress) == 0 {
		return nil
	}
	b, _ := json.Marshal(l.progress) // plain strings and numbers: cannot fail
	return b
}

// endProgress is snapshotProgress for the last time: the handler returned,
// and later reports are refused.
func (l *liveTask) endProgress() json.RawMessage {
	l.mu.Lock()
	l.ended = true
	l.mu.Unlock()
	return l.snapshotProgress()
}

// progressFlusher writes the changed reports of a worker's running tasks.
type progressFlusher struct {
	mu    sync.Mutex
	dirty map[int64]*Task
	kick  chan struct{}
}

func newProgressFlusher() *progressFlusher {
	return &progressFlusher{dirty: make(map[int64]*Task), kick: make(chan struct{}, 1)}
}

// mark queues t's reports for the next write.
func (f *progressFlusher) mark(t *Task) {
	f.mu.Lock()
	f.dirty[t.ID] = t
	f.mu.Unlock()
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

// forget drops t from the next write: its last reports go with its outcome.
func (f *progressFlusher) forget(t *Task) {
	f.mu.Lock()
	delete(f.dirty, t.ID)
	f.mu.Unlock()
}

// flushProgress writes queued reports until ctx is done: at once when the
// first report arrives, then at most once per progressEvery.
func (r *run) flushProgress(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.progress.kick:
		}
		r.writeProgress(ctx)
		sleepCtx(ctx, progressEvery)
	}
}

// writeProgress writes the queued reports in one statement, guarded by
// worker, epoch and state: a task this worker no longer runs (its claim was
// lost, or its final state is written) is not touched.
func (r *run) writeProgress(ctx context.Context) {
	f := r.progress
	f.mu.Lock()
	tasks := make([]*Task, 0, len(f.dirty))
	for id, t := range f.dirty {
		tasks = append(tasks, t)
		delete(f.dirty, id)
	}
	f.mu.Unlock()
	if len(tasks) == 0 {
		return
	}
	ids, epochs, reports := make([]int64, len(tasks)), make([]int32, len(tasks)), make([]string, len(tasks))
	for i, t := range tasks {
		ids[i], epochs[i], reports[i] = t.ID, int32(t.Epoch), string(t.live.snapshotProgress())
	}
	if _, err := r.conn.Exec(ctx, r.c.q.progress, r.id, ids, epochs, reports); err != nil {
		if ctx.Err() == nil {
			r.log.Warn("tasking: write progress reports; retrying with the next report", "err", err)
		}
		// Written with the next report, or with the final state.
		for _, t := range tasks {
			t.live.mu.Lock()
			again := !t.live.ended
			t.live.dirty = again
			t.live.mu.Unlock()
			if again {
				f.mark(t)
			}
		}
	}
}
