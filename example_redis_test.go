package tasking_test

import (
	"context"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/rueidis"

	"github.com/tasking-go/tasking"
)

func ExampleNewRedisLocker() {
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
	addr := os.Getenv("TASKING_REDIS_ADDR")
	if addr == "" {
		addr = "127.0.0.1:6379"
	}
	rdb, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		log.Fatal(err)
	}
	defer rdb.Close()

	// Tasks stay in PostgreSQL; locks and wake-ups go through Redis, under
	// a key namespace named after the schema.
	schema := fmt.Sprintf("example_redis_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema),
		tasking.WithLocker(tasking.NewRedisLocker(rdb)))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	w := tasking.NewWorker(client)
	w.Handle("publish", func(ctx context.Context, t *tasking.Task) error {
		// The fencing token grows with every grant: pass it along with
		// side effects so that they can refuse a stale holder.
		fmt.Printf("publishing with %v held, fenced: %t\n", t.Exclusive, t.Fence > 0)
		return nil
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	task, err := client.Dispatch(ctx, "publish", nil, tasking.Exclusive("distribution:docs"))
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
	// publishing with [distribution:docs] held, fenced: true
	// completed
}
