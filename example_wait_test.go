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

func ExampleClient_Wait() {
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

	schema := fmt.Sprintf("example_wait_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	w := tasking.NewWorker(client)
	w.Handle("charge", func(ctx context.Context, t *tasking.Task) error {
		return errors.New("card declined")
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	task, err := client.Dispatch(ctx, "charge", nil, tasking.Exclusive("customer:12"))
	if err != nil {
		log.Fatal(err)
	}
	// Wait returns the task once it is final (completed, failed or
	// canceled), or ctx's error. A failed task is not an error of Wait's:
	// the task says what went wrong.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.Wait(wctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(done.State, done.State.Final())
	fmt.Println("error:", done.Error)
	// Output:
	// failed true
	// error: card declined
}
