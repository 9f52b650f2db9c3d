package tasking

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PostgresLockerOption configures [NewPostgresLocker].
type PostgresLockerOption func(*pgLocker)

// WithLockCheckInterval sets how often a worker's lock connection is checked
// while it holds grants. A check that fails (connection gone, backend
// changed) means the server dropped every lock of the session: the worker
// cancels those tasks and fails them with "lock lost". Default: 1s.
func WithLockCheckInterval(d time.Duration) PostgresLockerOption {
	return func(l *pgLocker) {
		if d > 0 {
			l.check = d
		}
	}
}

// NewPostgresLocker returns the default locker: PostgreSQL session-level
// advisory locks, held on one dedicated connection per Worker (not a pooled
// one), so the locks live exactly as long as that connection.
//
// The worker keeps its own table of what it holds and only asks the server
// for the first holder of a name; every batch of acquires, and every batch of
// releases, is one round trip. Keys are 64-bit SHA-256 hashes of the schema
// and resource name, apart from the keys dispatch uses to order inserts.
//
// The lock connection must reach PostgreSQL directly or through a
// session-pooling proxy: behind a transaction-pooling proxy the backend
// changes between statements and locks would be dropped at random; the
// locker notices the backend change and refuses to go on.
func NewPostgresLocker(opts ...PostgresLockerOption) ResourceLocker {
	l := &pgLocker{check: time.Second}
	for _, o := range opts {
		o(l)
	}
	return l
}

var _ ResourceLocker = (*pgLocker)(nil)

type pgLocker struct {
	check time.Duration
	pool  atomic.Pointer[pgxpool.Pool] // from the last Open, for freeWorkers
}

func (l *pgLocker) Kind() string { return "postgres" }

func (l *pgLocker) Open(ctx context.Context, cfg LockSessionConfig) (LockSession, error) {
	if cfg.Pool == nil {
		return nil, errors.New("tasking: postgres locker needs the client's pool")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	l.pool.Store(cfg.Pool)
	s := &pgSession{
		cfg:   cfg,
		q:     newQueries(cfg.Schema),
		table: make(map[int64]*pgHeld),
		owned: make(map[Owner][]int64),
		stop:  make(chan struct{}),
	}
	s.mu.Lock()
	err := s.connect(ctx)
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	s.wg.Add(1)
	go s.watch(l.check)
	return s, nil
}

// lockAppName names a worker's lock connection in pg_stat_activity:
// "tasking lock <worker id> <schema hash>". Worker ids are unique only within
// a schema, and application_name is cut at 63 bytes, hence the short hash.
func lockAppName(schema string, worker int64) string {
	return fmt.Sprintf("tasking lock %d %016x", worker, uint64(hashKey("tasking/app", schema, "")))
}

// freeWorkers ends the lock connections of dead worker instances, so the
// server drops their locks now. A worker that crashed has lost its
// connection already; this matters for one that is paused or cut off by a
// partition, whose connection would otherwise hold its locks until TCP
// gives up. If it comes back, its lock check finds the connection gone and
// cancels its handlers ("lock lost"); cleanup has already failed its tasks.
func (l *pgLocker) freeWorkers(ctx context.Context, schema string, workers []int64) error {
	names := make([]string, len(workers))
	for i, w := range workers {
		names[i] = lockAppName(schema, w)
	}
	pool := l.pool.Load()
	if pool == nil {
		return nil
	}
	_, err := pool.Exec(ctx, `SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
		WHERE application_name = ANY($1) AND pid <> pg_backend_pid()`, names)
	return err
}

type pgHeld struct {
	exclusive bool
	holders   int
}

type pgSession struct {
	cfg LockSessionConfig
	q   queries

	mu    sync.Mutex
	conn  *pgx.Conn // nil after a failure until the next call reconnects
	pid   uint32
	table map[int64]*pgHeld
	owned map[Owner][]int64
	err   error // set when the session must not go on (pooling proxy)

	stop chan struct{}
	wg   sync.WaitGroup
}

// connect opens the lock connection. Caller holds mu.
func (s *pgSession) connect(ctx context.Context) error {
	cc := s.cfg.Pool.Config().ConnConfig.Copy()
	// Named so operators (and tests) can tell a worker's lock session apart.
	cc.RuntimeParams["application_name"] = lockAppName(s.cfg.Schema, s.cfg.Worker)
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return fmt.Errorf("tasking: open lock connection: %w", err)
	}
	var pid uint32
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		conn.Close(ctx)
		return fmt.Errorf("tasking: open lock connection: %w", err)
	}
	s.conn, s.pid = conn, pid
	return nil
}

