package tasking

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// workerConn is the one PostgreSQL connection a running Worker uses for
// everything it does: steps (finish, hand-off, claim), heartbeats, cleanup,
// the PostgreSQL locker's session locks and, with the PostgreSQL locker,
// LISTEN. One connection per worker process keeps a fleet of hundreds of
// processes within a default max_connections, and the worker's statements
// are short and batched, so they queue behind each other for at most a
// round trip or two.
//
// Statements take the connection in turn (use). While nobody uses it and a
// channel is set, the connection waits for notifications; a statement that
// wants the connection interrupts that wait (through a read deadline, which
// leaves the connection usable). A connection that broke is reopened by the
// next use; gen counts the connections opened, so the PostgreSQL locker can
// tell that the session holding its locks is gone.
type workerConn struct {
	cfg      *pgx.ConnConfig
	appName  atomic.Pointer[string] // application_name, set on every connection
	channel  string                 // LISTEN on it while idle; "" for none
	onNotify func(payload string)
	onReopen func() // after a new connection is open (nothing may have been missed: wake up)

	mu     sync.Mutex
	conn   *pgx.Conn
	gen    atomic.Uint64
	wanted atomic.Int32 // uses waiting for mu
	okAt   atomic.Int64 // unix nanos of the last statement that succeeded

	waitMu     sync.Mutex
	cancelWait context.CancelFunc // interrupts the idle LISTEN wait
	idle       chan struct{}      // signalled when the last waiting use is done
}

// newWorkerConn returns a worker connection with the pool's settings. It is
// a connection of its own, not one of the pool's: notifications that arrive
// while a statement runs must reach onNotify, which a pooled connection's
// settings cannot be made to do. It is not connected until first used.
func newWorkerConn(pool *pgxpool.Pool, appName string) *workerConn {
	c := &workerConn{cfg: pool.Config().ConnConfig.Copy(), idle: make(chan struct{}, 1)}
	c.appName.Store(&appName)
	c.cfg.OnNotification = func(_ *pgconn.PgConn, n *pgconn.Notification) {
		if c.onNotify != nil {
			c.onNotify(n.Payload)
		}
	}
	return c
}

// setAppName names the connection in pg_stat_activity. The name is a
// startup parameter (which a transaction-pooling proxy keeps per client,
// unlike a SET), so an open connection is closed and the next use opens one
// with the new name.
func (c *workerConn) setAppName(ctx context.Context, name string) {
	c.appName.Store(&name)
	c.take()
	defer c.release()
	c.drop(ctx)
}

// take waits for the connection (interrupting an idle LISTEN wait); release
// gives it back.
func (c *workerConn) take() {
	c.wanted.Add(1)
	c.waitMu.Lock()
	if c.cancelWait != nil {
		c.cancelWait()
	}
	c.waitMu.Unlock()
	c.mu.Lock()
}

// use runs fn with the connection, opening it first if needed. fn must not
// keep the connection or anything read from it (rows) past its return.
func (c *workerConn) use(ctx context.Context, fn func(conn *pgx.Conn) error) error {
	c.take()
	defer c.release()
	if err := c.open(ctx); err != nil {
		return err
	}
	err := fn(c.conn)
	if err == nil {
		c.okAt.Store(time.Now().UnixNano())
	}
	return err
}

// usedWithin reports whether a statement succeeded on the current
// connection within d.
func (c *workerConn) usedWithin(d time.Duration) bool {
	return time.Since(time.Unix(0, c.okAt.Load())) < d
}

func (c *workerConn) signalIdle() {
	select {
	case c.idle <- struct{}{}:
	default:
	}
}

// open connects if there is no usable connection. Caller holds mu.
func (c *workerConn) open(ctx context.Context) error {
	if c.conn != nil && !c.conn.IsClosed() {
		return nil
	}
	c.drop(ctx)
	cfg := c.cfg.Copy()
	if cfg.RuntimeParams == nil {
		cfg.RuntimeParams = map[string]string{}
	}
	cfg.RuntimeParams["application_name"] = *c.appName.Load()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	if c.channel != "" {
		if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{c.channel}.Sanitize()); err != nil {
			conn.Close(ctx)
			return fmt.Errorf("listen: %w", err)
		}
	}
	c.conn = conn
	c.gen.Add(1)
	if c.onReopen != nil {
		c.onReopen()
	}
	return nil
}

