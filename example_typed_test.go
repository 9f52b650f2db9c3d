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

// SyncRepo names its task: the handler and every dispatch agree on it.
type SyncRepo struct {
	Repo string `json:"repo"`
}

func (SyncRepo) TaskName() string { return "sync-repo" }

// Args types that name their task: HandleArgs registers the handler under
// the type's name, DispatchArgs dispatches under it.
func ExampleDispatchArgs() {
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
	schema := fmt.Sprintf("example_typed_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	c, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLocker(tasking.NewMemoryLocker()))
	if err != nil {
		log.Fatal(err)
	}
	if err := c.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	w := tasking.NewWorker(c)
	tasking.HandleArgs(w, func(ctx context.Context, a SyncRepo) error {
		fmt.Println("syncing", a.Repo)
		return nil
	})
	go w.Run(ctx)
	defer w.Stop(ctx)

	task, err := tasking.DispatchArgs(ctx, c, SyncRepo{Repo: "repo:42"}, tasking.Exclusive("repo:42"))
	if err != nil {
		log.Fatal(err)
	}
	done, err := c.Wait(ctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(done.Name, done.State)
	// Output:
	// syncing repo:42
	// sync-repo completed
}
