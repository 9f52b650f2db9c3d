package main

import (
	"errors"
	"fmt"

	"github.com/redis/rueidis"

	"github.com/tasking-go/tasking"
)

// newLocker builds the locker named by -locker.
func newLocker(cfg config) (tasking.ResourceLocker, error) {
	switch cfg.locker {
	case "postgres":
		return tasking.NewPostgresLocker(tasking.WithLockCheckInterval(cfg.lockCheck)), nil
	case "memory":
		// Locks live in this process only: fine for one faultworker, never
		// for a fleet of them.
		return tasking.NewMemoryLocker(), nil
	case "redis":
		if newRedisLocker == nil {
			return nil, errors.New(`-locker redis: not wired yet; see the HOOK(redis) in internal/faultworker/locker.go`)
		}
		return newRedisLocker(cfg.redis)
	}
	return nil, fmt.Errorf(`-locker %q: want "postgres", "memory" or "redis"`, cfg.locker)
}

// newRedisLocker builds the Redis locker for -locker redis and -redis
// <addr>. Fault scenario 3 (Redis restart and FLUSHALL) starts workers with
// it. The client lives as long as the process.
var newRedisLocker = func(addr string) (tasking.ResourceLocker, error) {
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		return nil, fmt.Errorf("redis %s: %w", addr, err)
	}
	return tasking.NewRedisLocker(rdb), nil
}
