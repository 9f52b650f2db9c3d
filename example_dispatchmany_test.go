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

func ExampleClient_DispatchMany() {
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

	schema := fmt.Sprintf("example_dispatchmany_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// One round trip, all or nothing, in order: each task gets a larger id
	// than the one before it, so on repo:a the sync runs before the publish.
	tasks, err := client.DispatchMany(ctx,
		tasking.Spec("sync", map[string]string{"repo": "a"}, tasking.Exclusive("repo:a")),
		tasking.Spec("sync", map[string]string{"repo": "b"}, tasking.Exclusive("repo:b")),
		tasking.Spec("publish", map[string]string{"repo": "a"}, tasking.Shared("repo:a")))
	if err != nil {
		log.Fatal(err)
	}
	for i, t := range tasks {
		fmt.Println(t.Name, string(t.Args), "after the previous one:", i == 0 || t.ID > tasks[i-1].ID)
	}
	// Output:
	// sync {"repo":"a"} after the previous one: true
	// sync {"repo":"b"} after the previous one: true
	// publish {"repo":"a"} after the previous one: true
}
