package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
)

// column is one locker (and, for hot, one variant) with its trials.
type column struct {
	key    string
	runs   []*Result
	median *Result
}

func (rep *Report) columns() []*column {
	var cols []*column
	idx := map[string]*column{}
	for _, r := range rep.Results {
		k := r.Locker + variantLabel(r.Variant)
		c := idx[k]
		if c == nil {
			c = &column{key: k}
			idx[k] = c
			cols = append(cols, c)
		}
		c.runs = append(c.runs, r)
	}
	for _, c := range cols {
		c.median = median(c.runs, rateOf)
	}
	return cols
}

// rateOf is the throughput a trial is judged by: for hot, the tasks behind
// the head.
func rateOf(r *Result) float64 {
	if g, ok := r.ByName[nameTail]; ok {
		return g.Rate
	}
	return r.All.Rate
}

// Markdown writes the side-by-side tables.
func (rep *Report) Markdown(w io.Writer) {
	c := rep.Config
	cols := rep.columns()
	fmt.Fprintf(w, "workload **%s**, %s, %d tasks", c.Workload, c.Mode, c.Tasks)
	if c.Workload == "hot" {
		fmt.Fprintf(w, " (head %d on one name, %d behind it)", c.Head, c.Tasks-c.Head)
	}
	fmt.Fprintf(w, ", body %s, %d slots in %d worker process(es), %d cores", c.Body, c.Slots, c.Procs, c.GOMAXPROCS)
	if c.WorkerProcs > 0 {
		fmt.Fprintf(w, ", GOMAXPROCS=%d in each worker process", c.WorkerProcs)
	}
	if c.KeepAlive != "" {
		fmt.Fprintf(w, ", rueidis keep-alive %s", c.KeepAlive)
	}
	if c.PgBouncer > 0 {
		fmt.Fprintf(w, ", workers through PgBouncer (%s, transaction pooling, %d server connections)", c.PgBouncerV, c.PgBouncer)
	}
	if c.Mode == "stream" {
		if c.Rate > 0 {
			fmt.Fprintf(w, ", %d dispatchers at %.0f tasks/s", c.Dispatchers, c.Rate)
		} else {
			fmt.Fprintf(w, ", %d dispatchers as fast as they can", c.Dispatchers)
		}
		if c.DispatchProcs > 1 {
			fmt.Fprintf(w, " in %d processes", c.DispatchProcs)
		}
	} else {
		fmt.Fprintf(w, ", dispatched in batches of %d", c.Batch)
	}
	if c.StopAfter > 0 {
		fmt.Fprintf(w, ", stopped after %d tasks", c.StopAfter)
	}
	if c.MaxDrain != "" {
		fmt.Fprintf(w, ", stopped after %s of draining at most", c.MaxDrain)
	}
	fmt.Fprintf(w, "; median of %d run(s)\n\n", c.Repeat)

	fmt.Fprint(w, "| |")
	for _, col := range cols {
		fmt.Fprintf(w, " %s |", col.key)
	}
	fmt.Fprint(w, "\n|---|")
	for range cols {
		fmt.Fprint(w, "---:|")
	}
	fmt.Fprintln(w)
	row := func(name string, f func(col *column, m *Result) string) {
		fmt.Fprintf(w, "| %s |", name)
		for _, col := range cols {
			fmt.Fprintf(w, " %s |", f(col, col.median))
		}
		fmt.Fprintln(w)
	}
	rates := func(col *column, get func(*Result) float64) string {
		if len(col.runs) == 1 {
			return fmt.Sprintf("**%s**", num(get(col.median)))
		}
		var xs []float64
		for _, r := range col.runs {
			xs = append(xs, get(r))
		}
		slices.Sort(xs)
		return fmt.Sprintf("**%s** (%s–%s)", num(get(col.median)), num(xs[0]), num(xs[len(xs)-1]))
	}
	if c.Workload == "hot" {
		row("tasks/s behind the head (tail)", func(col *column, _ *Result) string { return rates(col, rateOf) })
		row("head tasks/s", func(_ *column, m *Result) string {
			if g, ok := m.ByName[nameHead]; ok {
				return num(g.Rate)
			}
			return "–"
		})
		row("tasks/s, all", func(col *column, _ *Result) string {
			return rates(col, func(r *Result) float64 { return r.All.Rate })
		})
	} else {
		row("tasks/s", func(col *column, _ *Result) string { return rates(col, rateOf) })
	}
	row("completed / dispatched", func(_ *column, m *Result) string {
		s := fmt.Sprintf("%d / %d", m.All.Completed, m.All.Tasks)
		if m.All.Failed > 0 {
			s += fmt.Sprintf(" (%d failed)", m.All.Failed)
		}
		return s
	})
	row("first start → last finish", func(_ *column, m *Result) string { return fmt.Sprintf("%.2f s", m.All.Seconds) })
	if c.Procs > 1 && c.Workload != "hot" {
		row("tasks/s once every worker process ran (from)", func(_ *column, m *Result) string {
			if m.SteadyRate == 0 {
				return "–"
			}
			return fmt.Sprintf("%s (%.1f s)", num(m.SteadyRate), m.SteadyFrom)
		})
	}
	waitOf := func(m *Result) groupStats {
		if g, ok := m.ByName[nameTail]; ok {
			return g
		}
		return m.All
	}
	row("wait p50 / p95 / p99 (ms)", func(_ *column, m *Result) string {
		g := waitOf(m)
		return fmt.Sprintf("%s / %s / %s", ms(g.WaitP50), ms(g.WaitP95), ms(g.WaitP99))
	})
	row("dispatch tasks/s", func(_ *column, m *Result) string {
		if m.DispatchSplits > 0 {
			return fmt.Sprintf("%s (%d batches split: lock table full)", num(m.DispatchRate), m.DispatchSplits)
		}
		return num(m.DispatchRate)
	})
	row("PG statements / task", func(_ *column, m *Result) string {
		return fmt.Sprintf("**%.3f** (dispatch %.3f, workers %.3f)", m.StmtPerTask,
			perTask(m.DispatchStmt, m), perTask(m.WorkerStmt, m))
	})
	row("pg_stat_statements calls / task", func(_ *column, m *Result) string {
		if m.PGSSCalls == nil {
			return "n/a"
		}
		return fmt.Sprintf("%.3f", perTask(*m.PGSSCalls, m))
	})
	row("LISTEN / NOTIFY / session advisory calls", func(_ *column, m *Result) string {
		return fmt.Sprintf("%d / %d / %d", m.Listen, m.Notify, m.SessionLocks)
	})
	row("Redis commands / task (client)", func(_ *column, m *Result) string {
		if m.Locker != "redis" {
			return "–"
		}
		return fmt.Sprintf("%.3f", m.RedisPerTask)
	})
	row("Redis calls / task (server INFO, shared)", func(_ *column, m *Result) string {
		if m.Locker != "redis" {
			return "–"
		}
		return fmt.Sprintf("%.3f", m.RedisServerPer)
	})
	row("peak PG connections", func(_ *column, m *Result) string {
		if c.PgBouncer > 0 {
			return fmt.Sprintf("%d (workers' through PgBouncer: %d)", m.PeakConns, m.PeakConnsWork)
		}
		return fmt.Sprintf("%d (workers': %d)", m.PeakConns, m.PeakConnsWork)
	})
	row("peak PG connections per worker process", func(_ *column, m *Result) string { return perProcConns(c, m) })
	row("connection errors: workers / dispatch", func(_ *column, m *Result) string {
		return fmt.Sprintf("%d / %d", m.ConnErrors, m.DispatchConnEr)
	})
	lost := false
	for _, col := range cols {
		for _, r := range col.runs {
			lost = lost || len(r.LostProcs) > 0
		}
	}
	if lost {
		row("worker processes that ended early", func(_ *column, m *Result) string {
			if len(m.LostProcs) == 0 {
				return "0"
			}
			return fmt.Sprintf("%d (first: %s)", len(m.LostProcs), shorten(m.LostErr, 120))
		})
	}
	cpuTitle := "CPU ms / 1k tasks: worker proc / PG (workers) / PG (dispatch) / Redis"
	if c.PgBouncer > 0 {
		cpuTitle += " / PgBouncer"
	}
	row(cpuTitle, func(_ *column, m *Result) string {
		k := float64(m.All.Completed) / 1000
		if k == 0 {
			return "–"
		}
		rd := "–"
		if m.Locker == "redis" {
			rd = fmt.Sprintf("%.0f", m.RedisCPU*1000/k)
		}
		s := fmt.Sprintf("%.0f / %.0f / %.0f / %s", m.WorkerCPU*1000/k, m.PGWorkerCPU*1000/k, m.PGDispatchCPU*1000/k, rd)
		if c.PgBouncer > 0 {
			s += fmt.Sprintf(" / %.0f", m.PgBouncerCPU*1000/k)
		}
		return s
	})
	row("machine busy while draining (cores)", func(_ *column, m *Result) string {
		return fmt.Sprintf("%.2f of %d", m.MachineBusy, c.GOMAXPROCS)
	})
	row("oldest transaction of another session (s)", func(_ *column, m *Result) string {
		if m.OtherXact >= 2 {
			return fmt.Sprintf("**%.0f** (claims slowed: not representative)", m.OtherXact)
		}
		return fmt.Sprintf("%.1f", m.OtherXact)
	})

	if c.Workload == "hot" {
		fmt.Fprintln(w)
		for _, lk := range c.Lockers {
			var h, n *column
			for _, col := range cols {
				if col.median.Locker == lk && col.median.Variant == "head" {
					h = col
				}
				if col.median.Locker == lk && col.median.Variant == "no-head" {
					n = col
				}
			}
			if h != nil && n != nil && rateOf(n.median) > 0 {
				fmt.Fprintf(w, "- %s: the %d tasks behind a blocked head of %d drain at %s tasks/s, %.0f%% of their %s tasks/s without the head\n",
					lk, c.Tasks-c.Head, c.Head, num(rateOf(h.median)), 100*rateOf(h.median)/rateOf(n.median), num(rateOf(n.median)))
			}
		}
	}

	// Statements by kind.
	fmt.Fprintf(w, "\nPostgreSQL statements per task by kind (median run), with the count and the mean time from send to result:\n\n| |")
	for _, col := range cols {
		fmt.Fprintf(w, " %s |", col.key)
	}
	fmt.Fprint(w, "\n|---|")
	for range cols {
		fmt.Fprint(w, "---:|")
	}
	fmt.Fprintln(w)
	var kinds []string
	for _, col := range cols {
		for _, k := range col.median.StmtKinds {
			if !slices.Contains(kinds, k.Kind) {
				kinds = append(kinds, k.Kind)
			}
		}
	}
	for _, k := range kinds {
		fmt.Fprintf(w, "| %s |", k)
		for _, col := range cols {
			var n, ns int64
			for _, kc := range col.median.StmtKinds {
				if kc.Kind == k {
					n, ns = kc.N, kc.Ns
				}
			}
			mean := ""
			if n > 0 && ns > 0 {
				mean = fmt.Sprintf(", %.2f ms", float64(ns)/float64(n)/1e6)
			}
			fmt.Fprintf(w, " %.4f (%d%s) |", perTask(n, col.median), n, mean)
		}
		fmt.Fprintln(w)
	}
	for _, col := range cols {
		m := col.median
		if m.Locker == "redis" && len(m.RedisClient) > 0 {
			keys := make([]string, 0, len(m.RedisClient))
			for k := range m.RedisClient {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			var parts []string
			for _, k := range keys {
				parts = append(parts, fmt.Sprintf("%s %d", k, m.RedisClient[k]))
			}
			fmt.Fprintf(w, "\nRedis commands sent, %s (client side): %s\n", col.key, strings.Join(parts, ", "))
		}
	}
}

// perProcConns is the most connections one worker process had at once: to
// PostgreSQL, or, through PgBouncer, to PgBouncer.
func perProcConns(c reportConfig, m *Result) string {
	if c.PgBouncer > 0 {
		return fmt.Sprintf("– (%d to PgBouncer)", m.PeakConnsProc)
	}
	return fmt.Sprint(m.PeakConnsProc)
}

func shorten(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func perTask(n int64, m *Result) float64 {
	if m.All.Completed == 0 {
		return 0
	}
	return float64(n) / float64(m.All.Completed)
}

func ms(x float64) string {
	switch {
	case x >= 1000:
		return fmt.Sprintf("%.0f", x)
	case x >= 10:
		return fmt.Sprintf("%.1f", x)
	}
	return fmt.Sprintf("%.2f", x)
}

// num formats a rate with thousands separators.
func num(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "–"
	}
	s := fmt.Sprintf("%.0f", x)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// WriteJSON writes the report to path.
func (rep *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// WriteSVG draws the throughput over time (tasks finished per 100 ms,
// shown as tasks/s) of each column's median run, as a hand-written SVG.
func (rep *Report) WriteSVG(path string) error {
	return os.WriteFile(path, []byte(rep.svg()), 0o644)
}

var palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"}

func (rep *Report) svg() string {
	const W, H, L, R, T, B = 900.0, 440.0, 70.0, 20.0, 60.0, 50.0
	cols := rep.columns()
	maxX, maxY := 0.1, 1.0
	for _, col := range cols {
		bs := col.median.Buckets
		maxX = max(maxX, float64(len(bs))/10)
		for _, n := range bs {
			maxY = max(maxY, float64(n)*10)
		}
	}
	xStep, yStep := niceStep(maxX), niceStep(maxY)
	maxX = math.Ceil(maxX/xStep) * xStep
	maxY = math.Ceil(maxY/yStep) * yStep
	px := func(x float64) float64 { return L + x/maxX*(W-L-R) }
	py := func(y float64) float64 { return H - B - y/maxY*(H-T-B) }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", W, H, W, H)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	c := rep.Config
	title := fmt.Sprintf("tasking bench: %s, %s, %d tasks, %d slots, body %s — tasks finished per 100 ms (as tasks/s)",
		c.Workload, c.Mode, c.Tasks, c.Slots, c.Body)
	fmt.Fprintf(&b, `<text x="%.0f" y="20" font-size="14">%s</text>`+"\n", L, xmlEscape(title))
	for y := 0.0; y <= maxY+yStep/2; y += yStep {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", L, py(y), W-R, py(y))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%s</text>`+"\n", L-6, py(y)+4, num(y))
	}
	for x := 0.0; x <= maxX+xStep/2; x += xStep {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#eee"/>`+"\n", px(x), T, px(x), H-B)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%g</text>`+"\n", px(x), H-B+16, round(x, 2))
	}
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", L, H-B, W-R, H-B)
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", L, T, L, H-B)
	fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">seconds since the first task started</text>`+"\n", (L+W-R)/2, H-12)
	fmt.Fprintf(&b, `<text transform="translate(16 %.1f) rotate(-90)" text-anchor="middle">tasks/s</text>`+"\n", (T+H-B)/2)
	for i, col := range cols {
		color := palette[i%len(palette)]
		var pts []string
		for j, n := range col.median.Buckets {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(float64(j)/10), py(float64(n)*10)),
				fmt.Sprintf("%.1f,%.1f", px(float64(j+1)/10), py(float64(n)*10)))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`+"\n", color, strings.Join(pts, " "))
		lx, ly := L+float64(i%4)*205, 40+float64(i/4)*14
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="3"/>`+"\n", lx, ly-4, lx+20, ly-4, color)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f">%s: %s tasks/s</text>`+"\n", lx+26, ly, xmlEscape(col.key), num(rateOf(col.median)))
	}
	b.WriteString("</svg>\n")
	return b.String()
}

// niceStep picks a 1-2-5 step giving about 5 to 10 ticks up to max.
func niceStep(max float64) float64 {
	raw := max / 6
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

func xmlEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}
