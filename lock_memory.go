package tasking

import (
	"context"
	"sync"
)

// NewMemoryLocker returns a locker that keeps its locks in this process.
// It suits tests and services whose workers all run in one process; workers
// in other processes cannot see its locks, so never use it for a fleet.
// Fencing tokens increase strictly across the locker's life.
func NewMemoryLocker() ResourceLocker {
	return &memoryLocker{locks: make(map[string]*memLock), owned: make(map[Owner][]memHeld)}
}

var _ ResourceLocker = (*memoryLocker)(nil)

type memoryLocker struct {
	mu    sync.Mutex
	fence int64
	locks map[string]*memLock
	owned map[Owner][]memHeld
}

type memLock struct {
	exclusive bool
	holders   int
}

type memHeld struct {
	name      string
	exclusive bool
}

func (l *memoryLocker) Kind() string { return "memory" }

func (l *memoryLocker) Open(ctx context.Context, cfg LockSessionConfig) (LockSession, error) {
	return &memorySession{l: l, worker: cfg.Worker}, nil
}

type memorySession struct {
	l      *memoryLocker
	worker int64
}

func (s *memorySession) TryAcquire(ctx context.Context, reqs []LockRequest) ([]int64, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	l := s.l
	l.mu.Lock()
	defer l.mu.Unlock()
	fences := make([]int64, len(reqs))
	for i, r := range reqs {
		if !l.free(r) {
			continue
		}
		held := make([]memHeld, 0, len(r.Exclusive)+len(r.Shared))
		for _, n := range r.Exclusive {
			l.locks[n] = &memLock{exclusive: true, holders: 1}
			held = append(held, memHeld{n, true})
		}
		for _, n := range r.Shared {
			if m := l.locks[n]; m != nil {
				m.holders++
			} else {
				l.locks[n] = &memLock{holders: 1}
			}
			held = append(held, memHeld{n, false})
		}
		l.owned[r.Owner] = append(l.owned[r.Owner], held...)
		l.fence++
		fences[i] = l.fence
	}
	return fences, nil
}

func (l *memoryLocker) free(r LockRequest) bool {
	for _, n := range r.Exclusive {
		if l.locks[n] != nil {
			return false
		}
	}
	for _, n := range r.Shared {
		if m := l.locks[n]; m != nil && m.exclusive {
			return false
		}
	}
	return true
}

func (s *memorySession) Release(ctx context.Context, owners []Owner) error {
	l := s.l
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, o := range owners {
		if o.Worker != s.worker {
			continue // another worker's grant is never this session's to drop
		}
		for _, h := range l.owned[o] {
			m := l.locks[h.name]
			if m == nil {
				continue
			}
			if m.holders--; m.holders <= 0 {
				delete(l.locks, h.name)
			}
		}
		delete(l.owned, o)
	}
	return nil
}

func (s *memorySession) Close(ctx context.Context) error {
	l := s.l
	l.mu.Lock()
	var mine []Owner
	for o := range l.owned {
		if o.Worker == s.worker {
			mine = append(mine, o)
		}
	}
	l.mu.Unlock()
	return s.Release(ctx, mine)
}

func (s *memorySession) releaseInline() {}
