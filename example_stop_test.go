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

func ExampleWorker_Stop() {
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

	schema := fmt.Sprintf("example_stop_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	started := make(chan struct{})
	w := tasking.NewWorker(client)
	w.Handle("backup", func(ctx context.Context, t *tasking.Task) error {
		close(started)
		<-ctx.Done() // a long job, until the worker stops
		fmt.Println("handler stopped:", context.Cause(ctx))
		return ctx.Err()
	})
	stopped := make(chan error, 1)
	go func() { stopped <- w.Run(ctx) }()

	task, err := client.Dispatch(ctx, "backup", nil, tasking.Exclusive("db:main"))
	if err != nil {
		log.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		log.Fatal("the task did not start")
	}

	// Give running handlers 100ms to finish, then cancel them. Stop returns
	// once final states are written and locks released.
	grace, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := w.Stop(grace); err != nil {
		log.Fatal(err)
	}
	fmt.Println("Run returned:", <-stopped)

	// The task was interrupted, so it failed; it is not retried.
	got, err := client.Get(ctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(got.State+":", got.Error)
	// Output:
	// handler stopped: worker shut down before the task finished
	// Run returned: <nil>
	// failed: worker shut down before the task finished: context canceled
}
