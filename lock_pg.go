package tasking

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// PostgresLockerOption configures [NewPostgresLocker].
type PostgresLockerOption func(*pgLocker)

// WithPostgresLockCheckInterval sets how often the PostgreSQL locker checks
// a worker's connection while it holds grants. A check that fails
// (connection gone, backend changed) means the server dropped every lock of
// the session: the worker cancels those tasks and fails them with "lock
// lost". Like the Redis locker's options, it is named after its locker.
// Default: 1s.
func WithPostgresLockCheckInterval(d time.Duration) PostgresLockerOption {
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
}

func (l *pgLocker) Kind() string { return "postgres" }

func (l *pgLocker) Open(ctx context.Context, cfg LockSessionConfig) (LockSession, error) {
	if cfg.Pool == nil && cfg.conn == nil {
		return nil, errors.New("tasking: postgres locker needs the client's pool")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &pgSession{
		cfg:   cfg,
		conn:  cfg.conn,
		table: make(map[int64]*pgHeld),
		owned: make(map[Owner][]int64),
		stop:  make(chan struct{}),
	}
	sc := pgx.Identifier{cfg.Schema}.Sanitize()
	s.lockSQL = `SELECT req, fence FROM ` + sc + `.lock_batch($1, $2, $3, $4, $5)`
	s.unlockSQL = `SELECT count(*) FROM ` + sc + `.lock_batch($1, $2, '{}', '{}', '{}')`
	if s.conn == nil { // a session of its own, outside a worker
		s.conn = newWorkerConn(cfg.Pool, workerAppName(cfg.Schema, cfg.Worker))
		s.own = true
	}
	if err := s.checkSession(ctx); err != nil {
		if s.own {
			s.conn.close(ctx)
		}
		return nil, err
	}
	s.wg.Add(1)
	go s.watch(l.check)
	return s, nil
}

// errPoolingProxy: the connection's backend changes between statements.
var errPoolingProxy = errors.New("tasking: the PostgreSQL locker needs a session, but the connection's backend changes " +
	"between statements (a transaction-pooling proxy such as PgBouncer?); connect directly or in session pooling mode, " +
	"or use the Redis locker")

// checkSession reads the backend's pid a few times: behind a
// transaction-pooling proxy it changes, and session locks would be dropped
// at random.
func (s *pgSession) checkSession(ctx context.Context) error {
	var first uint32
	for i := 0; i < 3; i++ {
		var pid uint32
		if err := s.conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
			return fmt.Errorf("tasking: open lock session: %w", err)
		}
		if i == 0 {
			first = pid
		} else if pid != first {
			return errPoolingProxy
		}
	}
	s.mu.Lock()
	s.pid, s.gen = first, s.conn.generation()
	s.mu.Unlock()
	return nil
}

var (
	_ LockSession = (*pgSession)(nil)
	_ WorkerFreer = (*pgSession)(nil)
)

// FreeWorkers ends the connections of dead worker instances, so the server
// drops their locks now. A worker that crashed has lost its connection
// already; this matters for one that is paused or cut off by a partition,
// whose connection would otherwise hold its locks until TCP gives up. If it
// comes back, its lock check finds the connection gone and cancels its
// handlers ("lock lost"); cleanup has already failed its tasks.
func (s *pgSession) FreeWorkers(ctx context.Context, workers []int64) error {
	names := make([]string, len(workers))
	for i, w := range workers {
		names[i] = workerAppName(s.cfg.Schema, w)
	}
	_, err := s.conn.Exec(ctx, `SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
		WHERE application_name = ANY($1) AND pid <> pg_backend_pid()`, names)
	return err
}

type pgHeld struct {
	exclusive bool
	holders   int
}

// pgSession holds its locks on the worker's connection (workerConn), which
// the worker's statements share: the locks live exactly as long as that
// connection. When the connection is replaced (gen changes) or its backend
// changes, every grant is lost.
type pgSession struct {
	cfg       LockSessionConfig
	conn      *workerConn
	own       bool // conn is the session's own
	lockSQL   string
	unlockSQL string

	mu    sync.Mutex
	gen   uint64 // the connection the grants live on
	pid   uint32
	table map[int64]*pgHeld
	owned map[Owner][]int64
	err   error // set when the session must not go on (pooling proxy)

	stop chan struct{}
	wg   sync.WaitGroup
}

