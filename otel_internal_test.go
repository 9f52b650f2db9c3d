package tasking

import (
	"context"
	"testing"
)

// BenchmarkTelemetryOff is every telemetry hook a task passes through (one
// dispatch, one run, one step, one wake-up) on a client without providers:
// what OpenTelemetry support costs a task when it is not configured.
func BenchmarkTelemetryOff(b *testing.B) {
	c := &Client{}
	r := &run{c: c, w: &Worker{}}
	t := &Task{Name: "x"}
	specs := []TaskSpec{{Name: "x"}}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		dctx, dspan, parent := c.startDispatchSpan(ctx, specs)
		endSpan(dspan, nil)
		c.met.dispatchedTasks(dctx, specs)
		r.readParents(ctx, nil, []*Task{t})
		hctx, span := r.startRunSpan(ctx, t)
		c.met.startedTask(hctx, t)
		r.failed(hctx, t, nil)
		endSpan(span, nil)
		c.met.grants(ctx, 1)
		c.met.cycle(ctx)
		c.met.finishedTask(ctx, outcome{task: t})
		c.met.grants(ctx, -1)
		c.met.wakeup(false)
		_ = parent
	}
}

func TestTraceParentRoundTrip(t *testing.T) {
	for _, s := range []string{
		"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
	} {
		sc := parseTraceParent(s)
		if !sc.IsValid() || traceParent(sc) != s {
			t.Errorf("%s: parsed %v, formatted %q", s, sc, traceParent(sc))
		}
	}
	for _, bad := range []string{"", "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "00-zz-b7ad6b7169203331-01",
		"00-00000000000000000000000000000000-b7ad6b7169203331-01", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"} {
		if parseTraceParent(bad).IsValid() {
			t.Errorf("%q parsed as valid", bad)
		}
	}
}
