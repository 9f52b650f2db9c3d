package main

import (
	"errors"
	"fmt"

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

// HOOK(redis): newRedisLocker builds the Redis locker for -locker redis and
// -redis <addr>. It is nil until tasking.NewRedisLocker exists on this branch
// (it is being added on another branch). To wire it, add
// github.com/redis/rueidis to this file's imports and set, for example:
//
//	func init() {
//		newRedisLocker = func(addr string) (tasking.ResourceLocker, error) {
//			rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}})
//			if err != nil {
//				return nil, fmt.Errorf("redis %s: %w", addr, err)
//			}
//			return tasking.NewRedisLocker(rdb), nil
//		}
//	}
//
// Fault scenario 3 (Redis restart and FLUSHALL) in fault_test.go starts
// workers with -locker redis once this is set.
var newRedisLocker func(addr string) (tasking.ResourceLocker, error)