// fail forgets every grant: the server released the session's locks, or
// will when it notices. Caller holds mu; the returned func reports the loss
// and must be called after unlocking.
func (s *pgSession) fail(cause error) func() {
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

// current checks, on conn, that the grants still live on it: the same
// connection and backend. Caller holds mu.
func (s *pgSession) current(conn *pgx.Conn) func() {
	if g := s.conn.generation(); g != s.gen {
		s.gen = g
		s.pid = conn.PgConn().PID()
		return s.fail(fmt.Errorf("%w: the worker's connection was lost", ErrLockLost))
	}
	return func() {}
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
		// A busy worker's statements show that the connection (and so
		// the session's locks) is alive; the check only runs on a quiet
		// one, or when the connection was replaced.
		quiet := !s.conn.usedWithin(every) || s.conn.generation() != s.gen
		if len(s.owned) > 0 && quiet {
			broken := false
			err := s.conn.use(context.Background(), func(conn *pgx.Conn) error {
				if report = s.current(conn); len(s.owned) == 0 {
					return nil
				}
				// The bound starts once the connection is ours: waiting for
				// the worker's statements says nothing about the session.
				ctx, cancel := context.WithTimeout(context.Background(), 10*every)
				defer cancel()
				var pid uint32
				if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
					broken = conn.IsClosed()
					return err
				}
				if pid != s.pid {
					s.err = errPoolingProxy
					report = s.fail(fmt.Errorf("%w: %v", ErrLockLost, s.err))
				}
				return nil
			})
			if err != nil && (broken || s.conn.generation() != s.gen) {
				report = s.fail(fmt.Errorf("%w: lock connection failed: %v", ErrLockLost, err))
			}
		}
		s.mu.Unlock()
		report()
	}
}

func (s *pgSession) TryAcquire(ctx context.Context, reqs []LockRequest) ([]int64, error) {
	return s.releaseThenAcquire(ctx, nil, reqs)
}

// acquire decides what the local table can, asks the server for the rest in
// one round trip, and records the grants. The keys unlock (of modes
// unlockExcl), which the table no longer lists, are unlocked on the server
// first, in the same statement. Caller holds mu and conn.
func (s *pgSession) acquire(ctx context.Context, conn *pgx.Conn, unlock []int64, unlockExcl []bool,
	reqs []LockRequest, fences []int64) error {
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
				ok = false // defensive: ready tasks never conflict with each other
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
	// The table no longer lists the keys to unlock: if the call fails
	// before lock_batch unlocked them (a context already done, a cancel),
	// they are unlocked again with the undo, which is a no-op for a key
	// already unlocked.
	undo := func(err error) error {
		keys, excl := rKey, rExcl
		for i := range unlock {
			keys, excl = append(keys, &unlock[i]), append(excl, unlockExcl[i])
		}
		return s.undoFailedAcquire(ctx, conn, keys, excl, err)
	}
	if len(rReq) == 0 {
		if len(unlock) > 0 {
			if _, err := conn.Exec(ctx, s.unlockSQL, unlock, unlockExcl); err != nil {
				return undo(err)
			}
		}
		return nil
	}
	if unlock == nil {
		unlock, unlockExcl = []int64{}, []bool{}
	}
	rows, err := conn.Query(ctx, s.lockSQL, unlock, unlockExcl, rReq, rKey, rExcl)
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
		clear(fences)
		return undo(err)
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
	return nil
}

// undoFailedAcquire releases what a failed lock_batch may have taken before
// it failed: session-level advisory locks survive the error of the statement
// that took them (a full lock table, a statement timeout). Those are the
// keys the call asked the server for; unlocking one it did not get is a
// no-op. If even that fails, the connection is closed, which releases all.
// It returns cause. Caller holds mu and conn.
func (s *pgSession) undoFailedAcquire(ctx context.Context, conn *pgx.Conn, keys []*int64, excl []bool, cause error) error {
	if conn.IsClosed() {
		return cause
	}
	var uk []int64
	var ux []bool
	for i, k := range keys {
		if k != nil {
			uk, ux = append(uk, *k), append(ux, excl[i])
		}
	}
	if len(uk) == 0 {
		return cause
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, s.unlockSQL, uk, ux); err != nil {
		conn.Close(ctx) // drops every lock of the session; the grants are reported lost
		return fmt.Errorf("%w (and could not undo it: %v)", cause, err)
	}
	return cause
}

