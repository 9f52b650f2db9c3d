package tasking

import (
	"context"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// OpenTelemetry is opt-in: with neither WithMeterProvider nor
// WithTracerProvider the client holds no instruments and no tracer, and
// every hook below is a nil check.

// instrumentation is the name of the meter and the tracer.
const instrumentation = "github.com/tasking-go/tasking"

// Attribute keys of tasking's metrics and spans.
const (
	attrName   = attribute.Key("tasking.task.name")
	attrState  = attribute.Key("tasking.task.state")
	attrTask   = attribute.Key("tasking.task.id")
	attrLocker = attribute.Key("tasking.locker")
	attrSource = attribute.Key("tasking.wakeup.source")
	attrWorker = attribute.Key("tasking.worker.id")
	attrCount  = attribute.Key("tasking.tasks")
)

// WithMeterProvider makes the client and its workers record metrics with
// mp's meter "github.com/tasking-go/tasking":
//
//   - tasking.tasks.dispatched, tasking.tasks.started (counters, by
//     tasking.task.name) and tasking.tasks.finished (by name and
//     tasking.task.state: completed, failed, canceled);
//   - tasking.task.wait.duration (dispatch to start) and
//     tasking.task.run.duration (handler run, by name and state),
//     histograms in seconds;
//   - tasking.tasks.waiting and tasking.tasks.waiting.oldest_age (gauges by
//     name, read from the database when the reader collects: one aggregate
//     over the tasks table, for the whole fleet, so each client reports the
//     same figures);
//   - tasking.locks.held (the worker's tasks holding locker grants) and
//     tasking.locks.refused (grants refused), by tasking.locker;
//   - tasking.admission.cycles (worker steps) and tasking.wakeups (by
//     tasking.wakeup.source: signal or poll).
//
// Default: none; nothing is recorded and nothing is read for metrics.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(c *clientConfig) { c.meters = mp }
}

// WithTracerProvider makes the client and its workers trace with tp's
// tracer "github.com/tasking-go/tasking": a producer span
// "tasking.dispatch" for each dispatch call (a child of the caller's span),
// and a consumer span "tasking.run <name>" for each run of a handler, whose
// context the handler gets (its own spans are children of it). The run
// span is linked to the dispatch span: the dispatch's trace context is
// stored with the task (one row per task in the schema's task_traces table,
// written by the dispatching statement) and read when a worker claims it.
// Default: none; no spans, and nothing stored.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(c *clientConfig) { c.tracers = tp }
}

// meters holds the client's instruments.
type meters struct {
	dispatched, started, finished metric.Int64Counter
	waitTime, runTime             metric.Float64Histogram
	locksHeld                     metric.Int64UpDownCounter
	locksRefused                  metric.Int64Counter
	cycles, wakeups               metric.Int64Counter
	locker                        metric.MeasurementOption
}

