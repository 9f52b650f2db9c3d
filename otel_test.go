package tasking_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// collected reads every metric the reader has, by name.
func collected(t *testing.T, reader *sdkmetric.ManualReader) map[string]metricdata.Aggregation {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	out := map[string]metricdata.Aggregation{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			out[m.Name] = m.Data
		}
	}
	return out
}

// sumOf adds up the points of an int64 sum or gauge whose attributes
// include want.
func sumOf(data metricdata.Aggregation, want ...attribute.KeyValue) int64 {
	var points []metricdata.DataPoint[int64]
	switch d := data.(type) {
	case metricdata.Sum[int64]:
		points = d.DataPoints
	case metricdata.Gauge[int64]:
		points = d.DataPoints
	}
	var n int64
	for _, p := range points {
		ok := true
		for _, kv := range want {
			if v, has := p.Attributes.Value(kv.Key); !has || v != kv.Value {
				ok = false
			}
		}
		if ok {
			n += p.Value
		}
	}
	return n
}

func histCount(data metricdata.Aggregation, want ...attribute.KeyValue) uint64 {
	d, _ := data.(metricdata.Histogram[float64])
	var n uint64
	for _, p := range d.DataPoints {
		ok := true
		for _, kv := range want {
			if v, has := p.Attributes.Value(kv.Key); !has || v != kv.Value {
				ok = false
			}
		}
		if ok {
			n += p.Count
		}
	}
	return n
}