// fail drops the connection and every grant: the server released the
// session's locks, or will when it notices. Caller holds mu; the returned
// func reports the loss and must be called after unlocking.
func (s *pgSession) fail(cause error) func() {
	if s.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		s.conn.Close(ctx)
		cancel()
		s.conn = nil
	}
	lost := make([]Owner, 0, len(s.owned))
	for o := range s.owned {
		lost = append(lost, o)
	}
	clear(s.table)
	clear(s.owned)
	if len(lost) == 0 || s.cfg.OnLost == nil {
		return func() {}
	}
	return func() { s.cfg.OnLost(lost, cause) }
}

// failIfBroken drops the session when err left the connection closed: a
// statement cut off mid-flight (context canceled, network gone) closes it,
// and the server then drops its locks. An error that left the connection
// open (a context done before anything was sent, an SQL error) changed
// nothing on the server. Caller holds mu.
func (s *pgSession) failIfBroken(err error) func() {
	if s.conn != nil && !s.conn.IsClosed() {
		return func() {}
	}
	return s.fail(fmt.Errorf("%w: lock connection failed: %v", ErrLockLost, err))
}

// watch checks the connection while grants are held.
func (s *pgSession) watch(every time.Duration) {
	defer s.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		report := func() {}
		if s.conn != nil && len(s.owned) > 0 {
			ctx, cancel := context.WithTimeout(context.Background(), every)
			var pid uint32
			err := s.conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid)
			cancel()
			switch {
			case err != nil:
				report = s.fail(fmt.Errorf("%w: lock connection failed: %v", ErrLockLost, err))
			case pid != s.pid:
				s.err = errors.New("tasking: lock connection changed backend (transaction-pooling proxy?); advisory locks need a session")
				report = s.fail(fmt.Errorf("%w: %v", ErrLockLost, s.err))
			}
		}
		s.mu.Unlock()
		report()
	}
}

func (s *pgSession) TryAcquire(ctx context.Context, reqs []LockRequest) ([]int64, error) {
	fences := make([]int64, len(reqs))
	s.mu.Lock()
	report := func() {}
	defer func() { s.mu.Unlock(); report() }()
	if s.err != nil {
		return nil, s.err
	}
	if s.conn == nil {
		if err := s.connect(ctx); err != nil {
			return nil, err
		}
	}

	// Decide what the local table can, and build the server's rows.
	var rReq []int32
	var rKey []*int64
	var rExcl []bool
	batch := make(map[int64]bool) // keys asked in this call -> exclusive
	keys := make([][]int64, len(reqs))
	for i, r := range reqs {
		ks := make([]int64, 0, len(r.Exclusive)+len(r.Shared))
		ok := true
		var rows int
		for _, n := range r.Exclusive {
			k := runKey(s.cfg.Schema, n)
			ks = append(ks, k)
			if _, held := s.table[k]; held {
				ok = false
			} else if _, asked := batch[k]; asked {
				ok = false // defensive: the walk never sends conflicting requests
			}
		}
		for _, n := range r.Shared {
			k := runKey(s.cfg.Schema, n)
			ks = append(ks, k)
			if h, held := s.table[k]; held && h.exclusive {
				ok = false
			} else if x, asked := batch[k]; asked && x {
				ok = false
			}
		}
		if !ok {
			continue
		}
		keys[i] = ks
		for j, k := range ks {
			excl := j < len(r.Exclusive)
			if _, held := s.table[k]; held {
				continue // a shared name this session already holds
			}
			batch[k] = excl
			rReq, rKey, rExcl = append(rReq, int32(i)), append(rKey, &ks[j]), append(rExcl, excl)
			rows++
		}
		if rows == 0 { // granted locally; still draw a fence
			rReq, rKey, rExcl = append(rReq, int32(i)), append(rKey, nil), append(rExcl, false)
		}
	}
	if len(rReq) == 0 {
		return fences, nil
	}
	rows, err := s.conn.Query(ctx, s.q.lock, []int64{}, []bool{}, rReq, rKey, rExcl)
	if err == nil {
		for rows.Next() {
			var req int32
			var fence int64
			if err = rows.Scan(&req, &fence); err != nil {
				break
			}
			fences[req] = fence
		}
		rows.Close()
		if err == nil {
			err = rows.Err()
		}
	}
	if err != nil {
		report = s.undoFailedAcquire(ctx, rKey, rExcl, err)
		return nil, fmt.Errorf("tasking: acquire locks: %w", err)
	}
	for i, r := range reqs {
		if fences[i] == 0 {
			continue
		}
		for j, k := range keys[i] {
			if h, held := s.table[k]; held {
				h.holders++
			} else {
				s.table[k] = &pgHeld{exclusive: j < len(r.Exclusive), holders: 1}
			}
		}
		s.owned[r.Owner] = append(s.owned[r.Owner], keys[i]...)
	}
	return fences, nil
}

