package tasking_test

import (
	"context"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

func ExampleClient_Cancel() {
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

	schema := fmt.Sprintf("example_cancel_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// A waiting task is canceled at once.
	queued, err := client.Dispatch(ctx, "export", nil)
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Cancel(ctx, queued.ID); err != nil {
		log.Fatal(err)
	}
	got, err := client.Get(ctx, queued.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("waiting task:", got.State)

	// A running task's handler sees its context canceled, with the cause
	// ErrCanceled, and the task ends canceled.
	started := make(chan struct{})
	w := tasking.NewWorker(client)
	w.Handle("import", func(ctx context.Context, t *tasking.Task) error {
		close(started)
		<-ctx.Done()
		fmt.Println("handler stopped:", context.Cause(ctx))
		return ctx.Err()
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	running, err := client.Dispatch(ctx, "import", nil)
	if err != nil {
		log.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		log.Fatal("the task did not start")
	}
	if err := client.Cancel(ctx, running.ID); err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.Wait(wctx, running.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("running task:", done.State)
	// Output:
	// waiting task: canceled
	// handler stopped: canceled
	// running task: canceled
}