// generation returns the number of connections opened so far; 0 before the
// first.
func (c *workerConn) generation() uint64 { return c.gen.Load() }

// listen waits for notifications whenever the connection is idle, until
// ctx is done. It returns at once when no channel is set.
func (c *workerConn) listen(ctx context.Context, backoff func(context.Context, error)) {
	if c.channel == "" {
		return
	}
	for ctx.Err() == nil {
		if c.wanted.Load() > 0 {
			select {
			case <-c.idle:
			case <-ctx.Done():
				return
			}
			continue
		}
		c.mu.Lock()
		if c.wanted.Load() > 0 {
			c.mu.Unlock()
			continue
		}
		err := c.open(ctx)
		if err == nil {
			wctx, cancel := context.WithCancel(ctx)
			c.waitMu.Lock()
			c.cancelWait = cancel
			c.waitMu.Unlock()
			if c.wanted.Load() > 0 { // asked for between the check and the cancel func
				cancel()
			}
			err = c.wait(wctx)
			c.waitMu.Lock()
			c.cancelWait = nil
			c.waitMu.Unlock()
			cancel()
		}
		c.mu.Unlock()
		if err != nil && ctx.Err() == nil {
			backoff(ctx, err)
		}
	}
}

// wait delivers notifications until ctx is done (nil) or the connection
// fails (its error). Caller holds mu.
func (c *workerConn) wait(ctx context.Context) error {
	for {
		// Each notification reaches onNotify through the connection's
		// OnNotification, here as during any statement.
		if err := c.conn.PgConn().WaitForNotification(ctx); err != nil {
			if ctx.Err() != nil && !c.conn.IsClosed() {
				return nil // interrupted; the connection is still good
			}
			return err
		}
	}
}

// drop closes the connection, if any. Caller holds mu.
func (c *workerConn) drop(ctx context.Context) {
	if c.conn != nil {
		c.conn.Close(ctx)
		c.conn = nil
	}
}

// close closes the connection.
func (c *workerConn) close(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.drop(ctx)
}

// Exec, Query and QueryRow make the worker connection a querier (for the
// fleet store and the locker). Query reads every row before it returns the
// connection, so the rows it returns are already in memory.
func (c *workerConn) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	var tag pgconn.CommandTag
	err := c.use(ctx, func(conn *pgx.Conn) error {
		var err error
		tag, err = conn.Exec(ctx, sql, args...)
		return err
	})
	return tag, err
}

