package tasking_test

import (
	"testing"

	"github.com/redis/rueidis"
)

// newRedis returns a client of the Redis at addr, closed at the end of the
// test (after the workers using it, which stop in earlier cleanups).
func newRedis(t testing.TB, addr string) rueidis.Client {
	t.Helper()
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatalf("redis at %s not reachable (run ./scripts/test.sh to start one): %v", addr, err)
	}
	t.Cleanup(rdb.Close)
	return rdb
}
