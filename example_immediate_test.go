package tasking_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"math/rand/v2"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

func ExampleImmediate_Run() {
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

	schema := fmt.Sprintf("example_immediate_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// An API handler that wants its answer in the same request: nothing is
	// queued on repo:a, so the task runs here and now, with its lock.
	im := tasking.NewImmediate(client)
	defer im.Close(ctx)
	rename := func(ctx context.Context, t *tasking.Task) error { return t.SetResult("renamed") }
	task, err := im.Run(ctx, "rename", nil, rename, tasking.Exclusive("repo:a"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(task.State, string(task.Result))

	// A sync is queued on repo:a (no worker runs in this example): an
	// immediate task on it would overtake it, so it is not run, and the
	// error says what it waits behind. DeferIfBlocked would queue it instead.
	sync, err := client.Dispatch(ctx, "sync", nil, tasking.Exclusive("repo:a"))
	if err != nil {
		log.Fatal(err)
	}
	_, err = im.Run(ctx, "rename", nil, rename, tasking.Exclusive("repo:a"))
	var blocked *tasking.BlockedError
	if errors.As(err, &blocked) {
		fmt.Println("waits behind the sync:", blocked.Tasks[0] == sync.ID, "on", blocked.Resources)
	}
	// Output:
	// completed "renamed"
	// waits behind the sync: true on [repo:a]
}
