package tasking

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"
)

// RedisLockerOption configures [NewRedisLocker].
type RedisLockerOption func(*redisLocker)

// WithRedisNamespace sets the namespace of the locker's Redis keys and
// wake-up channel. Workers see each other's locks only within one namespace.
// Default: the client's schema name ([WithSchema]); set it when fleets of
// several databases that use the same schema name share one Redis.
func WithRedisNamespace(ns string) RedisLockerOption {
	return func(l *redisLocker) { l.ns = ns }
}

// WithRedisLease sets how long a grant lives in Redis without renewal. A
// worker that has not renewed for the lease less a tenth (Redis
// unreachable, process paused) gives its grants up and cancels their tasks,
// before another worker can be granted the names. Default: 30s.
func WithRedisLease(d time.Duration) RedisLockerOption {
	return func(l *redisLocker) { l.lease = d }
}

// WithRedisRenewInterval sets how often a worker renews the leases of all
// its grants, in one round trip. It must be shorter than the lease.
// Default: a third of the lease.
func WithRedisRenewInterval(d time.Duration) RedisLockerOption {
	return func(l *redisLocker) { l.renew = d }
}

// NewRedisLocker returns a locker that keeps the run-time locks in Redis,
// taking the lock traffic off PostgreSQL. The task records stay in
// PostgreSQL; only the locks and the workers' wake-ups move:
//
//	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{"127.0.0.1:6379"}})
//	...
//	c, err := tasking.New(pool, tasking.WithLocker(tasking.NewRedisLocker(rdb)))
//
// Grants are leases: an exclusive name is a string holding its owner, a
// shared name a sorted set of owners scored by expiry in server time. One
// Lua script grants a whole batch, each request all or nothing; every lease
// of a worker is renewed in one round trip, at a third of the lease by
// default; release is compare-and-delete. Each grant gets a fencing token
// ([Task.Fence]) that is larger than every earlier one of the namespace.
// All keys of a namespace share one hash tag, so it works on Redis Cluster.
//
// A grant whose lease could not be renewed in time (Redis unreachable,
// process paused, Redis restarted or flushed) is lost: the worker cancels
// the handler (context cause [ErrLockLost]) and fails the task with "lock
// lost". While Redis is unreachable workers admit nothing and resume by
// themselves once it is back.
//
// Wake-ups go through Redis pub/sub on the namespace's channel; workers send
// no LISTEN or NOTIFY to PostgreSQL. Dispatch and DispatchMany publish after
// they commit. [Client.DispatchTx] cannot, as the caller commits: such a task
// is picked up on the workers' next wake-up or the fleet's next poll (about
// once per [WithPollInterval], default 1s), unless the caller calls
// [Client.Notify] after the commit.
//
// rdb stays the caller's: close it after the workers and clients using it
// have stopped.
func NewRedisLocker(rdb rueidis.Client, opts ...RedisLockerOption) ResourceLocker {
	l := &redisLocker{rdb: rdb, lease: 30 * time.Second}
	for _, o := range opts {
		o(l)
	}
	return l
}

var (
	_ ResourceLocker = (*redisLocker)(nil)
	_ LockSession    = (*redisSession)(nil)
	_ LeaseChecker   = (*redisSession)(nil)
	_ WorkerFreer    = (*redisSession)(nil)
)

type redisLocker struct {
	rdb   rueidis.Client
	ns    string
	lease time.Duration
	renew time.Duration

	health redisHealth

	// beforeRenew, when set (by tests, before Open), runs at the start of
	// every renewal round; blocking in it simulates a paused process.
	beforeRenew func()
}

func (l *redisLocker) Kind() string { return "redis" }

// check validates the options; they cannot return errors themselves.
func (l *redisLocker) check() error {
	switch {
	case l.rdb == nil:
		return inputErr("redis client", "nil rueidis.Client")
	case l.lease < time.Millisecond:
		return inputErr("redis lease", "%v, need at least 1ms", l.lease)
	case l.renew < 0 || l.renew >= l.lease:
		return inputErr("redis renew interval", "%v, need more than 0 and less than the lease (%v)", l.renew, l.lease)
	}
	return nil
}

