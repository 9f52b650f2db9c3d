package dashboard

import (
	"bytes"
	"encoding/json"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/tasking-go/tasking"
)

// The JSON API's shapes. Times are RFC 3339, durations in seconds.

// TaskView is a task as the API shows it.
type TaskView struct {
	ID         int64           `json:"id"`
	Name       string          `json:"name"`
	State      tasking.State   `json:"state"`
	Args       json.RawMessage `json:"args"`
	Result     json.RawMessage `json:"result,omitempty"`
	Error      string          `json:"error,omitempty"`
	Exclusive  []string        `json:"exclusive"`
	Shared     []string        `json:"shared"`
	WorkerID   int64           `json:"worker_id,omitempty"`
	Timeout    float64         `json:"timeout_seconds,omitempty"`
	CreatedAt  time.Time       `json:"created_at"`
	StartedAt  *time.Time      `json:"started_at,omitempty"`
	FinishedAt *time.Time      `json:"finished_at,omitempty"`
}

func taskView(t *tasking.Task) TaskView {
	v := TaskView{
		ID: t.ID, Name: t.Name, State: t.State, Args: t.Args, Result: t.Result, Error: t.Error,
		Exclusive: nonNil(t.Exclusive), Shared: nonNil(t.Shared), WorkerID: t.WorkerID,
		Timeout: t.Timeout.Seconds(), CreatedAt: t.CreatedAt,
	}
	if len(v.Args) == 0 {
		v.Args = json.RawMessage("null")
	}
	if !t.StartedAt.IsZero() {
		v.StartedAt = &t.StartedAt
	}
	if !t.FinishedAt.IsZero() {
		v.FinishedAt = &t.FinishedAt
	}
	return v
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// TaskList is a page of tasks; Next is the cursor of the next page (0: none).
type TaskList struct {
	Tasks []TaskView `json:"tasks"`
	Next  int64      `json:"next,omitempty"`
}

// TaskDetail is a task with, while it waits, what it waits for.
type TaskDetail struct {
	Task TaskView  `json:"task"`
	Wait *WaitView `json:"wait,omitempty"`
	Live int       `json:"live_workers"`
}

// WaitView is [tasking.WaitReport] for the API.
type WaitView struct {
	Ready     bool           `json:"ready"`
	Unhandled bool           `json:"unhandled"`
	Resources []ResourceView `json:"resources"`
}

// ResourceView is one resource of a waiting task.
type ResourceView struct {
	Resource       string        `json:"resource"`
	Exclusive      bool          `json:"exclusive"`
	Blocked        bool          `json:"blocked"`
	HandoffPending bool          `json:"handoff_pending,omitempty"`
	Total          int           `json:"total"`
	Ahead          []BlockerView `json:"ahead"`
}

// BlockerView is a task ahead.
type BlockerView struct {
	ID        int64         `json:"id"`
	Name      string        `json:"name"`
	State     tasking.State `json:"state"`
	Exclusive bool          `json:"exclusive"`
	WorkerID  int64         `json:"worker_id,omitempty"`
}

func waitView(rep *tasking.WaitReport) *WaitView {
	if rep.Task.State != tasking.StateWaiting {
		return nil
	}
	v := &WaitView{Ready: rep.Ready, Unhandled: rep.Unhandled, Resources: []ResourceView{}}
	for _, r := range rep.Resources {
		rv := ResourceView{Resource: r.Resource, Exclusive: r.Exclusive, Blocked: r.Blocked,
			HandoffPending: r.HandoffPending(), Total: r.Total, Ahead: []BlockerView{}}
		for _, b := range r.Ahead {
			rv.Ahead = append(rv.Ahead, BlockerView{ID: b.ID, Name: b.Name, State: b.State, Exclusive: b.Exclusive, WorkerID: b.WorkerID})
		}
		v.Resources = append(v.Resources, rv)
	}
	return v
}

// StatsView is [tasking.Stats] for the API.
type StatsView struct {
	At      time.Time               `json:"at"`
	States  map[tasking.State]int64 `json:"states"`
	Names   []NameView              `json:"names"`
	Workers []WorkerView            `json:"workers"`
}

// NameView is one task name's counts.
type NameView struct {
	Name          string                  `json:"name"`
	States        map[tasking.State]int64 `json:"states"`
	OldestWaiting float64                 `json:"oldest_waiting_seconds"`
	Unhandled     bool                    `json:"unhandled"`
}

// WorkerView is a worker for the API.
type WorkerView struct {
	ID          int64     `json:"id"`
	Name        string    `json:"name"`
	Host        string    `json:"host"`
	PID         int       `json:"pid"`
	Locker      string    `json:"locker"`
	Handles     []string  `json:"handles"`
	Slots       int       `json:"slots"`
	Busy        int       `json:"busy"`
	StartedAt   time.Time `json:"started_at"`
	HeartbeatAt time.Time `json:"heartbeat_at"`
	Live        bool      `json:"live"`
}

func workerViews(ws []tasking.WorkerInfo) []WorkerView {
	out := []WorkerView{}
	for _, w := range ws {
		out = append(out, WorkerView{ID: w.ID, Name: w.Name, Host: w.Host, PID: w.PID, Locker: w.Locker,
			Handles: nonNil(w.Handles), Slots: w.Slots, Busy: w.Busy, StartedAt: w.StartedAt,
			HeartbeatAt: w.HeartbeatAt, Live: w.Live})
	}
	return out
}

func statsView(st *tasking.Stats) StatsView {
	v := StatsView{At: st.At, States: st.States, Names: []NameView{}, Workers: workerViews(st.Workers)}
	for _, n := range st.Names {
		v.Names = append(v.Names, NameView{Name: n.Name, States: n.States,
			OldestWaiting: n.OldestWaiting.Seconds(), Unhandled: n.Unhandled})
	}
	return v
}

// filter reads a task list's filter from the query string.
func filter(r *http.Request, pageSize int) (tasking.ListFilter, error) {
	q := r.URL.Query()
	f := tasking.ListFilter{State: tasking.State(q.Get("state")), Name: q.Get("name"), Resource: q.Get("resource"), Limit: pageSize}
	if a := q.Get("after"); a != "" {
		n, err := strconv.ParseInt(a, 10, 64)
		if err != nil || n < 0 {
			return f, &tasking.InputError{Field: "after", Problem: "not a task id: " + a}
		}
		f.After = n
	}
	return f, nil
}

func parseLimit(s string) (int, error) { return strconv.Atoi(s) }

// states lists the states in their life order, for tables and filters.
var states = []tasking.State{tasking.StateScheduled, tasking.StateWaiting, tasking.StateRetrying,
	tasking.StateRunning, tasking.StateCanceling, tasking.StateCompleted, tasking.StateFailed, tasking.StateCanceled}

// workerTable is the data of the workers table, which two pages show.
type workerTable struct {
	Base    string
	Workers []tasking.WorkerInfo
}

var funcs = template.FuncMap{
	"workerRows": func(base string, ws []tasking.WorkerInfo) workerTable { return workerTable{base, ws} },
	"states":     func() []tasking.State { return states },
	"count":      func(m map[tasking.State]int64, s tasking.State) int64 { return m[s] },
	"age": func(d time.Duration) string {
		if d == 0 {
			return ""
		}
		return d.Round(time.Second).String()
	},
	"when": func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.UTC().Format("2006-01-02 15:04:05.000")
	},
	"ptime": func(t *time.Time) string {
		if t == nil {
			return ""
		}
		return t.UTC().Format("2006-01-02 15:04:05.000")
	},
	"pretty": func(b json.RawMessage) string {
		var out bytes.Buffer
		if len(b) == 0 || json.Indent(&out, b, "", "  ") != nil {
			return string(b)
		}
		return out.String()
	},
	"query": func(f tasking.ListFilter, after int64) string {
		v := url.Values{}
		if f.State != "" {
			v.Set("state", string(f.State))
		}
		if f.Name != "" {
			v.Set("name", f.Name)
		}
		if f.Resource != "" {
			v.Set("resource", f.Resource)
		}
		if after > 0 {
			v.Set("after", strconv.FormatInt(after, 10))
		}
		return v.Encode()
	},
	"cancelable": func(s tasking.State) bool {
		return s == tasking.StateWaiting || s == tasking.StateRunning || s == tasking.StateScheduled || s == tasking.StateRetrying
	},
	"mode": func(excl bool) string {
		if excl {
			return "exclusive"
		}
		return "shared"
	},
	"pct": func(a, b int) string {
		if b == 0 {
			return "?"
		}
		return fmt.Sprintf("%d%%", a*100/b)
	},
}
