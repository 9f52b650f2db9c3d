package tasking

import (
	"log/slog"
	"sync"
	"time"
)

// failureLog reports a repeated failure without flooding the log: the
// first failure as it happens, then a summary at most every summaryEvery
// while it lasts, then the recovery.
type failureLog struct {
	log  *slog.Logger
	what string // "heartbeat", "cleanup of dead workers", ...

	mu       sync.Mutex
	failures int
	since    time.Time
	lastSaid time.Time
}

// summaryEvery is how often a lasting failure is summarised.
const summaryEvery = time.Minute

func (f *failureLog) failed(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	f.failures++
	switch {
	case f.failures == 1:
		f.since, f.lastSaid = now, now
		f.log.Warn("tasking: "+f.what+" failed; retrying", "err", err)
	case now.Sub(f.lastSaid) >= summaryEvery:
		f.lastSaid = now
		f.log.Warn("tasking: "+f.what+" still failing", "failures", f.failures,
			"since", f.since.Format(time.RFC3339), "err", err)
	}
}

func (f *failureLog) ok() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failures > 0 {
		f.log.Info("tasking: "+f.what+" recovered", "failures", f.failures, "after", time.Since(f.since).Round(time.Millisecond))
		f.failures = 0
	}
}
