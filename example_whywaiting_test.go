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

func ExampleClient_WhyWaiting() {
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

	schema := fmt.Sprintf("example_why_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// No worker runs: the export is ready but nobody handles it, and the
	// publish waits behind it on the document.
	if _, err := client.Dispatch(ctx, "export", nil, tasking.Shared("doc:1")); err != nil {
		log.Fatal(err)
	}
	publish, err := client.Dispatch(ctx, "publish", nil, tasking.Exclusive("doc:1"), tasking.Shared("site"))
	if err != nil {
		log.Fatal(err)
	}

	rep, err := client.WhyWaiting(ctx, publish.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("ready:", rep.Ready, "unhandled:", rep.Unhandled)
	for _, r := range rep.Resources {
		fmt.Printf("%s (exclusive=%v): blocked=%v,", r.Resource, r.Exclusive, r.Blocked)
		for _, b := range r.Ahead {
			fmt.Printf(" waits for %s (%s)", b.Name, b.State)
		}
		fmt.Println()
	}
	first, err := client.WhyWaiting(ctx, rep.Resources[0].Ahead[0].ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("export ready:", first.Ready, "unhandled:", first.Unhandled)
	// Output:
	// ready: false unhandled: true
	// doc:1 (exclusive=true): blocked=true, waits for export (waiting)
	// site (exclusive=false): blocked=false,
	// export ready: true unhandled: true
}