func (c *workerConn) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	var out *bufferedRows
	err := c.use(ctx, func(conn *pgx.Conn) error {
		rows, err := conn.Query(ctx, sql, args...)
		if err != nil {
			return err
		}
		out, err = bufferRows(rows)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (c *workerConn) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	rows, err := c.Query(ctx, sql, args...)
	if err != nil {
		return errRow{err}
	}
	return rowOf{rows}
}

// Begin runs a transaction: the connection stays taken until it ends.
func (c *workerConn) Begin(ctx context.Context) (pgx.Tx, error) {
	c.take()
	if err := c.open(ctx); err != nil {
		c.release()
		return nil, err
	}
	tx, err := c.conn.Begin(ctx)
	if err != nil {
		c.release()
		return nil, err
	}
	return &connTx{Tx: tx, c: c}, nil
}

func (c *workerConn) release() {
	n := c.wanted.Add(-1)
	c.mu.Unlock()
	if n == 0 {
		c.signalIdle()
	}
}

// connTx gives the connection back when the transaction ends.
type connTx struct {
	pgx.Tx
	c    *workerConn
	done bool
}

func (t *connTx) Commit(ctx context.Context) error {
	err := t.Tx.Commit(ctx)
	t.end()
	return err
}

func (t *connTx) Rollback(ctx context.Context) error {
	err := t.Tx.Rollback(ctx)
	t.end()
	return err
}

func (t *connTx) end() {
	if !t.done {
		t.done = true
		t.c.release()
	}
}

// bufferedRows is a result read into memory.
type bufferedRows struct {
	fields []pgconn.FieldDescription
	rows   [][][]byte
	tag    pgconn.CommandTag
	i      int
	m      *pgtype.Map
	err    error
}

func bufferRows(rows pgx.Rows) (*bufferedRows, error) {
	defer rows.Close()
	// The field descriptions live in the connection's buffers: copy them.
	b := &bufferedRows{fields: slices.Clone(rows.FieldDescriptions()), m: rows.TypeMap(), i: -1}
	for rows.Next() {
		raw := rows.RawValues()
		cp := make([][]byte, len(raw))
		for i, v := range raw {
			if v != nil {
				cp[i] = append([]byte{}, v...)
			}
		}
		b.rows = append(b.rows, cp)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	b.tag = rows.CommandTag()
	return b, nil
}

func (b *bufferedRows) Close()                                       {}
func (b *bufferedRows) Err() error                                   { return b.err }
func (b *bufferedRows) CommandTag() pgconn.CommandTag                { return b.tag }
func (b *bufferedRows) FieldDescriptions() []pgconn.FieldDescription { return b.fields }
func (b *bufferedRows) Conn() *pgx.Conn                              { return nil }
func (b *bufferedRows) TypeMap() *pgtype.Map                         { return b.m }
func (b *bufferedRows) RawValues() [][]byte                          { return b.rows[b.i] }

func (b *bufferedRows) Next() bool {
	if b.err != nil || b.i+1 >= len(b.rows) {
		return false
	}
	b.i++
	return true
}

func (b *bufferedRows) Scan(dest ...any) error {
	if len(dest) != len(b.fields) {
		return fmt.Errorf("scan: %d destinations for %d columns", len(dest), len(b.fields))
	}
	for i, d := range dest {
		if d == nil {
			continue
		}
		if err := b.m.Scan(b.fields[i].DataTypeOID, b.fields[i].Format, b.rows[b.i][i], d); err != nil {
			b.err = fmt.Errorf("scan column %d: %w", i, err)
			return b.err
		}
	}
	return nil
}

func (b *bufferedRows) Values() ([]any, error) {
	out := make([]any, len(b.fields))
	for i, f := range b.fields {
		raw := b.rows[b.i][i]
		if raw == nil {
			continue
		}
		dt, ok := b.m.TypeForOID(f.DataTypeOID)
		if !ok {
			out[i] = string(raw)
			continue
		}
		v, err := dt.Codec.DecodeValue(b.m, f.DataTypeOID, f.Format, raw)
		if err != nil {
			return nil, err
		}
		out[i] = v
	}
	return out, nil
}

type rowOf struct{ rows pgx.Rows }

func (r rowOf) Scan(dest ...any) error {
	if !r.rows.Next() {
		if err := r.rows.Err(); err != nil {
			return err
		}
		return pgx.ErrNoRows
	}
	return r.rows.Scan(dest...)
}

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

// retryConflict runs f, a single statement that commits on its own, again
// when PostgreSQL aborted it for a deadlock or a serialization failure (up
// to five times, with growing jittered pauses). Statements that settle
// tasks from the client side (cancel, a group's cancel, an immediate task's
// finish) lock task rows and line entries that a worker's step may be
// handing on at the same time; they take them in the step's order (entries
// first, schema version 7), but a task on several lines, or a group's
// several tasks, can still meet two steps in other orders. PostgreSQL
// breaks such a cycle by aborting one side, and an aborted statement changed
// nothing, so running it again is safe.
func retryConflict(ctx context.Context, f func() error) error {
	for attempt := 0; ; attempt++ {
		err := f()
		var pgErr *pgconn.PgError
		if err == nil || attempt >= 5 || !errors.As(err, &pgErr) ||
			pgErr.Code != "40P01" && pgErr.Code != "40001" || ctx.Err() != nil {
			return err
		}
		sleepCtx(ctx, jitter(10*time.Millisecond<<attempt))
	}
}
