package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// TestStmtKindsCoverTheLibrary runs the library itself (dispatch, a worker
// with the PostgreSQL locker, a cancel) through a traced pool and checks
// that the classifier names every statement it sent: when the library's
// SQL changes, this fails instead of the report filing statements under
// "other" or the wrong kind.
func TestStmtKindsCoverTheLibrary(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := testdb.Pool(t, 2)
	schema := testdb.Schema(t, admin)
	tr := newStmtTracer(nil)
	pool, err := newPool(ctx, testdb.DatabaseURL(), 4, tr, "stmtkind")
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	c, err := tasking.New(pool, tasking.WithSchema(schema))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	w := tasking.NewWorker(c, tasking.WithSlots(4))
	block := make(chan struct{})
	w.Handle("t", func(context.Context, *tasking.Task) error { return nil })
	w.Handle("block", func(ctx context.Context, _ *tasking.Task) error {
		<-ctx.Done()
		return context.Cause(ctx)
	})
	go func() { _ = w.Run(ctx); close(block) }()
	var last *tasking.Task
	for i := 0; i < 20; i++ {
		if last, err = c.Dispatch(ctx, "t", nil, tasking.Exclusive("a"), tasking.Shared("b")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Wait(ctx, last.ID); err != nil {
		t.Fatal(err)
	}
	b, err := c.Dispatch(ctx, "block", nil, tasking.Exclusive("a"))
	if err != nil {
		t.Fatal(err)
	}
	for {
		got, err := c.Get(ctx, b.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.State == tasking.StateRunning {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := c.Cancel(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	if err := w.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	<-block

	kinds := map[string]int64{}
	for _, k := range tr.snapshot().byKind() {
		kinds[k.Kind] = k.N
	}
	for k := range kinds {
		if strings.HasPrefix(k, "other") && k != "other: begin" && k != "other: commit" && k != "other: rollback" {
			t.Errorf("statement kind %q: the classifier does not know a statement the library sends (kinds %v)", k, kinds)
		}
	}
	for _, want := range []string{"dispatch", "step (finish + handoff + claim)", "cancel", "lock", "unlock", "fleet (register, heartbeat, cleanup)", "schema check"} {
		if kinds[want] == 0 {
			t.Errorf("no %q statement counted (kinds %v)", want, kinds)
		}
	}
}

// A dial the process canceled itself is not a connection error; a refused
// one is.
func TestConnectErrorsCountRefusalsOnly(t *testing.T) {
	var failed int
	tr := newStmtTracer(func(ev connEvent) {
		if ev.Failed {
			failed++
		}
	})
	ctx := context.Background()
	tr.TraceConnectEnd(ctx, pgx.TraceConnectEndData{Err: fmt.Errorf("dial error: %w", context.Canceled)})
	if failed != 0 {
		t.Fatalf("a canceled dial counted as a connection error")
	}
	tr.TraceConnectEnd(ctx, pgx.TraceConnectEndData{Err: errors.New("sorry, too many clients already")})
	if failed != 1 {
		t.Fatalf("a refused connection was not counted: %d", failed)
	}
}
