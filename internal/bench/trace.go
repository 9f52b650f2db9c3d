package bench

import (
	"context"
	"errors"
	"net"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// stmtTracer counts every statement a pool sends, by SQL text. It is set as
// the Tracer of the pool's ConnConfig; the PostgreSQL locker's lock
// connection and the LISTEN connection copy that ConnConfig, so their
// statements are counted too (the report shows lock_batch calls, which only
// the lock connection sends, as the proof).
//
// Counted: Query, QueryRow and Exec (TraceQueryStart), each query of a batch
// (TraceBatchQuery) and CopyFrom. Prepares that pgx's statement cache sends
// before a statement's first use are protocol messages, not statements; they
// are counted apart.
type stmtTracer struct {
	onConnect func(connEvent) // called on every connection attempt

	mu       sync.Mutex
	bySQL    map[string]int64
	nsBySQL  map[string]int64 // time from send to result, summed
	prepares int64
	notifies int64 // dispatch calls that NOTIFY (a non-empty channel argument)
}

// connEvent is one connection attempt: the new connection's backend pid
// (through PgBouncer, a key PgBouncer made up) and local TCP port, or a
// failure.
type connEvent struct {
	PID    uint32
	Port   int
	Failed bool
}

func newStmtTracer(onConnect func(connEvent)) *stmtTracer {
	return &stmtTracer{onConnect: onConnect, bySQL: make(map[string]int64), nsBySQL: make(map[string]int64)}
}

var (
	_ pgx.QueryTracer    = (*stmtTracer)(nil)
	_ pgx.BatchTracer    = (*stmtTracer)(nil)
	_ pgx.CopyFromTracer = (*stmtTracer)(nil)
	_ pgx.PrepareTracer  = (*stmtTracer)(nil)
	_ pgx.ConnectTracer  = (*stmtTracer)(nil)
)

func (t *stmtTracer) count(sql string, args []any) {
	notify := false
	if strings.Contains(sql, ".dispatch(") && len(args) > 0 {
		if ch, ok := args[len(args)-1].(string); ok && ch != "" {
			notify = true
		}
	}
	t.mu.Lock()
	t.bySQL[sql]++
	if notify {
		t.notifies++
	}
	t.mu.Unlock()
}

// queryStart is what TraceQueryStart leaves in the context for
// TraceQueryEnd.
type queryStart struct {
	sql string
	at  time.Time
}

type queryStartKey struct{}

func (t *stmtTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	t.count(d.SQL, d.Args)
	return context.WithValue(ctx, queryStartKey{}, queryStart{d.SQL, time.Now()})
}

func (t *stmtTracer) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryEndData) {
	q, ok := ctx.Value(queryStartKey{}).(queryStart)
	if !ok {
		return
	}
	ns := time.Since(q.at).Nanoseconds()
	t.mu.Lock()
	t.nsBySQL[q.sql] += ns
	t.mu.Unlock()
}

func (t *stmtTracer) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	return ctx
}
func (t *stmtTracer) TraceBatchQuery(_ context.Context, _ *pgx.Conn, d pgx.TraceBatchQueryData) {
	t.count(d.SQL, d.Args)
}
func (t *stmtTracer) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

func (t *stmtTracer) TraceCopyFromStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceCopyFromStartData) context.Context {
	t.count("COPY "+d.TableName.Sanitize(), nil)
	return ctx
}
func (t *stmtTracer) TraceCopyFromEnd(context.Context, *pgx.Conn, pgx.TraceCopyFromEndData) {}

func (t *stmtTracer) TracePrepareStart(ctx context.Context, _ *pgx.Conn, _ pgx.TracePrepareStartData) context.Context {
	t.mu.Lock()
	t.prepares++
	t.mu.Unlock()
	return ctx
}
func (t *stmtTracer) TracePrepareEnd(context.Context, *pgx.Conn, pgx.TracePrepareEndData) {}

func (t *stmtTracer) TraceConnectStart(ctx context.Context, _ pgx.TraceConnectStartData) context.Context {
	return ctx
}
func (t *stmtTracer) TraceConnectEnd(_ context.Context, d pgx.TraceConnectEndData) {
	if t.onConnect == nil {
		return
	}
	if errors.Is(d.Err, context.Canceled) {
		// Given up by the process itself (a dial still in flight when a
		// worker process stops, at the end of a run), not refused.
		return
	}
	if d.Err != nil || d.Conn == nil {
		t.onConnect(connEvent{Failed: true})
		return
	}
	ev := connEvent{PID: d.Conn.PgConn().PID()}
	if a, ok := d.Conn.PgConn().Conn().LocalAddr().(*net.TCPAddr); ok {
		ev.Port = a.Port
	}
	t.onConnect(ev)
}

// snapshot returns the counts so far.
func (t *stmtTracer) snapshot() stmtCounts {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := stmtCounts{BySQL: make(map[string]int64, len(t.bySQL)), NsBySQL: make(map[string]int64, len(t.nsBySQL)),
		Prepares: t.prepares, Notifies: t.notifies}
	for k, v := range t.bySQL {
		c.BySQL[k] = v
	}
	for k, v := range t.nsBySQL {
		c.NsBySQL[k] = v
	}
	return c
}

// stmtCounts is what a tracer counted; it travels from child processes as JSON.
type stmtCounts struct {
	BySQL map[string]int64 `json:"by_sql"`
	// NsBySQL sums the time of Query, QueryRow and Exec calls from send to
	// result (batches and COPY are not timed).
	NsBySQL  map[string]int64 `json:"ns_by_sql,omitempty"`
	Prepares int64            `json:"prepares"`
	Notifies int64            `json:"dispatch_notifies"`
}

