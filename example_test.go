package tasking_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/tasking-go/tasking"
)

func ExampleClient_Dispatch() {
	client, cleanup := exampleClient()
	defer cleanup()
	ctx := context.Background()

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

func ExampleWorker() {
	client, cleanup := exampleClient()
	defer cleanup()

	type ResizeArgs struct {
		Image string `json:"image"`
		Width int    `json:"width"`
	}
	w := tasking.NewWorker(client, tasking.WithSlots(4))
	tasking.HandleFunc(w, "resize", func(ctx context.Context, a ResizeArgs) error {
		// ... resize the image ...
		return tasking.TaskFromContext(ctx).SetResult(fmt.Sprintf("%s at %dpx", a.Image, a.Width))
	})

	// Run the worker until ctx is canceled; Run returns after a clean shutdown.
	ctx, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- w.Run(ctx) }()
	defer func() {
		stop()
		if err := <-stopped; err != nil {
			log.Print(err)
		}
	}()

	task, err := client.Dispatch(ctx, "resize", ResizeArgs{Image: "cat.png", Width: 640},
		tasking.Exclusive("image:cat.png"))
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.Wait(wctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(done.State, string(done.Result))
	// Output:
	// completed "cat.png at 640px"
}

func ExampleWithLocker() {
	// When every worker runs in this process, the locks can live in memory.
	client, cleanup := exampleClient(tasking.WithLocker(tasking.NewMemoryLocker()))
	defer cleanup()

	w := tasking.NewWorker(client, tasking.WithSlots(2))
	w.Handle("reindex", func(ctx context.Context, t *tasking.Task) error {
		fmt.Printf("reindexing with %v held, fencing token %d\n", t.Exclusive, t.Fence)
		return nil
	})
	ctx, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- w.Run(ctx) }()
	defer func() {
		stop()
		if err := <-stopped; err != nil {
			log.Print(err)
		}
	}()

	task, err := client.Dispatch(ctx, "reindex", nil, tasking.Exclusive("index:products"))
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	done, err := client.Wait(wctx, task.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(done.State)
	// Output:
	// reindexing with [index:products] held, fencing token 1
	// completed
}