func (l *redisLocker) renewEvery() time.Duration {
	if l.renew > 0 {
		return l.renew
	}
	return l.lease / 3
}

// margin is how long before a lease's end, counted from the last renewal
// the worker sent, it gives the grant up when it cannot renew: room for the
// clocks' drift and for noticing late.
func (l *redisLocker) margin() time.Duration { return l.lease / 10 }

func (l *redisLocker) namespace(schema string) string {
	if l.ns != "" {
		return l.ns
	}
	return schema
}

func (l *redisLocker) Open(ctx context.Context, cfg LockSessionConfig) (LockSession, error) {
	if err := l.check(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err := l.rdb.Do(pctx, l.rdb.B().Ping().Build()).Error()
	cancel()
	if err != nil {
		return nil, fmt.Errorf("tasking: redis at %s unreachable: %w", redisAddr(l.rdb), err)
	}
	s := &redisSession{
		l:     l,
		cfg:   cfg,
		k:     newRedisKeys(l.namespace(cfg.Schema), cfg.Worker),
		owned: make(map[Owner]*redisGrant),
		doubt: make(map[Owner]*redisGrant),
		stop:  make(chan struct{}),
	}
	s.wg.Add(1)
	go s.renewLoop()
	return s, nil
}

// redisAddr names the server(s) of rdb for errors and logs, without any
// credentials an address might carry.
func redisAddr(rdb rueidis.Client) string {
	var addrs []string
	for a := range rdb.Nodes() {
		if i := strings.LastIndexByte(a, '@'); i >= 0 {
			a = "xxxxx@" + a[i+1:]
		}
		addrs = append(addrs, a)
	}
	sort.Strings(addrs)
	if len(addrs) == 0 {
		return "(no address)"
	}
	return strings.Join(addrs, ",")
}

// redisKeys names a namespace's keys. The hash tag is a digest of the
// namespace rather than the namespace itself, which could hold a '}' and
// end the tag early; resource names follow the tag verbatim (Redis keys are
// binary safe).
type redisKeys struct {
	tag      string // "{tk:<16 hex>}"
	fence    string
	registry string // the session's owner registry
	channel  string
}

func redisTag(ns string) string {
	sum := sha256.Sum256([]byte(ns))
	return "{tk:" + hex.EncodeToString(sum[:8]) + "}"
}

func newRedisKeys(ns string, worker int64) redisKeys {
	tag := redisTag(ns)
	return redisKeys{
		tag:      tag,
		fence:    tag + "fence",
		registry: registryKey(tag, worker),
		channel:  tag + "wake",
	}
}

func registryKey(tag string, worker int64) string {
	return tag + "owners:w" + strconv.FormatInt(worker, 10)
}

// appendNames appends the exclusive-string and shared-set keys of each
// name, in the scripts' layout.
func appendNames(keys []string, tag string, names ...[]string) []string {
	for _, ns := range names {
		for _, n := range ns {
			keys = append(keys, tag+"x:"+n, tag+"s:"+n)
		}
	}
	return keys
}

// ownerID is an owner as stored in Redis.
func ownerID(o Owner) string {
	return "w" + strconv.FormatInt(o.Worker, 10) + ":t" + strconv.FormatInt(o.Task, 10)
}

// redisGrant is what a session holds for one owner.
type redisGrant struct {
	excl, shared []string
	// deadline is when the lease may have run out on the server, less the
	// margin: the send time of the last successful acquire or renewal plus
	// the lease (the server counts from when it received the call).
	deadline time.Time
}

// registryValue is an owner's entry in its worker's registry: enough to
// free its names without the worker.
type registryValue struct {
	X []string `json:"x"`
	S []string `json:"s"`
}

type redisSession struct {
	l   *redisLocker
	cfg LockSessionConfig
	k   redisKeys

	mu     sync.Mutex
	owned  map[Owner]*redisGrant
	doubt  map[Owner]*redisGrant // asked for by a call that failed: maybe granted
	closed bool

	stop chan struct{}
	wg   sync.WaitGroup
}

func (s *redisSession) TryAcquire(ctx context.Context, reqs []LockRequest) ([]int64, error) {
	return s.releaseThenAcquire(ctx, nil, reqs)
}

// releaseThenAcquire is Release(owners) and then TryAcquire(reqs) in one
// script call: the worker calls it after a step, for the grants of the
// tasks that step finished and of the ones it claimed, so a step costs one
// Redis round trip, not two. A request may get what a released owner held.
// If the call fails, the released grants stay releasable (like a failed
// Release) and the requests are in doubt (like a failed TryAcquire): a
// Release of both frees whatever the server still holds.
func (s *redisSession) releaseThenAcquire(ctx context.Context, owners []Owner, reqs []LockRequest) ([]int64, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, errors.New("tasking: redis lock session is closed")
	}
	keys := make([]string, 2, 2+4*len(reqs))
	keys[0], keys[1] = s.k.fence, s.k.registry
	args := make([]string, 2, 2+4*len(reqs))
	args[0] = strconv.FormatInt(s.l.lease.Milliseconds(), 10)
	taken, keys, args := s.takeGrants(owners, keys, args)
	s.mu.Unlock()
	args[1] = strconv.Itoa(len(taken))
	for _, r := range reqs {
		reg, err := json.Marshal(registryValue{X: r.Exclusive, S: r.Shared})
		if err != nil {
			s.keepReleasable(taken)
			return nil, err
		}
		keys = appendNames(keys, s.k.tag, r.Exclusive, r.Shared)
		args = append(args, ownerID(r.Owner), strconv.Itoa(len(r.Exclusive)), strconv.Itoa(len(r.Shared)), string(reg))
	}
	if len(reqs) == 0 && len(taken) == 0 {
		return []int64{}, nil
	}
	rdb := s.l.rdb
	sent := time.Now()
	fences, err := acquireLua.Exec(ctx, rdb, keys, args).AsIntSlice()
	if err == nil && len(fences) != len(reqs) {
		err = fmt.Errorf("acquire script returned %d tokens for %d requests", len(fences), len(reqs))
	}
	if err != nil {
		s.keepReleasable(taken)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		// The script may have run: remember the requests so that the
		// caller's Release frees whatever they got.
		for _, r := range reqs {
			s.doubt[r.Owner] = &redisGrant{excl: r.Exclusive, shared: r.Shared}
		}
		if ctx.Err() == nil {
			s.l.health.failed(s.cfg.Logger, rdb, "acquire", err)
		}
		if len(owners) > 0 {
			return nil, fmt.Errorf("tasking: redis release and acquire: %w", err)
		}
		return nil, fmt.Errorf("tasking: redis acquire: %w", err)
	}
	s.l.health.ok(s.cfg.Logger)
	deadline := sent.Add(s.l.lease - s.l.margin())
	for i, r := range reqs {
		if fences[i] > 0 {
			s.owned[r.Owner] = &redisGrant{excl: r.Exclusive, shared: r.Shared, deadline: deadline}
		}
	}
	return fences, nil
}

