package tasking_test

import (
	"context"
	"fmt"
	"log"
	"math/rand/v2"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

func ExampleClient_List() {
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

	schema := fmt.Sprintf("example_list_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}
	_, err = client.DispatchMany(ctx,
		tasking.Spec("sync", nil, tasking.Exclusive("repo:a")),
		tasking.Spec("sync", nil, tasking.Exclusive("repo:b")),
		tasking.Spec("publish", nil, tasking.Shared("repo:a")),
		tasking.Spec("delete", nil, tasking.Exclusive("repo:a")))
	if err != nil {
		log.Fatal(err)
	}

	// What waits on repo:a, in the order it will run, two to a page.
	f := tasking.ListFilter{State: tasking.StateWaiting, Resource: "repo:a", Limit: 2}
	for page := 1; ; page++ {
		tasks, next, err := client.List(ctx, f)
		if err != nil {
			log.Fatal(err)
		}
		for _, t := range tasks {
			fmt.Println("page", page, t.Name, t.Exclusive, t.Shared)
		}
		if next == 0 {
			break
		}
		f.After = next
	}
	// Output:
	// page 1 sync [repo:a] []
	// page 1 publish [] [repo:a]
	// page 2 delete [repo:a] []
}
