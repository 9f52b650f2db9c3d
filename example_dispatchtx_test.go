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

func ExampleClient_DispatchTx() {
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

	schema := fmt.Sprintf("example_dispatchtx_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema),
		tasking.WithLocker(tasking.NewRedisLocker(rdb)))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}
	type InvoiceArgs struct {
		Order int `json:"order"`
	}
	w := tasking.NewWorker(client)
	tasking.HandleFunc(w, "send-invoice", func(ctx context.Context, a InvoiceArgs) error {
		fmt.Println("sending the invoice for order", a.Order)
		return nil
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	// The task is stored with the caller's own writes: it exists if and
	// only if the transaction commits.
	tx, err := pool.Begin(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback(ctx)
	// ... the application's own writes in tx ...
	task, err := client.DispatchTx(ctx, tx, "send-invoice", InvoiceArgs{Order: 7},
		tasking.Exclusive("order:7"))
	if err != nil {
		log.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		log.Fatal(err)
	}
	// Redis cannot see the commit: wake the workers now rather than at
	// their next poll. (With the PostgreSQL locker the commit wakes them.)
	if err := client.Notify(ctx); err != nil {
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
	// sending the invoice for order 7
	// completed
}
