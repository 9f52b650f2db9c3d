// Package testdb gives each test its own PostgreSQL schema (and Redis key
// namespace), so tests run in parallel and never depend on leftovers.
//
// The servers come from TASKING_DATABASE_URL (default
// postgres://postgres@127.0.0.1:5432/test) and TASKING_REDIS_ADDR (default
// 127.0.0.1:6379); scripts/test.sh starts throwaway ones when none is
// reachable.
package testdb

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// DatabaseURL returns the test database's connection string.
func DatabaseURL() string {
	if u := os.Getenv("TASKING_DATABASE_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
}

// RedisAddr returns the test Redis address.
func RedisAddr() string {
	if a := os.Getenv("TASKING_REDIS_ADDR"); a != "" {
		return a
	}
	return "127.0.0.1:6379"
}

// Name returns a fresh name with the given prefix, unique across runs.
func Name(prefix string) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return prefix + "_" + hex.EncodeToString(b[:])
}

// Pool returns a pool on the test database with at most maxConns
// connections, closed at the end of the test.
func Pool(tb testing.TB, maxConns int32) *pgxpool.Pool {
	tb.Helper()
	cfg, err := pgxpool.ParseConfig(DatabaseURL())
	if err != nil {
		tb.Fatalf("testdb: parse TASKING_DATABASE_URL: %v", err)
	}
	if maxConns > 0 {
		cfg.MaxConns = maxConns
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err == nil {
		err = pool.Ping(ctx)
	}
	if err != nil {
		tb.Fatalf("testdb: PostgreSQL not reachable (run ./scripts/test.sh to start one): %v", err)
	}
	tb.Cleanup(pool.Close)
	return pool
}

// Schema returns a fresh schema name and drops the schema when the test ends.
// The schema itself is not created: Client.Migrate does that.
func Schema(tb testing.TB, pool *pgxpool.Pool) string {
	tb.Helper()
	name := Name("t_" + sanitize(tb.Name()))
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{name}.Sanitize()+" CASCADE"); err != nil {
			tb.Logf("testdb: drop schema %s: %v", name, err)
		}
	})
	return name
}

func sanitize(s string) string {
	s = strings.ToLower(s)
	var b strings.Builder
	for _, r := range s {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
		if b.Len() >= 30 {
			break
		}
	}
	return b.String()
}

// Seed returns TASKING_SEED or a fresh seed, and logs it so that a failure
// can be replayed with TASKING_SEED=<seed>.
func Seed(tb testing.TB) uint64 {
	tb.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("TASKING_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			tb.Fatalf("TASKING_SEED: %v", err)
		}
		seed = v
	}
	tb.Logf("seed %d (replay with TASKING_SEED=%d)", seed, seed)
	return seed
}