func newMeters(c *Client, mp metric.MeterProvider) (*meters, error) {
	m := mp.Meter(instrumentation)
	ms := &meters{locker: metric.WithAttributeSet(attribute.NewSet(attrLocker.String(c.locker.Kind())))}
	var err error
	counter := func(name, desc string) metric.Int64Counter {
		var ctr metric.Int64Counter
		if err == nil {
			ctr, err = m.Int64Counter(name, metric.WithDescription(desc), metric.WithUnit("{task}"))
		}
		return ctr
	}
	seconds := func(name, desc string) metric.Float64Histogram {
		var h metric.Float64Histogram
		if err == nil {
			h, err = m.Float64Histogram(name, metric.WithDescription(desc), metric.WithUnit("s"),
				metric.WithExplicitBucketBoundaries(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600))
		}
		return h
	}
	ms.dispatched = counter("tasking.tasks.dispatched", "Tasks dispatched.")
	ms.started = counter("tasking.tasks.started", "Tasks whose handler started.")
	ms.finished = counter("tasking.tasks.finished", "Tasks that ended on a worker, by final state.")
	ms.locksRefused = counter("tasking.locks.refused", "Lock grants refused by the locker (the task goes back in line).")
	ms.waitTime = seconds("tasking.task.wait.duration", "Time from dispatch to start.")
	ms.runTime = seconds("tasking.task.run.duration", "Time a handler ran.")
	if err == nil {
		ms.locksHeld, err = m.Int64UpDownCounter("tasking.locks.held",
			metric.WithDescription("Running tasks of this process that hold locker grants."), metric.WithUnit("{task}"))
	}
	if err == nil {
		ms.cycles, err = m.Int64Counter("tasking.admission.cycles",
			metric.WithDescription("Worker steps (finish, hand-off, claim)."), metric.WithUnit("{step}"))
	}
	if err == nil {
		ms.wakeups, err = m.Int64Counter("tasking.wakeups",
			metric.WithDescription("Wake-ups and polls of the workers' step loops."), metric.WithUnit("{wakeup}"))
	}
	var oldest metric.Float64ObservableGauge
	var count metric.Int64ObservableGauge
	if err == nil {
		count, err = m.Int64ObservableGauge("tasking.tasks.waiting",
			metric.WithDescription("Waiting tasks of the fleet, by name."), metric.WithUnit("{task}"))
	}
	if err == nil {
		oldest, err = m.Float64ObservableGauge("tasking.tasks.waiting.oldest_age",
			metric.WithDescription("Age of the oldest waiting task, by name."), metric.WithUnit("s"))
	}
	if err == nil {
		q := `SELECT name, count(*), extract(epoch FROM now() - min(created_at))
			FROM ` + pgx.Identifier{c.schema}.Sanitize() + `.tasks WHERE state = 'waiting' GROUP BY name`
		_, err = m.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
			rows, err := c.pool.Query(ctx, q)
			if err != nil {
				return err
			}
			var name string
			var n int64
			var age float64
			_, err = pgx.ForEachRow(rows, []any{&name, &n, &age}, func() error {
				set := metric.WithAttributeSet(attribute.NewSet(attrName.String(name)))
				o.ObserveInt64(count, n, set)
				o.ObserveFloat64(oldest, age, set)
				return nil
			})
			return err
		}, count, oldest)
	}
	if err != nil {
		return nil, fmt.Errorf("tasking: create metrics: %w", err)
	}
	return ms, nil
}

func byName(name string) metric.MeasurementOption {
	return metric.WithAttributeSet(attribute.NewSet(attrName.String(name)))
}

// dispatchedTasks counts a dispatch's tasks by name.
func (m *meters) dispatchedTasks(ctx context.Context, specs []TaskSpec) {
	if m == nil {
		return
	}
	if len(specs) == 1 {
		m.dispatched.Add(ctx, 1, byName(specs[0].Name))
		return
	}
	n := make(map[string]int64)
	for _, s := range specs {
		n[s.Name]++
	}
	for name, k := range n {
		m.dispatched.Add(ctx, k, byName(name))
	}
}

// startedTask records a task's start and its wait.
func (m *meters) startedTask(ctx context.Context, t *Task) {
	if m == nil {
		return
	}
	by := byName(t.Name)
	m.started.Add(ctx, 1, by)
	m.waitTime.Record(ctx, t.StartedAt.Sub(t.CreatedAt).Seconds(), by)
}

// finishedTask records a final state written by a step.
func (m *meters) finishedTask(ctx context.Context, o outcome) {
	if m == nil || o.task.Name == "" { // a sweep's outcome: no handler ran
		return
	}
	state := o.state
	if state == StateFailed && o.err == ErrCanceled.Error() {
		state = StateCanceled
	}
	set := metric.WithAttributeSet(attribute.NewSet(attrName.String(o.task.Name), attrState.String(string(state))))
	m.finished.Add(ctx, 1, set)
	m.runTime.Record(ctx, o.ran.Seconds(), set)
}

func (m *meters) grants(ctx context.Context, n int) {
	if m != nil && n != 0 {
		m.locksHeld.Add(ctx, int64(n), m.locker)
	}
}

func (m *meters) refused(ctx context.Context, n int) {
	if m != nil && n > 0 {
		m.locksRefused.Add(ctx, int64(n), m.locker)
	}
}

func (m *meters) cycle(ctx context.Context) {
	if m != nil {
		m.cycles.Add(ctx, 1)
	}
}