func (s *pgSession) Release(ctx context.Context, owners []Owner) error {
	return s.release(ctx, owners, "")
}

// releaseAndNotify releases and, when that freed a name on the server,
// sends a NOTIFY on channel in the same round trip.
func (s *pgSession) releaseAndNotify(ctx context.Context, owners []Owner, channel string) error {
	return s.release(ctx, owners, channel)
}

func (s *pgSession) release(ctx context.Context, owners []Owner, channel string) error {
	s.mu.Lock()
	report := func() {}
	defer func() { s.mu.Unlock(); report() }()
	// Count down on a copy first: the table changes only once the server has
	// released, so a call that fails without effect can be retried.
	left := make(map[int64]int)
	var keys []int64
	var excl []bool
	for _, o := range owners {
		for _, k := range s.owned[o] {
			h := s.table[k]
			if h == nil {
				continue
			}
			n, seen := left[k]
			if !seen {
				n = h.holders
			}
			if n--; n == 0 {
				keys, excl = append(keys, k), append(excl, h.exclusive)
			}
			left[k] = n
		}
	}
	if len(keys) > 0 && s.conn != nil {
		var err error
		if channel == "" {
			_, err = s.conn.Exec(ctx, s.q.unlock, keys, excl)
		} else {
			_, err = s.conn.Exec(ctx, s.q.unlockNotify, keys, excl, channel)
		}
		if err != nil {
			report = s.failIfBroken(err)
			return fmt.Errorf("tasking: release locks: %w", err)
		}
	}
	for k, n := range left {
		if n == 0 {
			delete(s.table, k)
		} else {
			s.table[k].holders = n
		}
	}
	for _, o := range owners {
		delete(s.owned, o)
	}
	return nil
}

// undoFailedAcquire releases what a failed lock_batch may have taken before
// it failed: session-level advisory locks survive the error of the statement
// that took them (a full lock table, a statement timeout). Those are the
// keys the call asked the server for; unlocking one it did not get is a
// no-op. If even that fails, the session is dropped, which releases all.
// Caller holds mu.
func (s *pgSession) undoFailedAcquire(ctx context.Context, keys []*int64, excl []bool, cause error) func() {
	if s.conn == nil || s.conn.IsClosed() {
		return s.fail(fmt.Errorf("%w: lock connection failed: %v", ErrLockLost, cause))
	}
	var uk []int64
	var ux []bool
	for i, k := range keys {
		if k != nil {
			uk, ux = append(uk, *k), append(ux, excl[i])
		}
	}
	if len(uk) == 0 {
		return func() {}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if _, err := s.conn.Exec(ctx, s.q.unlock, uk, ux); err != nil {
		return s.fail(fmt.Errorf("%w: could not undo a failed lock batch: %v", ErrLockLost, err))
	}
	return func() {}
}

func (s *pgSession) Close(ctx context.Context) error {
	select {
	case <-s.stop:
		return nil
	default:
		close(s.stop)
	}
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		// Unlock explicitly: a closed connection's locks are only dropped
		// once its backend has exited, a moment after Close returns.
		if _, err := s.conn.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
			s.cfg.Logger.Warn("tasking: unlock on close", "err", err)
		}
		s.conn.Close(ctx)
		s.conn = nil
	}
	clear(s.table)
	clear(s.owned)
	return nil
}
