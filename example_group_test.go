package tasking_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tasking-go/tasking"
)

func ExampleClient_DispatchGroup() {
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

	schema := fmt.Sprintf("example_group_%x", rand.Uint32())
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
		if repo == "c" {
			return fmt.Errorf("remote of %s unreachable", repo)
		}
		return nil
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)

	// Three syncs as one group, marked all dispatched in the same call.
	// (Over time: CreateGroup, Dispatch with InGroup, MarkAllDispatched.)
	var specs []tasking.TaskSpec
	for _, repo := range []string{"a", "b", "c"} {
		specs = append(specs, tasking.Spec("sync", repo, tasking.Exclusive("repo:"+repo)))
	}
	group, _, err := client.DispatchGroup(ctx, specs...)
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.WaitGroup(wctx, group.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("done:", done.Done, "tasks:", done.Total())
	fmt.Println("completed:", done.Counts[tasking.StateCompleted], "failed:", done.Counts[tasking.StateFailed])
	// Output:
	// done: true tasks: 3
	// completed: 2 failed: 1
}

func ExampleClient_CancelGroup() {
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

	schema := fmt.Sprintf("example_cancelgroup_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// No worker runs: every task of the group is waiting.
	group, err := client.CreateGroup(ctx)
	if err != nil {
		log.Fatal(err)
	}
	for range 3 {
		if _, err := client.Dispatch(ctx, "import", nil, tasking.InGroup(group.ID), tasking.Exclusive("repo:a")); err != nil {
			log.Fatal(err)
		}
	}
	// Waiting tasks are canceled at once (running ones would become
	// canceling, as with Cancel), and the group takes no more tasks.
	if err := client.CancelGroup(ctx, group.ID); err != nil {
		log.Fatal(err)
	}
	g, err := client.GetGroup(ctx, group.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("canceled:", g.Canceled, "done:", g.Done, "counts:", g.Counts)
	_, err = client.Dispatch(ctx, "import", nil, tasking.InGroup(group.ID))
	fmt.Println(errors.Is(err, tasking.ErrGroupCanceled))
	// Output:
	// canceled: true done: true counts: map[canceled:3]
	// true
}
