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

// steadyStats is the rate of a fleet once every worker process is running:
// from the moment the last of procs workers started its first task (from
// takes that many seconds after the first start) to the last finish. A
// fleet's first seconds are the start-up of its processes (connections,
// the first statements' plans); a fleet that runs for hours sees the
// steady rate. procs leaves out the processes that ended early; a worker
// is a workers row, so a process that rejoined under a new id counts
// twice. A drain not cut off by -max-drain ends with a tail of fewer tasks
// than slots, so the figure is meant for capped fleet runs. ok is false
// when fewer than procs workers started a task.
func steadyStats(ctx context.Context, mon *pgxpool.Pool, schema string, procs int, all groupStats) (rate, from float64, ok bool, err error) {
	q := pgx.Identifier{schema}.Sanitize()
	var workers int
	var last time.Time
	err = mon.QueryRow(ctx, `SELECT count(*), coalesce(max(first), 'epoch')
		FROM (SELECT min(started_at) AS first FROM `+q+`.tasks
		       WHERE worker_id IS NOT NULL AND started_at IS NOT NULL GROUP BY worker_id) f`).Scan(&workers, &last)
	if err != nil || workers < procs || !last.Before(all.LastFinish) {
		return 0, 0, false, err
	}
	var n int64
	if err = mon.QueryRow(ctx, `SELECT count(*) FROM `+q+`.tasks
		WHERE state = 'completed' AND finished_at > $1 AND finished_at <= $2`, last, all.LastFinish).Scan(&n); err != nil {
		return 0, 0, false, err
	}
	return float64(n) / all.LastFinish.Sub(last).Seconds(), last.Sub(all.FirstStart).Seconds(), true, nil
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

// Owners of a backend other than a worker process (whose index is >= 0).
const (
	ownerDispatch = -1 // the dispatching pool
	ownerBouncer  = -2 // a server connection of the bench's PgBouncer
)

// sampler watches the bench's own backends: how many are connected (peak,
// from pg_stat_activity), in all and per worker process, and how much CPU
// each has used (/proc/<pid>/stat, when PostgreSQL runs on this machine).
//
// A backend belongs to whoever opened it: every process's pgx tracer
// reports the backend pid of each connection it opens (the PostgreSQL
// locker's lock connection and the LISTEN connection copy the pool's
// ConnConfig, so their tracer too), so the count does not depend on
// application_name, which the locker sets on its lock connection. Through
// PgBouncer a client's pid is one PgBouncer made up: the workers' server
// connections are then PgBouncer's (SHOW SERVERS gives their pids), and a
// worker process's connections are its connections to PgBouncer, told
// apart by client port (SHOW CLIENTS).
type sampler struct {
	mon     *pgxpool.Pool
	bouncer *pgBouncer // nil: the workers connect to PostgreSQL directly

	mu          sync.Mutex
	pids        map[uint32]int // backend pid -> owner
	ports       map[int]int    // local port of a connection to PgBouncer -> worker process
	cpu         map[uint32]float64
	peak        int
	now         int
	peakProc    int     // the most connections one worker process had at once
	peakWorkers int     // the most connections the workers had at once (PgBouncer's servers, through it)
	peakBouncer int     // the most server connections PgBouncer had at once
	procs       bool    // /proc readable for the backends
	oldestOther float64 // seconds: the oldest transaction of a session not ours
}

func newSampler(mon *pgxpool.Pool, bouncer *pgBouncer) *sampler {
	return &sampler{mon: mon, bouncer: bouncer, pids: make(map[uint32]int), ports: make(map[int]int),
		cpu: make(map[uint32]float64)}
}

// add records a new connection of owner.
func (s *sampler) add(ev connEvent, owner int) {
	if ev.Failed {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bouncer != nil && owner >= 0 {
		s.ports[ev.Port] = owner
		return
	}
	s.pids[ev.PID] = owner
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
	perProc := map[int]int{}
	bouncerServers := 0
	if s.bouncer != nil {
		servers, serr := s.bouncer.serverPIDs(ctx)
		ports, cerr := s.bouncer.clientPorts(ctx)
		if serr != nil || cerr != nil {
			return
		}
		bouncerServers = len(servers)
		s.mu.Lock()
		for _, p := range servers {
			s.pids[p] = ownerBouncer
		}
		for _, port := range ports {
			if o, ok := s.ports[port]; ok {
				perProc[o]++
			}
		}
		s.mu.Unlock()
	}
	s.mu.Lock()
	pids := make([]int32, 0, len(s.pids))
	for p := range s.pids {
		pids = append(pids, int32(p))
	}
	s.mu.Unlock()
	if len(pids) == 0 {
		return
	}
	var other float64
	if err := s.mon.QueryRow(ctx, `SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8
		FROM pg_stat_activity WHERE backend_xmin IS NOT NULL AND xact_start IS NOT NULL
		AND pid <> ALL ($1) AND pid <> pg_backend_pid() AND backend_type = 'client backend'`, pids).Scan(&other); err == nil {
		s.mu.Lock()
		s.oldestOther = max(s.oldestOther, other)
		s.mu.Unlock()
	}
	rows, err := s.mon.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)`, pids)
	if err != nil {
		return
	}
	live, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return
	}
	cpus := make(map[uint32]float64, len(pids))
	for _, p := range pids {
		if c, ok := procCPU(int(p)); ok {
			cpus[uint32(p)] = c
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bouncer == nil {
		for _, p := range live {
			if o := s.pids[uint32(p)]; o >= 0 {
				perProc[o]++
			}
		}
	}
	workers := 0
	for _, p := range live {
		if s.pids[uint32(p)] != ownerDispatch {
			workers++
		}
	}
	s.now = len(live)
	s.peak = max(s.peak, len(live))
	s.peakWorkers = max(s.peakWorkers, workers)
	s.peakBouncer = max(s.peakBouncer, bouncerServers)
	for _, n := range perProc {
		s.peakProc = max(s.peakProc, n)
	}
	for p, c := range cpus {
		s.cpu[p] = max(s.cpu[p], c)
		s.procs = true
	}
}

// otherXact is how old the oldest transaction of another session got.
func (s *sampler) otherXact() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.oldestOther
}

// backendCPU sums the CPU seconds of the bench's backends: the dispatching
// pool's, and the workers' (PgBouncer's server connections count as the
// workers').
func (s *sampler) backendCPU() (dispatch, worker float64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for p, c := range s.cpu {
		if s.pids[p] == ownerDispatch {
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

// peaks returns the most connections one worker process had at once (to
// PostgreSQL, or to PgBouncer when there is one), the most PostgreSQL
// connections the workers had at once (through PgBouncer, its servers'),
// and the most server connections PgBouncer had at once.
func (s *sampler) peaks() (perProc, workers, bouncer int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peakProc, s.peakWorkers, s.peakBouncer
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
