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

func ExampleWorker() {
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

	// A schema of its own, dropped at the end.
	schema := fmt.Sprintf("example_worker_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// A handler per task name; HandleFunc decodes the args for it.
	type ResizeArgs struct {
		Image string `json:"image"`
		Width int    `json:"width"`
	}
	w := tasking.NewWorker(client, tasking.WithSlots(4))
	tasking.HandleFunc(w, "resize", func(ctx context.Context, a ResizeArgs) error {
		fmt.Printf("resizing %s to %dpx\n", a.Image, a.Width)
		return nil
	})
	// Run blocks until its context is done or Stop is called.
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	task, err := client.Dispatch(ctx, "resize", ResizeArgs{Image: "cat.png", Width: 640},
		tasking.Exclusive("image:cat.png"))
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
	// resizing cat.png to 640px
	// completed
}
