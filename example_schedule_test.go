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

func ExampleRunAt() {
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

	schema := fmt.Sprintf("example_schedule_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	w := tasking.NewWorker(client)
	w.Handle("reminder", func(ctx context.Context, t *tasking.Task) error { return nil })
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	// Not before 200ms from now. It stands in line on "user:7" from now
	// on: a task dispatched later on that resource runs after it.
	at := time.Now().Add(200 * time.Millisecond)
	task, err := client.Dispatch(ctx, "reminder", nil, tasking.Exclusive("user:7"), tasking.RunAt(at))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("dispatched:", task.State)
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.Wait(wctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("then:", done.State, "on time:", !done.StartedAt.Before(done.RunAt))
	// Output:
	// dispatched: scheduled
	// then: completed on time: true
}
