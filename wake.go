package tasking

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/rand/v2"
	"sync"
	"time"
)

// wakeBus carries wake-ups between dispatchers and workers: "a task was
// dispatched" and "resources were released". It only makes workers look
// sooner; a lost wake-up costs latency (the jittered poll catches up),
// never correctness.
type wakeBus interface {
	// dispatchChannel is the NOTIFY channel the dispatch statement signals
	// on commit, or "" when the bus wakes workers some other way.
	dispatchChannel() string
	// autocommitChannel is dispatchChannel for autocommitted dispatches,
	// which are followed by dispatched().
	autocommitChannel() string
	// dispatched is called after an autocommitted dispatch.
	dispatched(ctx context.Context)
	// released is called when tasks became ready that the caller did not
	// take (a worker's step, a cancel, a cleanup), to wake other workers.
	released(ctx context.Context)
	// listenChannel is the channel a worker's connection LISTENs on, or ""
	// when the bus delivers wake-ups through listen.
	listenChannel() string
	// notify wakes the workers now (Client.Notify).
	notify(ctx context.Context) error
	// canceled is called after a running task was set canceling, to tell
	// its worker (a no-op when the cancel statement notified already).
	canceled(ctx context.Context, id int64)
	// tell sends a message to every worker of the schema (see
	// wake_peers.go); it reports failures itself.
	tell(ctx context.Context, msg string) error
	// flush waits until the wake-ups asked for so far are sent, and sends
	// no more (Client.Close).
	flush(ctx context.Context) error
	// listen hands every message to rcv until ctx is done (nothing for a
	// bus whose workers LISTEN).
	listen(ctx context.Context, rcv busReceiver) error
}

// busReceiver is a worker, as the bus sees it.
type busReceiver interface {
	onMessage(payload string) // "c<id>" cancels a task, see run.onMessage
	onListening()             // (re)subscribed: messages may have been missed
}

// newBus picks the wake-up transport that goes with the client's locker.
func newBus(c *Client) wakeBus {
	if b, ok := c.locker.(interface{ newBus(*Client) wakeBus }); ok {
		return b.newBus(c)
	}
	return &pgBus{c: c, channel: notifyChannel(c.schema)}
}

// notifyChannel names the schema's NOTIFY channel, within PostgreSQL's
// 63-byte identifier limit.
func notifyChannel(schema string) string {
	ch := "tasking:" + schema
	if len(ch) > 63 {
		sum := sha256.Sum256([]byte(schema))
		ch = "tasking:" + hex.EncodeToString(sum[:16])
	}
	return ch
}

// pgBus wakes workers with LISTEN/NOTIFY.
//
// A dispatch in the caller's transaction NOTIFYs from inside it, so the
// wake-up goes out exactly when the caller commits. An autocommitted
// dispatch does not: PostgreSQL serialises the commits of transactions that
// NOTIFY (they queue on one global lock), which capped concurrent
// dispatchers at a few thousand tasks/s. It sends its wake-up after the
// commit instead, coalesced: at most one NOTIFY in flight per client, at
// least notifySpacing apart, and one more after it if dispatches committed
// meanwhile, so every commit is followed by a NOTIFY sent after it.
type pgBus struct {
	c       *Client
	channel string
	wakeup  coalescer
}

func (b *pgBus) dispatchChannel() string { return b.channel }

// autocommitChannel: autocommitted dispatches notify after their commit.
func (b *pgBus) autocommitChannel() string { return "" }

func (b *pgBus) dispatched(context.Context) {
	b.wakeup.ask(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.notify(ctx); err != nil {
			b.c.log.Warn("tasking: dispatch wake-up not sent; workers will find the task on their next poll", "err", err)
		}
		// Space them out: thousands of NOTIFY commits a second stall
		// PostgreSQL now and then (stream, 3,600 tasks/s: dispatch-to-start
		// p99 56 ms, 7 ms with this spacing).
		time.Sleep(notifySpacing)
	})
}

// notifySpacing is the least time between two dispatch NOTIFYs of a client.
const notifySpacing = time.Millisecond

// coalescer runs a send at most once at a time, and once more after it if
// asked again meanwhile: every ask is followed by a send that started after
// it, and a burst of asks costs two sends, not one each. After stop, asks
// are ignored.
type coalescer struct {
	mu      sync.Mutex
	sending bool // a send is in flight
	again   bool // asked since it started
	stopped bool // asks are ignored, and a send asked for meanwhile is dropped
	closed  bool // asks are ignored; a send asked for meanwhile still goes
	wg      sync.WaitGroup
}

// drain ignores later asks and waits until the sends asked for so far have
// been made, or ctx is done.
func (c *coalescer) drain(ctx context.Context) error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	done := make(chan struct{})
	go func() { c.wg.Wait(); close(done) }() // no Add after closed
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stop ignores later asks and waits for the send in flight.
func (c *coalescer) stop() {
	c.mu.Lock()
	c.stopped = true
	c.mu.Unlock()
	c.wg.Wait()
}