func (s *redisSession) Release(ctx context.Context, owners []Owner) error {
	s.mu.Lock()
	taken, keys, args := s.takeGrants(owners, []string{s.k.registry}, nil)
	s.mu.Unlock()
	if len(taken) == 0 {
		return nil
	}
	err := releaseLua.Exec(ctx, s.l.rdb, keys, args).Error()
	if err == nil {
		s.l.health.ok(s.cfg.Logger)
		return nil
	}
	if ctx.Err() == nil {
		s.l.health.failed(s.cfg.Logger, s.l.rdb, "release", err)
	}
	s.keepReleasable(taken)
	return fmt.Errorf("tasking: redis release: %w", err)
}

// takeGrants takes owners' grants (held or in doubt) out of the session and
// appends what the release scripts need to free them: their names to keys,
// (owner, #exclusive, #shared) to args. Caller holds mu.
func (s *redisSession) takeGrants(owners []Owner, keys, args []string) (map[Owner]*redisGrant, []string, []string) {
	taken := make(map[Owner]*redisGrant, len(owners))
	for _, o := range owners {
		g := s.owned[o]
		if g == nil {
			g = s.doubt[o]
		}
		delete(s.owned, o)
		delete(s.doubt, o)
		if g == nil {
			continue
		}
		taken[o] = g
		keys = appendNames(keys, s.k.tag, g.excl, g.shared)
		args = append(args, ownerID(o), strconv.Itoa(len(g.excl)), strconv.Itoa(len(g.shared)))
	}
	return taken, keys, args
}