var (
	wakeSignal = metric.WithAttributeSet(attribute.NewSet(attrSource.String("signal")))
	wakePoll   = metric.WithAttributeSet(attribute.NewSet(attrSource.String("poll")))
)

func (m *meters) wakeup(poll bool) {
	if m == nil {
		return
	}
	src := wakeSignal
	if poll {
		src = wakePoll
	}
	m.wakeups.Add(context.Background(), 1, src)
}

// startDispatchSpan starts the span of a dispatch call and returns the
// trace context to store with its tasks ("" for none).
func (c *Client) startDispatchSpan(ctx context.Context, specs []TaskSpec) (context.Context, trace.Span, string) {
	if c.tracer == nil {
		return ctx, nil, ""
	}
	attrs := []attribute.KeyValue{attrCount.Int(len(specs)), attrName.String(specs[0].Name)}
	ctx, span := c.tracer.Start(ctx, "tasking.dispatch", trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(attrs...))
	return ctx, span, traceParent(span.SpanContext())
}

// endSpan ends span (if any) with err as its status.
func endSpan(span trace.Span, err error) {
	if span == nil {
		return
	}
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// traceParent formats sc as a W3C traceparent header value, "" when it is
// not valid.
func traceParent(sc trace.SpanContext) string {
	if !sc.IsValid() {
		return ""
	}
	tid, sid := sc.TraceID(), sc.SpanID()
	return "00-" + hex.EncodeToString(tid[:]) + "-" + hex.EncodeToString(sid[:]) + "-" + hex.EncodeToString([]byte{byte(sc.TraceFlags())})
}

// parseTraceParent is the inverse of traceParent; it returns an invalid
// SpanContext for anything else.
func parseTraceParent(s string) trace.SpanContext {
	parts := strings.Split(s, "-")
	if len(parts) != 4 || parts[0] != "00" {
		return trace.SpanContext{}
	}
	tid, err1 := trace.TraceIDFromHex(parts[1])
	sid, err2 := trace.SpanIDFromHex(parts[2])
	flags, err3 := hex.DecodeString(parts[3])
	if err1 != nil || err2 != nil || err3 != nil || len(flags) != 1 {
		return trace.SpanContext{}
	}
	return trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: tid, SpanID: sid, TraceFlags: trace.TraceFlags(flags[0]), Remote: true,
	})
}

// startRunSpan starts the span of a handler run, linked to the dispatch's
// trace context when the task carries one.
func (r *run) startRunSpan(ctx context.Context, t *Task) (context.Context, trace.Span) {
	tr := r.c.tracer
	if tr == nil {
		return ctx, nil
	}
	opts := []trace.SpanStartOption{
		trace.WithSpanKind(trace.SpanKindConsumer), trace.WithNewRoot(),
		trace.WithAttributes(attrTask.Int64(t.ID), attrName.String(t.Name), attrWorker.Int64(r.id)),
	}
	if t.parent.IsValid() {
		opts = append(opts, trace.WithLinks(trace.Link{SpanContext: t.parent}))
	}
	return tr.Start(ctx, "tasking.run "+t.Name, opts...)
}

// readParents sets the dispatch trace context of claimed tasks, from the
// task_traces rows their dispatch wrote, on the worker's connection. Only
// a worker that traces asks.
func (r *run) readParents(ctx context.Context, conn *workerConn, ts []*Task) {
	if r.c.tracer == nil || len(ts) == 0 {
		return
	}
	ids := make([]int64, len(ts))
	byID := make(map[int64]*Task, len(ts))
	for i, t := range ts {
		ids[i], byID[t.ID] = t.ID, t
	}
	rows, err := conn.Query(ctx, r.c.q.traces, ids)
	if err != nil {
		r.log.Debug("tasking: read the dispatch trace context of claimed tasks", "err", err)
		return
	}
	var id int64
	var parent string
	_, err = pgx.ForEachRow(rows, []any{&id, &parent}, func() error {
		if t := byID[id]; t != nil {
			t.parent = parseTraceParent(parent)
		}
		return nil
	})
	if err != nil {
		r.log.Debug("tasking: read the dispatch trace context of claimed tasks", "err", err)
	}
}
