package tasking

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/redis/rueidis"
)

// The Redis locker's wake-ups (pub/sub on the namespace's channel) and its
// outage reporting, shared by the lock sessions and the bus of one locker.

// redisHealth logs an outage once, not once per failed call.
type redisHealth struct {
	mu   sync.Mutex
	down bool
}

// failed records a failed call. A reply the server sent (a Redis error) is
// not an outage and is logged as what it is.
func (h *redisHealth) failed(log *slog.Logger, rdb rueidis.Client, what string, err error) {
	if _, ok := rueidis.IsRedisErr(err); ok {
		log.Error("tasking: redis refused "+what, "err", err)
		return
	}
	h.mu.Lock()
	first := !h.down
	h.down = true
	h.mu.Unlock()
	if first {
		log.Warn("tasking: redis unreachable; admission paused until it is back",
			"addr", redisAddr(rdb), "during", what, "err", err)
	}
}

// failedWakeup records a failed PUBLISH: workers then find the task on
// their next poll.
func (h *redisHealth) failedWakeup(log *slog.Logger, rdb rueidis.Client, what string, err error) {
	h.mu.Lock()
	first := !h.down
	h.down = true
	h.mu.Unlock()
	if first {
		log.Warn("tasking: redis unreachable; "+what+" not sent, workers find tasks on their next poll",
			"addr", redisAddr(rdb), "err", err)
	}
}

func (h *redisHealth) ok(log *slog.Logger) {
	h.mu.Lock()
	was := h.down
	h.down = false
	h.mu.Unlock()
	if was {
		log.Info("tasking: redis reachable again")
	}
}

// newBus makes the clients of this locker wake workers through Redis
// pub/sub instead of LISTEN/NOTIFY (see wake.go).
func (l *redisLocker) newBus(c *Client) wakeBus {
	return &redisBus{l: l, channel: redisTag(l.namespace(c.Schema())) + "wake", log: c.log}
}

// redisBus wakes workers through Redis pub/sub on the namespace's channel.
//
// Publishing never holds up the call that asked for it (a Dispatch or Cancel
// whose database write has committed): wake-ups go out in the background,
// coalesced, each bounded by publishTimeout. A wake-up that is lost (Redis
// down or hung) costs latency, not correctness: the workers find the task
// on their next poll (about once per WithPollInterval across the fleet), and
// a running task whose cancel signal was lost is canceled by its worker's
// next heartbeat.
type redisBus struct {
	l       *redisLocker
	channel string
	log     *slog.Logger
	wakeup  coalescer
	health  redisHealth
}

// publishTimeout bounds one background PUBLISH.
const publishTimeout = 2 * time.Second

// dispatchChannel is empty: the dispatch statement sends no NOTIFY.
func (b *redisBus) dispatchChannel() string { return "" }

func (b *redisBus) autocommitChannel() string { return "" }

func (b *redisBus) listenChannel() string { return "" }

func (b *redisBus) dispatched(context.Context) {
	b.wakeup.ask(func() { b.publish("wake-up", "w") })
}

func (b *redisBus) released(ctx context.Context) { b.dispatched(ctx) }

func (b *redisBus) flush(ctx context.Context) error { return b.wakeup.drain(ctx) }

// canceled tells the task's worker, which cancels the handler (the cancel
// statement sent no NOTIFY: dispatchChannel is empty).
func (b *redisBus) canceled(_ context.Context, id int64) {
	go b.publish("cancel signal", "c"+strconv.FormatInt(id, 10))
}

func (b *redisBus) publish(what, msg string) {
	ctx, cancel := context.WithTimeout(context.Background(), publishTimeout)
	defer cancel()
	if err := b.send(ctx, msg); err != nil {
		b.health.failedWakeup(b.log, b.l.rdb, what, err)
		return
	}
	b.health.ok(b.log)
}

func (b *redisBus) notify(ctx context.Context) error { return b.send(ctx, "w") }

func (b *redisBus) tell(ctx context.Context, msg string) error {
	if b.l.rdb == nil {
		return inputErr("redis client", "nil rueidis.Client")
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	// Only workers tell: their locker's health says once that Redis is gone.
	if err := b.send(ctx, msg); err != nil {
		if parent.Err() == nil { // not the worker's shutdown canceling it
			b.l.health.failed(b.log, b.l.rdb, "message to the other workers", err)
		}
		return err
	}
	b.l.health.ok(b.log)
	return nil
}

func (b *redisBus) send(ctx context.Context, msg string) error {
	rdb := b.l.rdb
	if rdb == nil {
		return inputErr("redis client", "nil rueidis.Client")
	}
	return rdb.Do(ctx, rdb.B().Publish().Channel(b.channel).Message(msg).Build()).Error()
}

// listen subscribes to the channel, reconnecting with backoff. Every
// (re)subscription wakes the worker: wake-ups may have been missed while
// it was not subscribed.
func (b *redisBus) listen(ctx context.Context, rcv busReceiver) error {
	rdb := b.l.rdb
	if rdb == nil {
		return nil
	}
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		var subscribed bool
		var mu sync.Mutex
		sctx := rueidis.WithOnSubscriptionHook(ctx, func(s rueidis.PubSubSubscription) {
			if s.Kind == "subscribe" {
				mu.Lock()
				subscribed = true
				mu.Unlock()
				rcv.onListening()
			}
		})
		err := rdb.Receive(sctx, rdb.B().Subscribe().Channel(b.channel).Build(), func(m rueidis.PubSubMessage) {
			rcv.onMessage(m.Message)
		})
		if ctx.Err() != nil {
			break
		}
		mu.Lock()
		if subscribed {
			backoff = 50 * time.Millisecond
		}
		mu.Unlock()
		if err == nil {
			err = errors.New("subscription ended")
		}
		b.l.health.failed(b.log, rdb, "subscribe", err)
		rcv.onMessage("w") // something may have been missed
		sleepCtx(ctx, jitter(backoff))
		backoff = min(backoff*2, 5*time.Second)
	}
	return nil
}
