package tasking_test

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// BenchmarkDrain dispatches a backlog of no-op tasks, then measures how fast
// workers drain it: go test -run ^$ -bench Drain -benchtime 1x .
// The reported tasks/s counts from the first start to the last finish.
func BenchmarkDrain(b *testing.B) {
	for _, wl := range []string{"noop", "mix"} {
		b.Run(wl, func(b *testing.B) {
			for _, lk := range []string{"postgres", "redis"} {
				b.Run(lk, func(b *testing.B) { benchDrain(b, wl, lk, 20000, 80, 1) })
				b.Run(lk+"/4workers", func(b *testing.B) { benchDrain(b, wl, lk, 20000, 20, 4) })
			}
		})
	}
}

// benchDrain drains n tasks with workers Workers of slots slots each.
func benchDrain(b *testing.B, workload, locker string, n, slots, workers int) {
	var rate float64
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		var opts []tasking.Option
		switch locker {
		case "memory":
			opts = append(opts, tasking.WithLocker(tasking.NewMemoryLocker()))
		case "redis":
			opts = append(opts, tasking.WithLocker(tasking.NewRedisLocker(newRedis(b, testdb.RedisAddr()))))
		}
		c := newClient(b, opts...)
		ctx := context.Background()
		specs := make([]tasking.TaskSpec, 0, 1000)
		for j := 0; j < n; j++ {
			var o []tasking.DispatchOption
			if workload == "mix" {
				o = append(o, tasking.Exclusive(fmt.Sprintf("e%d", j%1000)), tasking.Shared(fmt.Sprintf("s%d", j%10)))
			}
			specs = append(specs, tasking.Spec("noop", nil, o...))
			if len(specs) == cap(specs) || j == n-1 {
				_, err := c.DispatchMany(ctx, specs...)
				require.NoError(b, err)
				specs = specs[:0]
			}
		}
		var done atomic.Int64
		var first, last atomic.Int64
		finished := make(chan struct{})
		handler := func(ctx context.Context, t *tasking.Task) error {
			now := time.Now().UnixNano()
			first.CompareAndSwap(0, now)
			if done.Add(1) == int64(n) {
				last.Store(now)
				close(finished)
			}
			return nil
		}
		b.StartTimer()
		rctx, cancel := context.WithCancel(ctx)
		errc := make(chan error, workers)
		for k := 0; k < workers; k++ {
			w := tasking.NewWorker(c, tasking.WithSlots(slots))
			w.Handle("noop", handler)
			go func() { errc <- w.Run(rctx) }()
		}
		recv(b, finished, 10*time.Minute)
		b.StopTimer()
		cancel()
		for k := 0; k < workers; k++ {
			require.NoError(b, recv(b, errc, time.Minute))
		}
		rate = float64(n) / (float64(last.Load()-first.Load()) / 1e9)
	}
	b.ReportMetric(rate, "tasks/s")
}

// BenchmarkCancelLatency measures how long after Client.Cancel is called a
// running handler sees its context done (target p99 <= 50 ms):
// go test -run ^$ -bench CancelLatency -benchtime 200x .
func BenchmarkCancelLatency(b *testing.B) {
	c := newClient(b)
	ctx := context.Background()
	started := make(chan struct{}, 1)
	seen := make(chan time.Time, 1)
	w := tasking.NewWorker(c, tasking.WithSlots(4))
	w.Handle("block", func(ctx context.Context, _ *tasking.Task) error {
		started <- struct{}{}
		<-ctx.Done()
		seen <- time.Now()
		return nil
	})
	runWorker(b, w)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		task, err := c.Dispatch(ctx, "block", nil, tasking.Exclusive("x"))
		require.NoError(b, err)
		recv(b, started, 30*time.Second)
		at := time.Now()
		require.NoError(b, c.Cancel(ctx, task.ID))
		lat = append(lat, recv(b, seen, 30*time.Second).Sub(at))
		_, err = c.Wait(ctx, task.ID)
		require.NoError(b, err)
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}

// BenchmarkImmediateLatency measures call-to-result latency of an
// uncontended task on one exclusive resource (target p50 <= 2 ms):
// Immediate.Run with each locker, against Dispatch + Wait on an idle worker:
// go test -run ^$ -bench ImmediateLatency -benchtime 500x .
func BenchmarkImmediateLatency(b *testing.B) {
	noop := func(context.Context, *tasking.Task) error { return nil }
	for _, lk := range []string{"postgres", "redis"} {
		b.Run("immediate/"+lk, func(b *testing.B) {
			c := newClient(b, lockerOpts(b, lk)...)
			im := newImmediate(b, c)
			ctx := context.Background()
			_, err := im.Run(ctx, "warm", nil, noop, tasking.Exclusive("x")) // opens the lock session
			require.NoError(b, err)
			measureLatency(b, func() {
				task, err := im.Run(ctx, "noop", nil, noop, tasking.Exclusive("x"))
				require.NoError(b, err)
				require.Equal(b, tasking.StateCompleted, task.State)
			})
		})
		b.Run("dispatch+wait/"+lk, func(b *testing.B) {
			c := newClient(b, lockerOpts(b, lk)...)
			w := tasking.NewWorker(c)
			w.Handle("noop", noop)
			runWorker(b, w)
			ctx := context.Background()
			measureLatency(b, func() {
				task, err := c.Dispatch(ctx, "noop", nil, tasking.Exclusive("x"))
				require.NoError(b, err)
				done, err := c.Wait(ctx, task.ID)
				require.NoError(b, err)
				require.Equal(b, tasking.StateCompleted, done.State)
			})
		})
	}
}

// measureLatency runs call b.N times and reports the percentiles.
func measureLatency(b *testing.B, call func()) {
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		at := time.Now()
		call()
		lat = append(lat, time.Since(at))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*9/10].Microseconds())/1000, "p90-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}
