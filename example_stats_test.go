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

func ExampleClient_Stats() {
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

	schema := fmt.Sprintf("example_stats_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// A worker that handles "resize" only, busy with one task.
	started, release := make(chan struct{}), make(chan struct{})
	w := tasking.NewWorker(client, tasking.WithSlots(4), tasking.WithWorkerName("resizer-1"))
	w.Handle("resize", func(ctx context.Context, t *tasking.Task) error {
		close(started)
		<-release
		return nil
	})
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()
	defer w.Stop(ctx)
	defer close(release)

	if _, err := client.Dispatch(ctx, "resize", nil); err != nil {
		log.Fatal(err)
	}
	// A typo: no worker handles "resise".
	if _, err := client.Dispatch(ctx, "resise", nil); err != nil {
		log.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		log.Fatal("not started")
	}

	st, err := client.Stats(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("running:", st.States[tasking.StateRunning], "waiting:", st.States[tasking.StateWaiting])
	for _, n := range st.Names {
		fmt.Printf("%s: %v unhandled=%v\n", n.Name, n.States, n.Unhandled)
	}
	for _, wi := range st.Workers {
		fmt.Printf("worker %s: %d/%d busy, handles %v, live=%v\n", wi.Name, wi.Busy, wi.Slots, wi.Handles, wi.Live)
	}
	// Output:
	// running: 1 waiting: 1
	// resise: map[waiting:1] unhandled=true
	// resize: map[running:1] unhandled=false
	// worker resizer-1: 1/4 busy, handles [resize], live=true
}
