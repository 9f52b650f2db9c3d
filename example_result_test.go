package tasking_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

func ExampleTask_SetResult() {
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

	schema := fmt.Sprintf("example_result_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	type Thumbnail struct {
		URL   string `json:"url"`
		Bytes int    `json:"bytes"`
	}
	w := tasking.NewWorker(client)
	tasking.HandleFunc(w, "thumbnail", func(ctx context.Context, image string) error {
		// The result is stored, as JSON, with the task's final state.
		return tasking.TaskFromContext(ctx).SetResult(Thumbnail{URL: "/thumbs/" + image, Bytes: 5120})
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	task, err := client.Dispatch(ctx, "thumbnail", "cat.png", tasking.Exclusive("image:cat.png"))
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.Wait(wctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	var thumb Thumbnail
	if err := json.Unmarshal(done.Result, &thumb); err != nil {
		log.Fatal(err)
	}
	fmt.Println(done.State, thumb.URL, thumb.Bytes)
	// Output:
	// completed /thumbs/cat.png 5120
}
