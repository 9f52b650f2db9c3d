package tasking_test

import (
	"context"
	"log"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// exampleClient is the setup the examples leave out: a pool on the test
// database, a migrated client in a fresh schema, and a cleanup func that
// drops the schema and closes the pool. Call cleanup after every worker of
// the client has stopped.
func exampleClient(opts ...tasking.Option) (*tasking.Client, func()) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := pgxpool.New(ctx, testdb.DatabaseURL())
	if err != nil {
		log.Fatalf("example: connect: %v", err)
	}
	schema := testdb.Name("example")
	opts = append([]tasking.Option{tasking.WithSchema(schema), tasking.WithLogger(quietLogger())}, opts...)
	client, err := tasking.New(pool, opts...)
	if err == nil {
		err = client.Migrate(ctx)
	}
	if err != nil {
		pool.Close()
		log.Fatalf("example: set up schema %s: %v", schema, err)
	}
	return client, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			log.Printf("example: drop schema %s: %v", schema, err)
		}
		pool.Close()
	}
}
