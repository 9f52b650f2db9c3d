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

func ExampleListFilter_parent() {
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

	schema := fmt.Sprintf("example_children_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	w := tasking.NewWorker(client)
	tasking.HandleFunc(w, "sync", func(ctx context.Context, repo string) error {
		// Dispatched with the handler's context, the publication records
		// the sync as its parent (and would join its group, if it had one).
		_, err := client.Dispatch(ctx, "publish", repo, tasking.Exclusive("repo:"+repo))
		return err
	})
	w.Handle("publish", func(ctx context.Context, t *tasking.Task) error { return nil })
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	sync, err := client.Dispatch(ctx, "sync", "a", tasking.Exclusive("remote:a"))
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := client.Wait(wctx, sync.ID); err != nil {
		log.Fatal(err)
	}
	children, _, err := client.List(ctx, tasking.ListFilter{Parent: sync.ID})
	if err != nil {
		log.Fatal(err)
	}
	for _, t := range children {
		fmt.Println(t.Name, string(t.Args), t.Parent == sync.ID)
	}
	// Output:
	// publish "a" true
}
