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

func ExampleNewMemoryLocker() {
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

	// When every worker runs in this process, the locks can live in memory.
	schema := fmt.Sprintf("example_memory_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema),
		tasking.WithLocker(tasking.NewMemoryLocker()))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	w := tasking.NewWorker(client, tasking.WithSlots(2))
	w.Handle("reindex", func(ctx context.Context, t *tasking.Task) error {
		fmt.Printf("reindexing with %v held, fencing token %d\n", t.Exclusive, t.Fence)
		return nil
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	task, err := client.Dispatch(ctx, "reindex", nil, tasking.Exclusive("index:products"))
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.Wait(wctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(done.State)
	// Output:
	// reindexing with [index:products] held, fencing token 1
	// completed
}