// TestOpenTelemetry: with providers given, dispatches and runs are traced
// (the run span linked to the dispatch span through the task) and the
// metrics count what happened.
func TestOpenTelemetry(t *testing.T) {
	t.Parallel()
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()); _ = mp.Shutdown(context.Background()) })

	pool := testdb.Pool(t, 10)
	schema := testdb.Schema(t, pool)
	c, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()),
		tasking.WithTracerProvider(tp), tasking.WithMeterProvider(mp))
	require.NoError(t, err)
	ctx := ctxT(t, 30*time.Second)
	require.NoError(t, c.Migrate(ctx))

	inner := make(chan trace.SpanContext, 4)
	w := tasking.NewWorker(c, tasking.WithSlots(2))
	w.Handle("ok", func(ctx context.Context, task *tasking.Task) error {
		_, span := tp.Tracer("handler").Start(ctx, "inner")
		inner <- span.SpanContext()
		span.End()
		return nil
	})
	w.Handle("bad", func(context.Context, *tasking.Task) error { return errors.New("broken") })
	runWorker(t, w)

	// The caller's span is the dispatch span's parent.
	callerCtx, caller := tp.Tracer("test").Start(ctx, "caller")
	ok, err := c.Dispatch(callerCtx, "ok", nil, tasking.Exclusive("r"))
	require.NoError(t, err)
	caller.End()
	bad, err := c.Dispatch(ctx, "bad", nil, tasking.Exclusive("r"))
	require.NoError(t, err)
	_, err = c.Dispatch(ctx, "nobody", nil)
	require.NoError(t, err)
	for _, id := range []int64{ok.ID, bad.ID} {
		_, err := c.Wait(ctx, id)
		require.NoError(t, err)
	}
	innerSC := recv(t, inner, 10*time.Second)

	// Spans end before the outcome is queued, so they are all there now.
	byName := map[string][]sdktrace.ReadOnlySpan{}
	for _, s := range spans.Ended() {
		byName[s.Name()] = append(byName[s.Name()], s)
	}
	require.Len(t, byName["tasking.dispatch"], 3)
	dispatchOK := byName["tasking.dispatch"][0]
	require.Equal(t, caller.SpanContext().SpanID(), dispatchOK.Parent().SpanID(), "the dispatch span is a child of the caller's")
	require.Equal(t, trace.SpanKindProducer, dispatchOK.SpanKind())

	require.Len(t, byName["tasking.run ok"], 1)
	runOK := byName["tasking.run ok"][0]
	require.Equal(t, trace.SpanKindConsumer, runOK.SpanKind())
	require.Len(t, runOK.Links(), 1)
	require.Equal(t, dispatchOK.SpanContext().TraceID(), runOK.Links()[0].SpanContext.TraceID(),
		"the run span is linked to the dispatch, through the trace context stored with the task")
	require.Equal(t, dispatchOK.SpanContext().SpanID(), runOK.Links()[0].SpanContext.SpanID())
	require.Equal(t, codes.Unset, runOK.Status().Code)
	require.Equal(t, runOK.SpanContext().TraceID(), innerSC.TraceID(), "the handler's spans are children of the run span")
	var innerSpan sdktrace.ReadOnlySpan
	for _, s := range byName["inner"] {
		innerSpan = s
	}
	require.NotNil(t, innerSpan)
	require.Equal(t, runOK.SpanContext().SpanID(), innerSpan.Parent().SpanID())

	require.Len(t, byName["tasking.run bad"], 1)
	runBad := byName["tasking.run bad"][0]
	require.Equal(t, codes.Error, runBad.Status().Code)
	require.Equal(t, "broken", runBad.Status().Description)
	require.Equal(t, byName["tasking.dispatch"][1].SpanContext().SpanID(), runBad.Links()[0].SpanContext.SpanID())

	name := func(n string) attribute.KeyValue { return attribute.String("tasking.task.name", n) }
	state := func(s tasking.State) attribute.KeyValue { return attribute.String("tasking.task.state", string(s)) }
	// The final-state counters are recorded right after the step that
	// wrote the state, which Wait may see first; the PostgreSQL locker's
	// grants are released after that step too (with the next acquire, or
	// on their own when the step claimed nothing).
	var m map[string]metricdata.Aggregation
	heldNow := func() int64 {
		held, _ := m["tasking.locks.held"].(metricdata.Sum[int64])
		if len(held.DataPoints) != 1 {
			return -1
		}
		return held.DataPoints[0].Value
	}
	require.Eventually(t, func() bool {
		m = collected(t, reader)
		return sumOf(m["tasking.tasks.finished"]) == 2 && heldNow() == 0
	}, 10*time.Second, 5*time.Millisecond, "both tasks finished and both grants released")
	assert.EqualValues(t, 1, sumOf(m["tasking.tasks.dispatched"], name("ok")))
	assert.EqualValues(t, 1, sumOf(m["tasking.tasks.dispatched"], name("nobody")))
	assert.EqualValues(t, 3, sumOf(m["tasking.tasks.dispatched"]))
	assert.EqualValues(t, 2, sumOf(m["tasking.tasks.started"]))
	assert.EqualValues(t, 1, sumOf(m["tasking.tasks.finished"], name("ok"), state(tasking.StateCompleted)))
	assert.EqualValues(t, 1, sumOf(m["tasking.tasks.finished"], name("bad"), state(tasking.StateFailed)))
	assert.EqualValues(t, 1, histCount(m["tasking.task.wait.duration"], name("ok")))
	assert.EqualValues(t, 1, histCount(m["tasking.task.run.duration"], name("bad"), state(tasking.StateFailed)))
	held, _ := m["tasking.locks.held"].(metricdata.Sum[int64])
	require.Len(t, held.DataPoints, 1, "grants were counted")
	locker, _ := held.DataPoints[0].Attributes.Value("tasking.locker")
	assert.Equal(t, "postgres", locker.AsString())
	assert.EqualValues(t, 0, held.DataPoints[0].Value, "both grants released")
	assert.Positive(t, sumOf(m["tasking.admission.cycles"]))
	assert.Positive(t, sumOf(m["tasking.wakeups"]))
	assert.EqualValues(t, 1, sumOf(m["tasking.tasks.waiting"], name("nobody")), "read from the database")
	assert.EqualValues(t, 0, sumOf(m["tasking.tasks.waiting"], name("ok")))
	age, _ := m["tasking.tasks.waiting.oldest_age"].(metricdata.Gauge[float64])
	require.Len(t, age.DataPoints, 1)
	assert.GreaterOrEqual(t, age.DataPoints[0].Value, 0.0)
}

// TestNoTelemetryStoresNothing: without a TracerProvider a dispatch stores
// no trace context (it runs the plain dispatch statement).
func TestNoTelemetryStoresNothing(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 4)
	schema := testdb.Schema(t, pool)
	c, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()))
	require.NoError(t, err)
	ctx := ctxT(t, 30*time.Second)
	require.NoError(t, c.Migrate(ctx))
	// Even under a caller's span: the client does not trace.
	tp := sdktrace.NewTracerProvider()
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	sctx, span := tp.Tracer("test").Start(ctx, "caller")
	defer span.End()
	_, err = c.DispatchMany(sctx, tasking.Spec("a", nil), tasking.Spec("b", nil))
	require.NoError(t, err)
	var n int
	require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM "+pgx.Identifier{schema, "task_traces"}.Sanitize()).Scan(&n))
	require.Zero(t, n)
}
