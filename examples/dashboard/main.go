// Command dashboard starts a small fleet (two workers), keeps dispatching a
// mix of tasks to it (some conflicting on shared resources, some failing,
// one name that no worker handles) and serves the dashboard, so you can
// watch it work:
//
//	go run ./examples/dashboard [-addr 127.0.0.1:8080] [-dsn postgres://...]
//
// Then open http://127.0.0.1:8080/ . It works in a schema of its own and
// drops it when it stops (Ctrl-C).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/dashboard"
)

func main() {
	const fallback = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	dsn := flag.String("dsn", "", "PostgreSQL connection URL (default $TASKING_DATABASE_URL, else "+fallback+")")
	addr := flag.String("addr", "127.0.0.1:8080", "address to serve the dashboard on")
	every := flag.Duration("every", 300*time.Millisecond, "how often to dispatch a few tasks")
	flag.Parse()
	if *dsn == "" {
		*dsn = os.Getenv("TASKING_DATABASE_URL")
	}
	if *dsn == "" {
		*dsn = fallback
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *dsn, *addr, *every); err != nil {
		fmt.Fprintln(os.Stderr, "dashboard:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, dsn, addr string, every time.Duration) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return err
	}
	defer pool.Close()
	schema := fmt.Sprintf("example_dashboard_%x", rand.Uint32())
	defer func() {
		_, _ = pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
	}()
	client, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(log))
	if err != nil {
		return err
	}
	if err := client.Migrate(ctx); err != nil {
		return err
	}

	// Two workers: one syncs and publishes, the other resizes and reports.
	work := func(ctx context.Context, t *tasking.Task) error {
		select {
		case <-time.After(time.Duration(200+rand.IntN(1500)) * time.Millisecond):
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		if rand.IntN(8) == 0 {
			return errors.New("remote said no")
		}
		return t.SetResult(map[string]any{"ok": true, "took_by": t.WorkerID})
	}
	w1 := tasking.NewWorker(client, tasking.WithSlots(3), tasking.WithWorkerName("sync-worker"))
	w1.Handle("sync", work)
	w1.Handle("publish", work)
	w2 := tasking.NewWorker(client, tasking.WithSlots(2), tasking.WithWorkerName("media-worker"))
	w2.Handle("resize", work)
	w2.Handle("report", work)
	errs := make(chan error, 3)
	for _, w := range []*tasking.Worker{w1, w2} {
		go func() { errs <- w.Run(ctx) }()
	}

	// The dashboard, with cancel enabled, at the root of its own server.
	srv := &http.Server{Handler: dashboard.New(client, dashboard.AllowCancel(), dashboard.WithTitle("tasking example")),
		ReadHeaderTimeout: 5 * time.Second}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Printf("dashboard: http://%s/ (schema %s; Ctrl-C stops)\n", ln.Addr(), schema)
	go func() {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			errs <- err
		}
	}()

	// One task nobody handles, so "why is it waiting?" has something to say,
	// and a steady trickle of tasks that conflict on repositories and on the
	// CDN remote.
	if _, err := client.Dispatch(ctx, "archive", map[string]string{"repo": "a"}, tasking.Exclusive("repo:a")); err != nil {
		return err
	}
	repos := []string{"repo:a", "repo:b", "repo:c"}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(shutdown)
			for _, w := range []*tasking.Worker{w1, w2} {
				_ = w.Stop(shutdown)
			}
			return nil
		case err := <-errs:
			return err
		case <-tick.C:
		}
		repo := repos[rand.IntN(len(repos))]
		specs := []tasking.TaskSpec{
			tasking.Spec("sync", map[string]string{"repo": repo}, tasking.Exclusive(repo)),
			tasking.Spec("publish", map[string]string{"repo": repo}, tasking.Shared(repo, "remote:cdn")),
			tasking.Spec("resize", map[string]int{"image": rand.IntN(100)}, tasking.Exclusive(fmt.Sprintf("image:%d", rand.IntN(5)))),
		}
		if rand.IntN(5) == 0 {
			specs = append(specs, tasking.Spec("report", nil, tasking.Exclusive("remote:cdn")))
		}
		if _, err := client.DispatchMany(ctx, specs...); err != nil && ctx.Err() == nil {
			return err
		}
	}
}
