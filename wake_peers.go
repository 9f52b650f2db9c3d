package tasking

import (
	"context"
	"strconv"
	"sync"
	"time"
)

// A step that makes tasks ready that it does not take wakes the other
// workers (docs/design.md §6). Only a worker with free slots that found
// nothing to claim can use such a wake-up: in a busy fleet none can, and
// every wake-up is a message that each worker receives (with the PostgreSQL
// bus, a NOTIFY statement and a delivery per listening connection). So
// workers tell each other when they become hungry and when they stop being
// so, and a step wakes the others only while one of them is hungry.
//
// Messages on the bus, next to "c<id>" (cancel) and wake-ups:
//
//	h<id>  worker id is hungry: its last claiming step found fewer ready
//	       tasks than it had free slots
//	s<id>  worker id is sated: its last claiming step filled its free slots
//	q      a worker (re)started listening: hungry workers say so again
//
// A worker that becomes hungry looks once more after its message went out,
// so a task made ready by a step that committed before the message reached
// that step's worker is not left for the poll: PostgreSQL delivers a
// notification to a listening session before the reply to its next
// statement, so a step that commits after the message was sent knows of it
// when it decides, and one that committed before is seen by the second look.
// Hungry workers repeat their message once per TTL, and knowledge of a peer
// expires after two TTLs, so a peer that died is forgotten. A lost message
// costs latency (the poll), never correctness; a peer that is wrongly
// thought hungry costs a wasted wake-up, as before this protocol.

// peerTable is what a worker knows of the others' appetite.
type peerTable struct {
	mu     sync.Mutex
	hungry map[int64]time.Time // hungry peers, by when they last said so
	self   bool                // this worker's own state, as last decided
	told   time.Time           // when this worker last said it is hungry
}

// peerMessage parses "h<id>" and "s<id>".
func peerMessage(payload string) (id int64, hungry, ok bool) {
	if len(payload) < 2 || payload[0] != 'h' && payload[0] != 's' {
		return 0, false, false
	}
	id, err := strconv.ParseInt(payload[1:], 10, 64)
	if err != nil {
		return 0, false, false
	}
	return id, payload[0] == 'h', true
}

func (p *peerTable) heard(id int64, hungry bool, now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !hungry {
		delete(p.hungry, id)
		return
	}
	if p.hungry == nil {
		p.hungry = make(map[int64]time.Time)
	}
	p.hungry[id] = now
}

// anyHungry reports whether a peer said it is hungry within maxAge, and
// forgets those that said so earlier.
func (p *peerTable) anyHungry(now time.Time, maxAge time.Duration) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, at := range p.hungry {
		if now.Sub(at) < maxAge {
			return true
		}
		delete(p.hungry, id)
	}
	return false
}

// set records this worker's state and reports whether it changed.
func (p *peerTable) set(hungry bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	changed := p.self != hungry
	p.self = hungry
	return changed
}

func (p *peerTable) isHungry() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.self
}

// onMessage handles one bus message for this worker.
func (r *run) onMessage(payload string) {
	switch {
	case len(payload) > 1 && payload[0] == 'c':
		if id, err := strconv.ParseInt(payload[1:], 10, 64); err == nil {
			r.cancelTask(id)
			return
		}
	case payload == "q":
		if r.peers.isHungry() {
			r.sayHunger()
		}
		return
	}
	if id, hungry, ok := peerMessage(payload); ok {
		// r.id is written by register; before that this worker has sent
		// nothing, so the message is another worker's.
		if !r.registered.Load() || id != r.id {
			r.peers.heard(id, hungry, time.Now())
		}
		return
	}
	r.signal()
}

// onListening runs when the worker (re)starts listening: wake-ups may have
// been missed meanwhile, and what it knew of its peers may be stale.
//
// Before the worker is registered (its connection opens for the schema
// check) it has no id and its logger is still being set: peers are told
// once registration is done (Worker.Run calls it again then).
func (r *run) onListening() {
	r.signal()
	if !r.registered.Load() {
		return
	}
	r.hungerSay.ask(func() { r.tellPeers("q") })
}

// setHungry records the outcome of a claiming step: hungry when it claimed
// fewer tasks than it had free slots.
func (r *run) setHungry(hungry bool) {
	if r.peers.set(hungry) {
		r.sayHunger()
	}
}

// sayHunger tells the others this worker's current state (the state when
// the message goes out, so a burst of changes costs at most two messages).
// After saying it is hungry, the worker looks once more (see above).
func (r *run) sayHunger() {
	r.hungerSay.ask(func() {
		hungry := r.peers.isHungry()
		msg := "s"
		if hungry {
			msg = "h"
		}
		if !r.tellPeers(msg + strconv.FormatInt(r.id, 10)) {
			return
		}
		if hungry {
			r.peers.mu.Lock()
			r.peers.told = time.Now()
			r.peers.mu.Unlock()
			r.signal()
		}
	})
}

// repeatHunger, from the heartbeat: a hungry worker says so again once per
// TTL, so that peers keep it (and forget workers that died).
func (r *run) repeatHunger() {
	r.peers.mu.Lock()
	due := r.peers.self && time.Since(r.peers.told) >= r.w.cfg.ttl
	r.peers.mu.Unlock()
	if due {
		r.sayHunger()
	}
}

// wakeOthers wakes the workers that can take tasks this worker made ready
// but did not take: this worker too when self is set (cleanup), else
// another lane of it with free slots, and the other workers if one of them
// is hungry. The wake-up goes out after the
// step, in the background and coalesced (see coalescer): a NOTIFY inside the
// step would make its commit queue on PostgreSQL's one lock for notifying
// commits.
func (r *run) wakeOthers(self bool) {
	if self || len(r.lanes) > 1 && r.freeSlots() > 0 {
		r.signal()
	}
	if !r.peers.anyHungry(time.Now(), 2*r.w.cfg.ttl) {
		return
	}
	r.wakeup.ask(func() {
		r.tellPeers("r")
		time.Sleep(notifySpacing)
	})
}

// tellPeers sends msg to every worker of the schema: a NOTIFY on the
// worker's own connection with the PostgreSQL bus, a publish otherwise.
func (r *run) tellPeers(msg string) bool {
	ctx, cancel := context.WithTimeout(r.msgCtx, 10*time.Second)
	defer cancel()
	var err error
	if ch := r.c.bus.listenChannel(); ch != "" {
		_, err = r.conn.Exec(ctx, "SELECT pg_notify($1, $2)", ch, msg)
	} else {
		err = r.c.bus.tell(ctx, msg)
	}
	if err != nil {
		if r.msgCtx.Err() == nil {
			r.log.Warn("tasking: message to the other workers not sent; they find the tasks on their next poll",
				"err", err)
		}
		return false
	}
	return true
}
