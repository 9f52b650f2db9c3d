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

func ExampleClient_Purge() {
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

	schema := fmt.Sprintf("example_purge_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// Three tasks: two are canceled (final), one still waits.
	var ids []int64
	for range 3 {
		t, err := client.Dispatch(ctx, "report", nil)
		if err != nil {
			log.Fatal(err)
		}
		ids = append(ids, t.ID)
	}
	for _, id := range ids[:2] {
		if err := client.Cancel(ctx, id); err != nil {
			log.Fatal(err)
		}
	}

	// Delete the final tasks that finished before now. A service would
	// rather keep them a while, e.g. Before: time.Now().Add(-7 * 24 * time.Hour),
	// or let its workers do it with tasking.WithRetention.
	n, err := client.Purge(ctx, tasking.PurgeFilter{Before: time.Now()})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("purged:", n)
	left, _, err := client.List(ctx, tasking.ListFilter{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("left:", len(left), left[0].State)
	// Output:
	// purged: 2
	// left: 1 waiting
}
