package tasking_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

func ExampleHandlerRetry() {
	ctx := context.Background()
	dsn := os.Getenv("TASKING_DATABASE_URL")
	if dsn == "" {
		dsn = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	}
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	schema := fmt.Sprintf("example_retry_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// The remote is flaky: the first two attempts fail. Up to 3 attempts,
	// 10ms apart, then 20ms (±20%).
	w := tasking.NewWorker(client)
	w.Handle("upload", func(ctx context.Context, t *tasking.Task) error {
		if t.Attempt < 3 {
			return errors.New("remote unavailable")
		}
		return nil
	}, tasking.HandlerRetry(tasking.RetryPolicy{Attempts: 3, Backoff: 10 * time.Millisecond}))
	w.Handle("publish", func(ctx context.Context, t *tasking.Task) error { return nil })
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	upload, err := client.Dispatch(ctx, "upload", nil, tasking.Exclusive("repo:1"))
	if err != nil {
		log.Fatal(err)
	}
	// Dispatched after the upload on the same repository: it waits until
	// the upload is final, retries included.
	publish, err := client.Dispatch(ctx, "publish", nil, tasking.Exclusive("repo:1"))
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	u, err := client.Wait(wctx, upload.ID)
	if err != nil {
		log.Fatal(err)
	}
	p, err := client.Wait(wctx, publish.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("upload:", u.State, "after", u.Attempt, "attempts")
	for _, a := range u.Attempts {
		fmt.Printf("  attempt %d: %s\n", a.Attempt, a.Error)
	}
	fmt.Println("publish:", p.State, "started after the upload:", !p.StartedAt.Before(u.FinishedAt))
	// Output:
	// upload: completed after 3 attempts
	//   attempt 1: remote unavailable
	//   attempt 2: remote unavailable
	// publish: completed started after the upload: true
}
