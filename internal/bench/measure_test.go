package bench

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tasking-go/tasking/internal/testdb"
)

// connect opens a connection whose tracer tells s it belongs to owner.
func connect(t *testing.T, s *sampler, dsn string, owner int, bouncer bool) *pgx.Conn {
	t.Helper()
	cc, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cc.Tracer = newStmtTracer(func(ev connEvent) { s.add(ev, owner) })
	if bouncer {
		cc.DefaultQueryExecMode = pgx.QueryExecModeExec
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func TestSamplerPeakPerWorkerProcess(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newSampler(testdb.Pool(t, 2), nil)
	var p0 []*pgx.Conn
	for range 3 {
		p0 = append(p0, connect(t, s, testdb.DatabaseURL(), 0, false))
	}
	connect(t, s, testdb.DatabaseURL(), 1, false)
	connect(t, s, testdb.DatabaseURL(), ownerDispatch, false)
	s.sample(ctx)
	if now, peak := s.conns(); now != 5 || peak != 5 {
		t.Errorf("connections now, peak = %d, %d; want 5, 5", now, peak)
	}
	if perProc, workers, _ := s.peaks(); perProc != 3 || workers != 4 {
		t.Errorf("peak per worker process, of the workers = %d, %d; want 3 (process 0's), 4", perProc, workers)
	}
	for _, c := range p0[:2] {
		c.Close(ctx)
	}
	// A closed connection's backend exits shortly after the client hangs
	// up: sample until both are gone from pg_stat_activity (or give up),
	// before the next connection, so that the peak cannot see all of them.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		s.sample(ctx)
		if now, _ := s.conns(); now <= 3 || time.Now().After(deadline) {
			break
		}
	}
	connect(t, s, testdb.DatabaseURL(), 1, false)
	s.sample(ctx)
	if now, peak := s.conns(); now != 4 || peak != 5 {
		t.Errorf("after closing two: connections now, peak = %d, %d; want 4, 5", now, peak)
	}
	if perProc, _, _ := s.peaks(); perProc != 3 {
		t.Errorf("peak per worker process = %d, want it to stay 3", perProc)
	}
}

func TestPgBouncerTransactionPooling(t *testing.T) {
	t.Parallel()
	if _, ok := findPgBouncer(); !ok {
		t.Skip("pgbouncer not installed (apt-get install pgbouncer)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b, err := startPgBouncer(ctx, testdb.DatabaseURL(), 2, 100)
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			b.stop()
		}
	}()
	s := newSampler(testdb.Pool(t, 2), b)
	// Four clients share at most two server connections; statements with
	// parameters and transactions work in the Exec query mode.
	var conns []*pgx.Conn
	for i := range 4 {
		c := connect(t, s, b.dsn, i/2, true)
		conns = append(conns, c)
		for range 3 {
			var n int
			if err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				return tx.QueryRow(ctx, "SELECT $1::int + 1", i).Scan(&n)
			}); err != nil || n != i+1 {
				t.Fatalf("client %d through PgBouncer: %v (got %d)", i, err, n)
			}
		}
	}
	// Hold both server connections in open transactions while sampling.
	for _, c := range conns[:2] {
		if _, err := c.Exec(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	s.sample(ctx)
	if perProc, workers, servers := s.peaks(); perProc != 2 || workers != 2 || servers != 2 {
		t.Errorf("peak per worker process, of the workers, PgBouncer servers = %d, %d, %d; want 2, 2, 2", perProc, workers, servers)
	}
	if _, peak := s.conns(); peak != 2 {
		t.Errorf("peak PG connections = %d, want PgBouncer's 2", peak)
	}
	b.stop()
	stopped = true
	select {
	case <-b.exited:
	default:
		t.Error("pgbouncer still running after stop")
	}
	if _, err := os.Stat(b.dir); !os.IsNotExist(err) {
		t.Errorf("temp dir %s left behind: %v", b.dir, err)
	}
}
