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

func ExampleUnique() {
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

	schema := fmt.Sprintf("example_unique_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// Every change to repository 42 asks for a sync, but one waiting sync
	// is enough: the ones asked for while it waits are the same task.
	sync := func() *tasking.Task {
		t, err := client.Dispatch(ctx, "sync", map[string]int{"repo": 42},
			tasking.Exclusive("repo:42"), tasking.Unique("sync:repo:42"))
		if err != nil {
			log.Fatal(err)
		}
		return t
	}
	first := sync()
	second := sync()
	fmt.Println("same task:", first.ID == second.ID)
	fmt.Println("first added:", !first.Existing, "second existing:", second.Existing)
	// Output:
	// same task: true
	// first added: true second existing: true
}