func (s *pgSession) Release(ctx context.Context, owners []Owner) error {
	s.mu.Lock()
	report := func() {}
	defer func() { s.mu.Unlock(); report() }()
	// Count down on a copy first: the table changes only once the server has
	// released, so a call that fails without effect can be retried.
	keys, excl, left := s.countDown(owners)
	if len(keys) > 0 {
		broken := false
		err := s.conn.use(ctx, func(conn *pgx.Conn) error {
			if report = s.current(conn); len(s.owned) == 0 {
				return nil // the connection those locks lived on is gone
			}
			_, err := conn.Exec(ctx, s.unlockSQL, keys, excl)
			broken = err != nil && conn.IsClosed()
			return err
		})
		if err != nil {
			if broken {
				report = s.fail(fmt.Errorf("%w: lock connection failed: %v", ErrLockLost, err))
			}
			return fmt.Errorf("tasking: release locks: %w", err)
		}
	}
	s.forget(owners, left)
	return nil
}

// countDown works out what releasing owners' grants leaves: the keys whose
// last holder goes (to unlock on the server, with their modes) and every
// touched key's remaining holders. Caller holds mu.
func (s *pgSession) countDown(owners []Owner) (keys []int64, excl []bool, left map[int64]int) {
	left = make(map[int64]int)
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
	return keys, excl, left
}

// forget applies countDown's result to the table. Caller holds mu.
func (s *pgSession) forget(owners []Owner, left map[int64]int) {
	for k, n := range left {
		if n == 0 {
			delete(s.table, k)
		} else if h := s.table[k]; h != nil {
			h.holders = n
		}
	}
	for _, o := range owners {
		delete(s.owned, o)
	}
}

// releaseThenAcquire is Release(owners) and then TryAcquire(reqs) in one
// statement and one round trip: lock_batch unlocks before it locks. The
// worker calls it after a step, for the grants of the tasks that step
// finished and of the ones it claimed. The table forgets the released
// grants before the requests are decided, so a claimed task may have what a
// finished one held. If the call fails, the released grants are forgotten
// anyway: lock_batch unlocks first, and session locks survive a failed
// statement only for what it locked (undone like any failed acquire); a
// broken connection drops them all.
func (s *pgSession) releaseThenAcquire(ctx context.Context, owners []Owner, reqs []LockRequest) ([]int64, error) {
	fences := make([]int64, len(reqs))
	s.mu.Lock()
	report := func() {}
	defer func() { s.mu.Unlock(); report() }()
	if s.err != nil {
		return nil, s.err
	}
	broken := false
	err := s.conn.use(ctx, func(conn *pgx.Conn) error {
		report = s.current(conn)
		keys, excl, left := s.countDown(owners)
		s.forget(owners, left)
		err := s.acquire(ctx, conn, keys, excl, reqs, fences)
		broken = err != nil && conn.IsClosed()
		return err
	})
	if err != nil {
		if broken {
			lost := s.fail(fmt.Errorf("%w: lock connection failed: %v", ErrLockLost, err))
			prev := report
			report = func() { prev(); lost() }
		}
		if len(owners) == 0 {
			return nil, fmt.Errorf("tasking: acquire locks: %w", err)
		}
		return nil, fmt.Errorf("tasking: release and acquire locks: %w", err)
	}
	return fences, nil
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
	if len(s.owned) > 0 {
		// Unlock explicitly: the worker's connection may outlive the session.
		if _, err := s.conn.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
			s.cfg.Logger.Warn("tasking: unlock on close", "err", err)
		}
	}
	if s.own {
		s.conn.close(ctx)
	}
	clear(s.table)
	clear(s.owned)
	return nil
}
