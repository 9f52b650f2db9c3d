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

func ExampleWithMiddleware() {
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

	schema := fmt.Sprintf("example_hooks_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// A middleware sees every task before and after its handler.
	announce := func(next tasking.HandlerFunc) tasking.HandlerFunc {
		return func(ctx context.Context, t *tasking.Task) error {
			fmt.Println("start", t.Name)
			err := next(ctx, t)
			fmt.Println("end", t.Name, "err:", err)
			return err
		}
	}
	// The error handler hears of every failure, with the error value.
	errQuota := errors.New("quota exceeded")
	onError := func(ctx context.Context, t *tasking.Task, err error) {
		fmt.Println("failed:", t.Name, "quota:", errors.Is(err, errQuota))
	}
	w := tasking.NewWorker(client, tasking.WithSlots(1),
		tasking.WithMiddleware(announce), tasking.WithErrorHandler(onError))
	w.Handle("upload", func(ctx context.Context, t *tasking.Task) error {
		return fmt.Errorf("upload: %w", errQuota)
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	task, err := client.Dispatch(ctx, "upload", nil)
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.Wait(wctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(done.State, done.Error)
	// Output:
	// start upload
	// end upload err: upload: quota exceeded
	// failed: upload quota: true
	// failed upload: quota exceeded
}
