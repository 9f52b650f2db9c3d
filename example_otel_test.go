package tasking_test

import (
	"context"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/tasking-go/tasking"
)

func ExampleWithTracerProvider() {
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

	// Any OpenTelemetry providers: here the SDK's, recording in memory.
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))

	schema := fmt.Sprintf("example_otel_%x", rand.Uint32())
	defer pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	client, err := tasking.New(pool, tasking.WithSchema(schema),
		tasking.WithTracerProvider(tp), tasking.WithMeterProvider(mp))
	if err != nil {
		log.Fatal(err)
	}
	if err := client.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	w := tasking.NewWorker(client)
	w.Handle("email", func(ctx context.Context, t *tasking.Task) error { return nil })
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Fatal(err)
		}
	}()

	task, err := client.Dispatch(ctx, "email", nil)
	if err != nil {
		log.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := client.Wait(wctx, task.ID); err != nil {
		log.Fatal(err)
	}
	if err := w.Stop(ctx); err != nil { // every metric of the run is recorded
		log.Fatal(err)
	}

	for _, s := range spans.Ended() {
		linked := len(s.Links()) == 1 && s.Links()[0].SpanContext.SpanID() == spans.Ended()[0].SpanContext().SpanID()
		fmt.Println("span:", s.Name(), "linked to the dispatch:", linked)
	}
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		log.Fatal(err)
	}
	for _, m := range rm.ScopeMetrics[0].Metrics {
		if sum, ok := m.Data.(metricdata.Sum[int64]); ok && m.Name == "tasking.tasks.finished" {
			for _, p := range sum.DataPoints {
				state, _ := p.Attributes.Value("tasking.task.state")
				fmt.Println(m.Name, state.AsString(), p.Value)
			}
		}
	}
	// Output:
	// span: tasking.dispatch linked to the dispatch: false
	// span: tasking.run email linked to the dispatch: true
	// tasking.tasks.finished completed 1
}
