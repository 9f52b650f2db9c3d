package tasking_test

import (
	"context"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

func ExampleWithPeriodic() {
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

	schema := fmt.Sprintf("example_periodic_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// Every worker of the fleet may register the schedule: each period's
	// task is dispatched once. tasking.Cron("0 3 * * *") would run it at
	// 03:00 UTC every day.
	ran := make(chan *tasking.Task, 10)
	w := tasking.NewWorker(client, tasking.WithPeriodic("cleanup", tasking.Every(time.Second),
		tasking.Spec("cleanup", nil, tasking.Exclusive("disk"))))
	w.Handle("cleanup", func(ctx context.Context, t *tasking.Task) error {
		ran <- t
		return nil
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	t := <-ran // within a second
	fmt.Println(t.Name, strings.HasPrefix(t.UniqueKey, "tasking/periodic/cleanup/"))
	// Output:
	// cleanup true
}
