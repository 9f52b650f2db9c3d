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

func ExampleTask_ReportProgress() {
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

	schema := fmt.Sprintf("example_progress_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	w := tasking.NewWorker(client)
	w.Handle("import", func(ctx context.Context, t *tasking.Task) error {
		const files = 1000
		for i := 1; i <= files; i++ {
			// Report as often as you like: the worker writes the latest
			// reports a few times a second, and the last ones with the
			// final state.
			err := t.ReportProgress(tasking.Progress{
				Name: "files", Message: "Importing files", Done: int64(i), Total: files,
			})
			if err != nil {
				return err
			}
		}
		return t.ReportProgress(tasking.Progress{Name: "index", Message: "Rebuilding the index", State: tasking.ProgressSkipped})
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	task, err := client.Dispatch(ctx, "import", nil, tasking.Exclusive("repo:a"))
	if err != nil {
		log.Fatal(err)
	}
	// While it runs, Get and List show the reports too.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.Wait(wctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	for _, p := range done.Progress {
		fmt.Printf("%s: %s %d/%d %s\n", p.Name, p.Message, p.Done, p.Total, p.State)
	}
	// Output:
	// files: Importing files 1000/1000 running
	// index: Rebuilding the index 0/0 skipped
}