// keepReleasable puts back grants whose release failed, as in doubt: a
// retry or Close releases them; they are no longer renewed, so if nobody
// retries they run out with their leases.
func (s *redisSession) keepReleasable(taken map[Owner]*redisGrant) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for o, g := range taken {
		if s.owned[o] == nil && s.doubt[o] == nil {
			s.doubt[o] = g
		}
	}
}

// Close stops renewing and releases everything the session holds.
func (s *redisSession) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	close(s.stop)
	s.wg.Wait()
	s.mu.Lock()
	owners := make([]Owner, 0, len(s.owned)+len(s.doubt))
	for o := range s.owned {
		owners = append(owners, o)
	}
	for o := range s.doubt {
		owners = append(owners, o)
	}
	s.mu.Unlock()
	return s.Release(ctx, owners)
}

// renewLoop renews every lease of the session each renewal interval, and
// gives grants up when Redis stays unreachable until their leases may have
// run out. After a failed renewal it retries sooner, with backoff, so one
// lost packet does not cost a grant.
func (s *redisSession) renewLoop() {
	defer s.wg.Done()
	every := s.l.renewEvery()
	timer := time.NewTimer(every)
	defer timer.Stop()
	backoff := time.Duration(0)
	for {
		select {
		case <-s.stop:
			return
		case <-timer.C:
		}
		if s.l.beforeRenew != nil {
			s.l.beforeRenew()
		}
		next := every
		if err := s.renewOnce(); err != nil {
			backoff = min(max(2*backoff, every/16, time.Millisecond), every)
			next = backoff
			if d := s.expireOverdue(err); d > 0 && d < next {
				next = d // wake up in time to give the next grant up
			}
		} else {
			backoff = 0
		}
		timer.Reset(next)
	}
}