func (c *stmtCounts) add(o stmtCounts) {
	if c.BySQL == nil {
		c.BySQL = make(map[string]int64)
	}
	for k, v := range o.BySQL {
		c.BySQL[k] += v
	}
	if c.NsBySQL == nil && len(o.NsBySQL) > 0 {
		c.NsBySQL = make(map[string]int64)
	}
	for k, v := range o.NsBySQL {
		c.NsBySQL[k] += v
	}
	c.Prepares += o.Prepares
	c.Notifies += o.Notifies
}

func (c stmtCounts) total() int64 {
	var n int64
	for _, v := range c.BySQL {
		n += v
	}
	return n
}

// stmtKind names what a statement of the library is for, from its text.
func stmtKind(sql string) string {
	switch {
	case strings.Contains(sql, ".dispatch("):
		return "dispatch"
	case strings.Contains(sql, ".step("):
		return "step (finish + handoff + claim)"
	case strings.Contains(sql, ".pass("):
		return "pass (hand-off in a chain)"
	case strings.Contains(sql, ".cancel("):
		return "cancel"
	case strings.Contains(sql, "lock_batch($1, $2, '{}'"):
		return "unlock"
	case strings.Contains(sql, "lock_batch("):
		return "lock"
	case strings.Contains(sql, "pg_notify"):
		return "notify"
	case strings.HasPrefix(strings.TrimSpace(sql), "LISTEN"):
		return "listen"
	case strings.Contains(sql, "set_config('application_name'"):
		return "connection setup"
	case strings.Contains(sql, "SET state = 'waiting', worker_id = NULL"):
		return "unclaim"
	case strings.Contains(sql, "pg_advisory_unlock_all"):
		return "unlock all"
	case strings.Contains(sql, "pg_backend_pid()"):
		return "lock conn check"
	case strings.Contains(sql, ".workers"), strings.Contains(sql, ".settle("),
		strings.Contains(sql, "pg_advisory_xact_lock"), strings.Contains(sql, "pg_try_advisory_xact_lock"):
		return "fleet (register, heartbeat, cleanup)"
	case strings.Contains(sql, "schema_version"), strings.Contains(sql, "information_schema"),
		strings.Contains(sql, "pg_namespace"):
		return "schema check"
	case strings.Contains(sql, "state IN ('completed', 'failed', 'canceled')"):
		return "wait (final states)"
	case strings.Contains(sql, ".tasks WHERE id = $1"):
		return "get"
	case strings.Contains(sql, "WHERE id > $1 AND ($2 = ''"):
		return "list"
	case strings.HasPrefix(strings.TrimSpace(sql), "CREATE"), strings.Contains(sql, "pg_advisory_xact_lock($1)") && strings.Contains(sql, "migrat"):
		return "migrate"
	}
	w := strings.Fields(sql)
	if len(w) > 0 {
		return "other: " + strings.ToLower(w[0])
	}
	return "other"
}

// byKind sums counts by stmtKind, largest first.
func (c stmtCounts) byKind() []kindCount {
	m := make(map[string]int64)
	ns := make(map[string]int64)
	for sql, n := range c.BySQL {
		m[stmtKind(sql)] += n
	}
	for sql, d := range c.NsBySQL {
		ns[stmtKind(sql)] += d
	}
	out := make([]kindCount, 0, len(m))
	for k, n := range m {
		out = append(out, kindCount{Kind: k, N: n, Ns: ns[k]})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].N != out[j].N {
			return out[i].N > out[j].N
		}
		return out[i].Kind < out[j].Kind
	})
	return out
}

type kindCount struct {
	Kind string `json:"kind"`
	N    int64  `json:"n"`
	Ns   int64  `json:"ns,omitempty"` // summed time of the timed ones (see stmtCounts.NsBySQL)
}

// wakeupCalls counts what the Redis locker promises not to send to
// PostgreSQL: LISTEN, NOTIFY (pg_notify, or a dispatch given a NOTIFY
// channel) and session-level advisory locks (lock_batch, pg_advisory_lock,
// pg_advisory_unlock*, pg_try_advisory_lock). Transaction-scoped advisory
// locks (dispatch ordering, fleet registration and cleanup) are allowed.
func (c stmtCounts) wakeupCalls() (listen, notify, session int64) {
	for sql, n := range c.BySQL {
		s := strings.ToLower(sql)
		if strings.HasPrefix(strings.TrimSpace(s), "listen") {
			listen += n
		}
		if strings.Contains(s, "pg_notify") || strings.HasPrefix(strings.TrimSpace(s), "notify") {
			notify += n
		}
		if strings.Contains(s, "lock_batch(") || strings.Contains(s, "pg_advisory_lock") ||
			strings.Contains(s, "pg_advisory_unlock") || strings.Contains(s, "pg_try_advisory_lock(") ||
			strings.Contains(s, "pg_try_advisory_lock_shared") {
			session += n
		}
	}
	return listen, notify + c.Notifies, session
}

// cmdCounter counts Redis commands a process sends, by command name.
type cmdCounter struct {
	mu sync.Mutex
	m  map[string]int64
}

func newCmdCounter() *cmdCounter { return &cmdCounter{m: make(map[string]int64)} }

func (c *cmdCounter) add(name string) {
	c.mu.Lock()
	c.m[strings.ToUpper(name)]++
	c.mu.Unlock()
}

func (c *cmdCounter) snapshot() map[string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int64, len(c.m))
	for k, v := range c.m {
		out[k] = v
	}
	return out
}
