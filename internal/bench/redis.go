package bench

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"

	"github.com/tasking-go/tasking"
)

// redisEnv is one process's Redis client.
type redisEnv struct {
	rdb rueidis.Client
}

func openRedis(ctx context.Context, addr string, keepAlive time.Duration) (*redisEnv, error) {
	opt := rueidis.ClientOption{InitAddress: []string{addr}}
	opt.Dialer.KeepAlive = keepAlive // 0: rueidis's default
	rdb, err := rueidis.NewClient(opt)
	if err != nil {
		return nil, fmt.Errorf("redis at %s: %w", addr, err)
	}
	if err := rdb.Do(ctx, rdb.B().Ping().Build()).Error(); err != nil {
		rdb.Close()
		return nil, fmt.Errorf("redis at %s: %w", addr, err)
	}
	return &redisEnv{rdb: rdb}, nil
}

func (e *redisEnv) close() { e.rdb.Close() }

// locker returns a Redis locker in namespace ns whose commands cmds counts.
func (e *redisEnv) locker(ns string, cmds *cmdCounter) tasking.ResourceLocker {
	return tasking.NewRedisLocker(countingClient{Client: e.rdb, cmds: cmds}, tasking.WithRedisNamespace(ns))
}

// countingClient counts the commands the library sends (a Lua script run
// is one EVALSHA, or an EVAL after NOSCRIPT).
type countingClient struct {
	rueidis.Client
	cmds *cmdCounter
}

func (c countingClient) count(cmd rueidis.Completed) {
	if cs := cmd.Commands(); len(cs) > 0 {
		c.cmds.add(cs[0])
	}
}

func (c countingClient) Do(ctx context.Context, cmd rueidis.Completed) rueidis.RedisResult {
	c.count(cmd)
	return c.Client.Do(ctx, cmd)
}

func (c countingClient) DoMulti(ctx context.Context, cmds ...rueidis.Completed) []rueidis.RedisResult {
	for _, cmd := range cmds {
		c.count(cmd)
	}
	return c.Client.DoMulti(ctx, cmds...)
}

func (c countingClient) Receive(ctx context.Context, subscribe rueidis.Completed, fn func(rueidis.PubSubMessage)) error {
	c.count(subscribe)
	return c.Client.Receive(ctx, subscribe, fn)
}

// serverStats reads the server's command calls (INFO commandstats, without
// INFO itself) and its CPU seconds. Both are server-wide: other tenants of a
// shared Redis add to them.
func (e *redisEnv) serverStats(ctx context.Context) (calls int64, cpu float64, err error) {
	s, err := e.rdb.Do(ctx, e.rdb.B().Info().Section("commandstats").Section("cpu").Build()).ToString()
	if err != nil {
		// Redis before 7 takes one section per INFO.
		s, err = e.rdb.Do(ctx, e.rdb.B().Info().Section("all").Build()).ToString()
		if err != nil {
			return 0, 0, err
		}
	}
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "cmdstat_"):
			name, rest, _ := strings.Cut(line, ":")
			if name == "cmdstat_info" {
				continue
			}
			for _, kv := range strings.Split(rest, ",") {
				if v, ok := strings.CutPrefix(kv, "calls="); ok {
					n, _ := strconv.ParseInt(v, 10, 64)
					calls += n
				}
			}
		case strings.HasPrefix(line, "used_cpu_sys:"), strings.HasPrefix(line, "used_cpu_user:"):
			_, v, _ := strings.Cut(line, ":")
			x, _ := strconv.ParseFloat(v, 64)
			cpu += x
		}
	}
	return calls, cpu, nil
}

// namespaceTag is the hash tag the Redis locker puts in front of every key
// of namespace ns (see redisTag in lock_redis.go): the bench deletes the
// keys under it when it is done.
func namespaceTag(ns string) string {
	sum := sha256.Sum256([]byte(ns))
	return "{tk:" + hex.EncodeToString(sum[:8]) + "}"
}

// removeNamespace deletes every key of namespace ns and returns how many.
func (e *redisEnv) removeNamespace(ctx context.Context, ns string) (int, error) {
	pattern := strings.NewReplacer("[", `\[`, "]", `\]`, "*", `\*`, "?", `\?`).Replace(namespaceTag(ns)) + "*"
	n := 0
	var cursor uint64
	for {
		e2, err := e.rdb.Do(ctx, e.rdb.B().Scan().Cursor(cursor).Match(pattern).Count(1000).Build()).AsScanEntry()
		if err != nil {
			return n, err
		}
		if len(e2.Elements) > 0 {
			if err := e.rdb.Do(ctx, e.rdb.B().Unlink().Key(e2.Elements...).Build()).Error(); err != nil {
				return n, err
			}
			n += len(e2.Elements)
		}
		if cursor = e2.Cursor; cursor == 0 {
			return n, nil
		}
	}
}

const redisAvailable = true
