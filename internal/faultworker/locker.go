package main

import (
	"fmt"

	"github.com/redis/rueidis"

	"github.com/tasking-go/tasking"
)

// newLocker builds the locker named by -locker.
func newLocker(cfg config) (tasking.ResourceLocker, error) {
	switch cfg.locker {
	case "postgres":
		return tasking.NewPostgresLocker(tasking.WithPostgresLockCheckInterval(cfg.lockCheck)), nil
	case "memory":
		// Locks live in this process only: fine for one faultworker, never
		// for a fleet of them.
		return tasking.NewMemoryLocker(), nil
	case "redis":
		return newRedisLocker(cfg)
	}
	return nil, fmt.Errorf(`-locker %q: want "postgres", "memory" or "redis"`, cfg.locker)
}

// newRedisLocker builds the Redis locker for -locker redis, -redis <addr>
// and the lease flags. Fault scenarios 3 (Redis restart and FLUSHALL) and 6
// start workers with it. The client lives as long as the process.
func newRedisLocker(cfg config) (tasking.ResourceLocker, error) {
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{cfg.redis}, DisableCache: true})
	if err != nil {
		return nil, fmt.Errorf("redis %s: %w", cfg.redis, err)
	}
	var opts []tasking.RedisLockerOption
	if cfg.lease > 0 {
		opts = append(opts, tasking.WithRedisLease(cfg.lease))
	}
	if cfg.renew > 0 {
		opts = append(opts, tasking.WithRedisRenewInterval(cfg.renew))
	}
	return tasking.NewRedisLocker(rdb, opts...), nil
}
