package faultenv_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking/internal/faultenv"
)

func TestPostgres(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL server")
	}
	start := time.Now()
	pg := faultenv.StartPostgres(t)
	t.Logf("PostgreSQL ready on port %d in %v", pg.Port(), time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	connect := func(app string) *pgx.Conn {
		cfg, err := pgx.ParseConfig(pg.URL())
		require.NoError(t, err)
		cfg.RuntimeParams["application_name"] = app
		conn, err := pgx.ConnectConfig(ctx, cfg)
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close(context.Background()) })
		return conn
	}
	a, b := connect("victim"), connect("bystander")
	_, err := a.Exec(ctx, "CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
	require.NoError(t, err)

	// Only the backend matching the filter is ended.
	names, err := pg.TerminateBackends("application_name = $1", "victim")
	require.NoError(t, err)
	require.Equal(t, []string{"victim"}, names)
	require.Error(t, a.Ping(ctx), "the victim's backend is gone")
	require.NoError(t, b.Ping(ctx), "the bystander's backend survived")

	// A restart keeps the port and the data, and ends every session.
	port := pg.Port()
	require.NoError(t, pg.Restart())
	require.Equal(t, port, pg.Port())
	require.Error(t, b.Ping(ctx))
	var v int
	require.NoError(t, connect("after").QueryRow(ctx, "SELECT v FROM kept").Scan(&v))
	require.Equal(t, 42, v)

	// Stopped means refused; a crash is recovered from at the next start.
	require.NoError(t, pg.Stop())
	require.Zero(t, pg.PID())
	_, err = pgx.Connect(ctx, pg.URL())
	require.Error(t, err)
	require.NoError(t, pg.Start())
	require.NoError(t, pg.Crash())
	require.NoError(t, pg.Start())
	require.NoError(t, connect("recovered").QueryRow(ctx, "SELECT v FROM kept").Scan(&v))
}

func TestRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis server")
	}
	start := time.Now()
	r := faultenv.StartRedis(t)
	t.Logf("Redis ready at %s in %v", r.Addr(), time.Since(start).Round(time.Millisecond))

	set := func() {
		reply, err := r.Do("SET", "k", "v")
		require.NoError(t, err)
		require.Equal(t, "OK", reply)
	}
	get := func() string {
		reply, err := r.Do("GET", "k")
		require.NoError(t, err)
		return reply
	}
	set()
	require.Equal(t, "v", get())
	require.NoError(t, r.FlushAll())
	require.Equal(t, "", get())

	set()
	addr := r.Addr()
	require.NoError(t, r.Restart())
	require.Equal(t, addr, r.Addr())
	require.Equal(t, "", get(), "a restart starts empty")

	require.NoError(t, r.Kill())
	_, err := r.Do("PING")
	require.Error(t, err)
	require.NoError(t, r.Start())
	_, err = r.Do("NOSUCHCOMMAND")
	require.ErrorContains(t, err, "unknown command")
}
