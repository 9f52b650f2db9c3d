package tasking_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
)

// BenchmarkDispatchUnique is the cost of one Dispatch with a unique key
// (new: a key no task has; existing: a key a waiting task has) against one
// without: go test -run ^$ -bench DispatchUnique -benchtime 2000x .
func BenchmarkDispatchUnique(b *testing.B) {
	for _, mode := range []string{"plain", "unique-new", "unique-existing"} {
		b.Run(mode, func(b *testing.B) {
			c := newClient(b)
			ctx := context.Background()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				opts := []tasking.DispatchOption{tasking.Exclusive(fmt.Sprintf("r%d", i%100))}
				switch mode {
				case "unique-new":
					opts = append(opts, tasking.Unique(fmt.Sprintf("k%d", i)))
				case "unique-existing":
					opts = append(opts, tasking.Unique("k"))
				}
				_, err := c.Dispatch(ctx, "noop", nil, opts...)
				require.NoError(b, err)
			}
		})
	}
}

// BenchmarkDrainRetry drains 5,000 tasks on 1,000 exclusive names with one
// worker of 80 slots, each task failing its first attempt and retried after
// 1ms, against the same tasks that succeed at once; it reports handler runs
// per second: go test -run ^$ -bench DrainRetry -benchtime 1x .
func BenchmarkDrainRetry(b *testing.B) {
	for _, retry := range []bool{false, true} {
		b.Run(fmt.Sprintf("retry=%v", retry), func(b *testing.B) {
			const n = 5000
			var rate float64
			for i := 0; i < b.N; i++ {
				c := newClient(b)
				ctx := context.Background()
				specs := make([]tasking.TaskSpec, n)
				for j := range specs {
					specs[j] = tasking.Spec("t", nil, tasking.Exclusive(fmt.Sprintf("e%d", j%1000)))
				}
				_, err := c.DispatchMany(ctx, specs...)
				require.NoError(b, err)
				var runs, done atomic.Int64
				finished := make(chan struct{})
				w := tasking.NewWorker(c, tasking.WithSlots(80))
				w.Handle("t", func(ctx context.Context, t *tasking.Task) error {
					runs.Add(1)
					if retry && t.Attempt == 1 {
						return errors.New("again")
					}
					if done.Add(1) == n {
						close(finished)
					}
					return nil
				}, tasking.HandlerRetry(tasking.RetryPolicy{Attempts: 2, Backoff: time.Millisecond}))
				wctx, stop := context.WithCancel(ctx)
				ran := make(chan error, 1)
				start := time.Now()
				go func() { ran <- w.Run(wctx) }()
				select {
				case <-finished:
				case <-time.After(5 * time.Minute):
					b.Fatal("not drained")
				}
				rate = float64(runs.Load()) / time.Since(start).Seconds()
				stop()
				require.NoError(b, <-ran)
			}
			b.ReportMetric(rate, "runs/s")
		})
	}
}
