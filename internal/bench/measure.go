package bench

import (
	"bufio"
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// groupStats is what the tasks table says about the tasks of one name (or
// all of them): the database clock only.
type groupStats struct {
	Tasks      int64   `json:"tasks"`
	Completed  int64   `json:"completed"`
	Failed     int64   `json:"failed"`
	Seconds    float64 `json:"seconds"`     // last finish − first start
	Rate       float64 `json:"tasks_per_s"` // completed / Seconds
	WaitP50    float64 `json:"wait_p50_ms"` // started − created
	WaitP95    float64 `json:"wait_p95_ms"`
	WaitP99    float64 `json:"wait_p99_ms"`
	FirstStart time.Time
	LastFinish time.Time
}

// tableStats reads per-name and overall figures from the tasks table.
func tableStats(ctx context.Context, mon *pgxpool.Pool, schema string) (all groupStats, byName map[string]groupStats, err error) {
	q := pgx.Identifier{schema}.Sanitize()
	rows, err := mon.Query(ctx, `SELECT coalesce(name, ''), count(*),
			count(*) FILTER (WHERE state = 'completed'), count(*) FILTER (WHERE state = 'failed'),
			coalesce(min(started_at), 'epoch'), coalesce(max(finished_at) FILTER (WHERE state = 'completed'), 'epoch'),
			coalesce(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
				(ORDER BY extract(epoch FROM started_at - created_at) * 1000), '{0,0,0}')
		FROM `+q+`.tasks GROUP BY ROLLUP (name)`)
	if err != nil {
		return all, nil, err
	}
	defer rows.Close()
	byName = make(map[string]groupStats)
	for rows.Next() {
		var name string
		var g groupStats
		var pct []float64
		if err := rows.Scan(&name, &g.Tasks, &g.Completed, &g.Failed, &g.FirstStart, &g.LastFinish, &pct); err != nil {
			return all, nil, err
		}
		g.WaitP50, g.WaitP95, g.WaitP99 = pct[0], pct[1], pct[2]
		g.Seconds = g.LastFinish.Sub(g.FirstStart).Seconds()
		if g.Seconds > 0 {
			g.Rate = float64(g.Completed) / g.Seconds
		}
		if name == "" {
			all = g
		} else {
			byName[name] = g
		}
	}
	return all, byName, rows.Err()
}

// buckets counts the tasks finished in each 100 ms from t0.
func buckets(ctx context.Context, mon *pgxpool.Pool, schema string, t0 time.Time) ([]int, error) {
	q := pgx.Identifier{schema}.Sanitize()
	rows, err := mon.Query(ctx, `SELECT floor(extract(epoch FROM finished_at - $1::timestamptz) * 10)::int AS b, count(*)
		FROM `+q+`.tasks WHERE state = 'completed' AND finished_at >= $1 GROUP BY b ORDER BY b`, t0)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []int
	for rows.Next() {
		var b, n int
		if err := rows.Scan(&b, &n); err != nil {
			return nil, err
		}
		for len(out) <= b {
			out = append(out, 0)
		}
		out[b] = n
	}
	return out, rows.Err()
}

// unfinished counts tasks not yet final.
func unfinished(ctx context.Context, mon *pgxpool.Pool, schema string) (int64, error) {
	var n int64
	err := mon.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{schema}.Sanitize()+
		`.tasks WHERE state IN ('waiting', 'running', 'canceling')`).Scan(&n)
	return n, err
}

// pgssCalls sums pg_stat_statements' calls of the statements that name the
// schema, or returns ok=false when the extension is not usable here.
func pgssCalls(ctx context.Context, mon *pgxpool.Pool, schema string) (calls int64, ok bool) {
	err := mon.QueryRow(ctx, `SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
		WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND strpos(query, $1) > 0`, schema).Scan(&calls)
	return calls, err == nil
}

// sampler watches the bench's own backends: how many are connected (peak,
// from pg_stat_activity) and how much CPU each has used (/proc/<pid>/stat,
// when PostgreSQL runs on this machine).
type sampler struct {
	mon *pgxpool.Pool

	mu    sync.Mutex
	pids  map[uint32]string // pid -> "dispatch" or "worker"
	cpu   map[uint32]float64
	peak  int
	now   int
	procs bool // /proc readable for the backends
}

func newSampler(mon *pgxpool.Pool) *sampler {
	return &sampler{mon: mon, pids: make(map[uint32]string), cpu: make(map[uint32]float64)}
}

func (s *sampler) add(pid uint32, role string) {
	s.mu.Lock()
	s.pids[pid] = role
	s.mu.Unlock()
}

func (s *sampler) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.sample(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *sampler) sample(ctx context.Context) {
	s.mu.Lock()
	pids := make([]int32, 0, len(s.pids))
	for p := range s.pids {
		pids = append(pids, int32(p))
	}
	s.mu.Unlock()
	if len(pids) == 0 {
		return
	}
	var n int
	if err := s.mon.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)`, pids).Scan(&n); err != nil {
		return
	}
	cpus := make(map[uint32]float64, len(pids))
	for _, p := range pids {
		if c, ok := procCPU(int(p)); ok {
			cpus[uint32(p)] = c
		}
	}
	s.mu.Lock()
	s.now = n
	s.peak = max(s.peak, n)
	for p, c := range cpus {
		s.cpu[p] = max(s.cpu[p], c)
		s.procs = true
	}
	s.mu.Unlock()
}

// backendCPU sums the CPU seconds of the bench's backends by role.
func (s *sampler) backendCPU() (dispatch, worker float64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for p, c := range s.cpu {
		if s.pids[p] == "dispatch" {
			dispatch += c
		} else {
			worker += c
		}
	}
	return dispatch, worker, s.procs
}

func (s *sampler) conns() (now, peak int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.now, s.peak
}

var clockTick = 100.0 // USER_HZ; 100 on every Linux this runs on

// procCPU reads a process's user+system CPU seconds from /proc.
func procCPU(pid int) (float64, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, false
	}
	u, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return (u + st) / clockTick, true
}

// machineCPU returns the busy and total jiffies of the whole machine.
func machineCPU() (busy, total float64) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return 0, 0
	}
	fs := strings.Fields(sc.Text())
	for i, v := range fs[1:] {
		x, _ := strconv.ParseFloat(v, 64)
		if i >= 7 { // guest time is already in user
			break
		}
		total += x
		if i != 3 && i != 4 { // idle, iowait
			busy += x
		}
	}
	return busy, total
}
