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

func ExampleClient_Dispatch() {
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
	schema := fmt.Sprintf("example_dispatch_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// Sync repository 42 from remote 7: nothing else may touch the
	// repository meanwhile, but other syncs may read the same remote.
	// Resources are normalised: duplicates go, and a name given in both
	// modes is exclusive.
	task, err := client.Dispatch(ctx, "sync", map[string]int{"repo": 42},
		tasking.Exclusive("repo:42"),
		tasking.Shared("remote:7", "remote:7", "repo:42"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("name:", task.Name)
	fmt.Println("args:", string(task.Args))
	fmt.Println("exclusive:", task.Exclusive)
	fmt.Println("shared:", task.Shared)
	fmt.Println("state:", task.State)
	// Output:
	// name: sync
	// args: {"repo":42}
	// exclusive: [repo:42]
	// shared: [remote:7]
	// state: waiting
}
