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
type redisBus struct {
	l       *redisLocker
	channel string
	log     *slog.Logger
}

// dispatchChannel is empty: the dispatch statement sends no NOTIFY.
func (b *redisBus) dispatchChannel() string { return "" }

func (b *redisBus) autocommitChannel() string { return "" }

func (b *redisBus) dispatched(ctx context.Context) { b.publish(ctx, "dispatch wake-up", "w") }

func (b *redisBus) released(ctx context.Context) { b.publish(ctx, "release wake-up", "w") }

// canceled tells the task's worker, which cancels the handler (the cancel
// statement sent no NOTIFY: dispatchChannel is empty).
func (b *redisBus) canceled(ctx context.Context, id int64) {
	b.publish(ctx, "cancel signal", "c"+strconv.FormatInt(id, 10))
}

func (b *redisBus) publish(ctx context.Context, what, msg string) {
	if err := b.send(ctx, msg); err != nil && ctx.Err() == nil {
		b.l.health.failed(b.log, b.l.rdb, what, err)
	}
}

func (b *redisBus) notify(ctx context.Context) error { return b.send(ctx, "w") }

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
func (b *redisBus) listen(ctx context.Context, wake func(), cancel func(id int64)) error {
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
				wake()
			}
		})
		err := rdb.Receive(sctx, rdb.B().Subscribe().Channel(b.channel).Build(), func(m rueidis.PubSubMessage) {
			onMessage(m.Message, wake, cancel)
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
		wake() // something may have been missed
		sleepCtx(ctx, jitter(backoff))
		backoff = min(backoff*2, 5*time.Second)
	}
	return nil
}