// renewOnce renews all of the session's grants in one round trip and
// reports the ones Redis no longer holds for their owner.
func (s *redisSession) renewOnce() error {
	s.mu.Lock()
	if len(s.owned) == 0 {
		s.mu.Unlock()
		return nil
	}
	owners := make([]Owner, 0, len(s.owned))
	grants := make([]*redisGrant, 0, len(s.owned))
	keys := []string{s.k.registry}
	args := []string{strconv.FormatInt(s.l.lease.Milliseconds(), 10)}
	for o, g := range s.owned {
		owners, grants = append(owners, o), append(grants, g)
		keys = appendNames(keys, s.k.tag, g.excl, g.shared)
		args = append(args, ownerID(o), strconv.Itoa(len(g.excl)), strconv.Itoa(len(g.shared)))
	}
	s.mu.Unlock()

	// Never wait past the earliest deadline: by then the answer is moot.
	timeout := s.l.renewEvery()
	for _, g := range grants {
		if d := time.Until(g.deadline); d < timeout {
			timeout = max(d, s.l.margin())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	sent := time.Now()
	lostIdx, err := renewLua.Exec(ctx, s.l.rdb, keys, args).AsIntSlice()
	cancel()
	if err != nil {
		s.l.health.failed(s.cfg.Logger, s.l.rdb, "lease renewal", err)
		return err
	}
	s.l.health.ok(s.cfg.Logger)
	lostSet := make(map[int]bool, len(lostIdx))
	for _, i := range lostIdx {
		lostSet[int(i)-1] = true
	}
	deadline := sent.Add(s.l.lease - s.l.margin())
	var lost []Owner
	s.mu.Lock()
	for i, o := range owners {
		// A grant released (or released and granted anew) while the
		// renewal was in flight is no longer the one that was renewed.
		if s.owned[o] != grants[i] {
			continue
		}
		if lostSet[i] {
			delete(s.owned, o)
			lost = append(lost, o)
		} else {
			grants[i].deadline = deadline
		}
	}
	s.mu.Unlock()
	s.reportLost(lost, fmt.Errorf("%w: redis no longer holds the grant (lease ran out, or redis lost its data)", ErrLockLost))
	return nil
}

// expireOverdue gives up the grants whose leases may have run out while
// renewals failed, and returns how long until the next grant's deadline
// (0 when none is left).
func (s *redisSession) expireOverdue(cause error) time.Duration {
	now := time.Now()
	var lost []Owner
	var next time.Duration
	s.mu.Lock()
	for o, g := range s.owned {
		if d := g.deadline.Sub(now); d <= 0 {
			delete(s.owned, o)
			lost = append(lost, o)
		} else if next == 0 || d < next {
			next = d
		}
	}
	s.mu.Unlock()
	s.reportLost(lost, fmt.Errorf("%w: lease could not be renewed in time: %v", ErrLockLost, cause))
	return next
}

// CheckLease gives up o's grant if its lease may have run out without the
// session noticing yet (the process was paused, the renewal goroutine
// starved). The worker calls it when a handler returns, before it decides
// the task's outcome, so such a task fails rather than completes.
func (s *redisSession) CheckLease(o Owner) {
	s.mu.Lock()
	g := s.owned[o]
	overdue := g != nil && !time.Now().Before(g.deadline)
	if overdue {
		delete(s.owned, o)
	}
	s.mu.Unlock()
	if overdue {
		s.reportLost([]Owner{o}, fmt.Errorf("%w: lease not renewed in time", ErrLockLost))
	}
}

func (s *redisSession) reportLost(owners []Owner, cause error) {
	if len(owners) == 0 || s.cfg.OnLost == nil {
		return
	}
	s.cfg.OnLost(owners, cause)
}

// FreeWorkers frees every grant recorded in the owner registries of gone
// worker instances of the session's schema. It is compare-and-delete like
// Release, so grants of other owners are never touched.
func (s *redisSession) FreeWorkers(ctx context.Context, workers []int64) error {
	return s.l.freeWorkers(ctx, s.cfg.Schema, workers)
}

func (l *redisLocker) freeWorkers(ctx context.Context, schema string, workers []int64) error {
	var errs []error
	for _, w := range workers {
		errs = append(errs, l.freeWorker(ctx, schema, w))
	}
	return errors.Join(errs...)
}

// freeWorker frees the grants in one worker instance's registry.
func (l *redisLocker) freeWorker(ctx context.Context, schema string, worker int64) error {
	if err := l.check(); err != nil {
		return err
	}
	tag := redisTag(l.namespace(schema))
	reg := registryKey(tag, worker)
	entries, err := l.rdb.Do(ctx, l.rdb.B().Hgetall().Key(reg).Build()).AsStrMap()
	if err != nil {
		return fmt.Errorf("tasking: read redis grants of worker %d: %w", worker, err)
	}
	keys := []string{reg}
	var args []string
	for owner, v := range entries {
		var rv registryValue
		if err := json.Unmarshal([]byte(v), &rv); err != nil {
			return fmt.Errorf("tasking: redis grant %s of worker %d: %w", owner, worker, err)
		}
		keys = appendNames(keys, tag, rv.X, rv.S)
		args = append(args, owner, strconv.Itoa(len(rv.X)), strconv.Itoa(len(rv.S)))
	}
	if len(args) == 0 {
		return nil
	}
	if err := releaseLua.Exec(ctx, l.rdb, keys, args).Error(); err != nil {
		return fmt.Errorf("tasking: free redis grants of worker %d: %w", worker, err)
	}
	return nil
}