func (c *coalescer) ask(send func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped || c.closed {
		return
	}
	if c.sending {
		c.again = true
		return
	}
	c.sending = true
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			send()
			c.mu.Lock()
			if !c.again || c.stopped {
				c.sending = false
				c.mu.Unlock()
				return
			}
			c.again = false
			c.mu.Unlock()
		}
	}()
}

func (b *pgBus) canceled(context.Context, int64) {} // the cancel statement notified

func (b *pgBus) flush(ctx context.Context) error { return b.wakeup.drain(ctx) }

// released: the statements that make tasks ready notify themselves (step,
// cancel); what is left is the rare cleanup, sent like a dispatch wake-up.
func (b *pgBus) released(ctx context.Context) { b.dispatched(ctx) }

func (b *pgBus) listenChannel() string { return b.channel }

func (b *pgBus) notify(ctx context.Context) error { return b.tell(ctx, "d") }

// tell is not what workers use: they NOTIFY on their own connection.
func (b *pgBus) tell(ctx context.Context, msg string) error {
	_, err := b.c.pool.Exec(ctx, "SELECT pg_notify($1, $2)", b.channel, msg)
	return err
}

// listen does nothing: a worker LISTENs on its own connection (see
// workerConn), so that it needs no connection for it.
func (b *pgBus) listen(context.Context, busReceiver) error { return nil }

// waiters serves Client.Wait and Client.WaitGroup: one goroutine polls for
// all waiting calls at once, faster right after a wake-up, slower as time
// passes.
type waiters struct {
	c       *Client
	mu      sync.Mutex
	m       map[int64][]chan *Task  // tasks waited for
	g       map[int64][]chan *Group // groups waited for
	kick    chan struct{}
	polling bool
}

func newWaiters(c *Client) *waiters {
	return &waiters{c: c, m: make(map[int64][]chan *Task), g: make(map[int64][]chan *Group), kick: make(chan struct{}, 1)}
}

func (w *waiters) wait(ctx context.Context, id int64) (*Task, error) {
	return waitIn(ctx, w, w.m, id)
}

func (w *waiters) waitGroup(ctx context.Context, id int64) (*Group, error) {
	return waitIn(ctx, w, w.g, id)
}

// waitIn waits for the poller to deliver id's value through m.
func waitIn[T any](ctx context.Context, w *waiters, m map[int64][]chan T, id int64) (T, error) {
	ch := make(chan T, 1)
	w.mu.Lock()
	m[id] = append(m[id], ch)
	if !w.polling {
		w.polling = true
		go w.poll()
	}
	w.mu.Unlock()
	w.poke()
	select {
	case t := <-ch:
		return t, nil
	case <-ctx.Done():
		w.mu.Lock()
		chans := m[id]
		for i, c := range chans {
			if c == ch {
				chans = append(chans[:i], chans[i+1:]...)
				break
			}
		}
		if len(chans) == 0 {
			delete(m, id)
		} else {
			m[id] = chans
		}
		w.mu.Unlock()
		select {
		case t := <-ch: // delivered while we were giving up
			return t, nil
		default:
		}
		var zero T
		return zero, context.Cause(ctx)
	}
}

// poke makes the poller look now (a task was finished in this process).
func (w *waiters) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

const (
	waitPollMin = 5 * time.Millisecond
	waitPollMax = 500 * time.Millisecond
)

func (w *waiters) poll() {
	interval := waitPollMin
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-w.kick:
			interval = waitPollMin
		case <-timer.C:
		}
		w.mu.Lock()
		if len(w.m) == 0 && len(w.g) == 0 {
			w.polling = false
			w.mu.Unlock()
			return
		}
		ids := make([]int64, 0, len(w.m))
		for id := range w.m {
			ids = append(ids, id)
		}
		gids := make([]int64, 0, len(w.g))
		for id := range w.g {
			gids = append(gids, id)
		}
		w.mu.Unlock()

		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var done []*Task
		var err error
		if len(ids) > 0 {
			done, err = w.c.finals(ctx, ids)
		}
		var groups []*Group
		if len(gids) > 0 && err == nil {
			groups, err = w.c.doneGroups(ctx, gids)
		}
		cancel()
		if err != nil {
			w.c.log.Warn("tasking: wait poll failed", "err", err)
		}
		w.mu.Lock()
		for _, t := range done {
			for _, ch := range w.m[t.ID] {
				ch <- t
			}
			delete(w.m, t.ID)
		}
		for _, g := range groups {
			for _, ch := range w.g[g.ID] {
				ch <- g
			}
			delete(w.g, g.ID)
		}
		w.mu.Unlock()
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(jitter(interval))
		interval = min(interval*2, waitPollMax)
	}
}

// jitter returns d ± 20%.
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return d - d/5 + rand.N(2*d/5+1)
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
