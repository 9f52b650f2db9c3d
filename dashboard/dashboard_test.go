package dashboard_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/dashboard"
	"github.com/tasking-go/tasking/internal/testdb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/jackc/pgx/v5/pgxpool.(*Pool).backgroundHealthCheck"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"), // httptest's idle keep-alive connections
	)
}

// fleet is a queue with a worker and tasks in every interesting state.
type fleet struct {
	c                                 *tasking.Client
	done, running, blocked, unhandled *tasking.Task
}

func newFleet(t *testing.T) *fleet {
	t.Helper()
	pool := testdb.Pool(t, 10)
	c, err := tasking.New(pool, tasking.WithSchema(testdb.Schema(t, pool)),
		tasking.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	require.NoError(t, c.Migrate(ctx))

	started := make(chan int64, 8)
	w := tasking.NewWorker(c, tasking.WithSlots(2), tasking.WithWorkerName("dash-worker"),
		tasking.WithShutdownGrace(200*time.Millisecond))
	w.Handle("ok", func(_ context.Context, task *tasking.Task) error {
		if err := task.ReportProgress(tasking.Progress{Name: "pages", Message: "indexing pages",
			Done: 3, Total: 3, State: tasking.ProgressCompleted}); err != nil {
			return err
		}
		return task.SetResult(map[string]string{"answer": "forty-two"})
	})
	w.Handle("hold", func(ctx context.Context, task *tasking.Task) error {
		started <- task.ID
		<-ctx.Done()
		return context.Cause(ctx)
	})
	runCtx, stop := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- w.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		select {
		case err := <-ran:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Error("worker did not stop")
		}
	})

	f := &fleet{c: c}
	f.done, err = c.Dispatch(ctx, "ok", map[string]int{"n": 1})
	require.NoError(t, err)
	_, err = c.Wait(ctx, f.done.ID)
	require.NoError(t, err)
	f.running, err = c.Dispatch(ctx, "hold", nil, tasking.Exclusive("doc:7"))
	require.NoError(t, err)
	select {
	case id := <-started:
		require.Equal(t, f.running.ID, id)
	case <-time.After(10 * time.Second):
		t.Fatal("hold did not start")
	}
	f.blocked, err = c.Dispatch(ctx, "hold", nil, tasking.Exclusive("doc:7"))
	require.NoError(t, err)
	f.unhandled, err = c.Dispatch(ctx, "nobody", nil)
	require.NoError(t, err)
	return f
}

func serve(t *testing.T, h http.Handler) (*httptest.Server, *http.Client) {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	cl := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	t.Cleanup(cl.CloseIdleConnections)
	return srv, cl
}

func get(t *testing.T, cl *http.Client, u string) (int, string) {
	t.Helper()
	resp, err := cl.Get(u)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

func getJSON(t *testing.T, cl *http.Client, u string, v any) {
	t.Helper()
	code, body := get(t, cl, u)
	require.Equal(t, http.StatusOK, code, body)
	require.NoError(t, json.Unmarshal([]byte(body), v), body)
}

func id(t *tasking.Task) string { return strconv.FormatInt(t.ID, 10) }

func TestPages(t *testing.T) {
	t.Parallel()
	f := newFleet(t)
	srv, cl := serve(t, dashboard.New(f.c))

	code, body := get(t, cl, srv.URL+"/")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "Tasks by state")
	require.Contains(t, body, "no live worker handles nobody")
	require.Contains(t, body, "dash-worker")
	require.Regexp(t, `<td class="n"><a href="/tasks\?state=waiting">2</a></td>`, body)

	code, body = get(t, cl, srv.URL+"/tasks?state=waiting")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `href="/tasks/`+id(f.blocked)+`"`)
	require.Contains(t, body, `href="/tasks/`+id(f.unhandled)+`"`)
	require.NotContains(t, body, `href="/tasks/`+id(f.done)+`"`, "filtered by state")
	_, body = get(t, cl, srv.URL+"/tasks?name=ok")
	require.Contains(t, body, `href="/tasks/`+id(f.done)+`"`)
	require.NotContains(t, body, `href="/tasks/`+id(f.running)+`"`, "filtered by name")
	_, body = get(t, cl, srv.URL+"/tasks?resource=doc:7")
	require.Contains(t, body, `href="/tasks/`+id(f.running)+`"`)
	require.NotContains(t, body, `href="/tasks/`+id(f.done)+`"`, "filtered by resource")

	code, body = get(t, cl, srv.URL+"/tasks/"+id(f.blocked))
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "Why is it waiting?")
	require.Contains(t, body, `<a href="/tasks/`+id(f.running)+`">task `+id(f.running)+`</a>`)
	require.Contains(t, body, "holds it")
	require.NotContains(t, body, `id="cancel"`, "cancel is off by default")

	_, body = get(t, cl, srv.URL+"/tasks/"+id(f.unhandled))
	require.Contains(t, body, "No live worker handles “nobody”")

	_, body = get(t, cl, srv.URL+"/tasks/"+id(f.done))
	require.Contains(t, body, "&#34;answer&#34;: &#34;forty-two&#34;", "the result, indented")
	require.Contains(t, body, "&#34;n&#34;: 1", "the args")
	require.Regexp(t, `<tr><td>pages</td><td>completed</td><td>3 / 3</td><td>indexing pages</td></tr>`, body, "the progress reports")
	require.NotContains(t, body, "Why is it waiting?")

	code, body = get(t, cl, srv.URL+"/workers")
	require.Equal(t, http.StatusOK, code)
	require.Regexp(t, `1 / 2</a>`, body, "busy / slots")

	code, _ = get(t, cl, srv.URL+"/tasks/abc")
	require.Equal(t, http.StatusBadRequest, code)
	code, _ = get(t, cl, srv.URL+"/tasks/99999999")
	require.Equal(t, http.StatusNotFound, code)
	code, _ = get(t, cl, srv.URL+"/tasks?state=sleeping")
	require.Equal(t, http.StatusBadRequest, code)
	code, _ = get(t, cl, srv.URL+"/nowhere")
	require.Equal(t, http.StatusNotFound, code)
}

func TestAPI(t *testing.T) {
	t.Parallel()
	f := newFleet(t)
	srv, cl := serve(t, dashboard.New(f.c, dashboard.WithPageSize(1)))

	var st dashboard.StatsView
	getJSON(t, cl, srv.URL+"/api/stats", &st)
	require.EqualValues(t, 2, st.States[tasking.StateWaiting])
	require.EqualValues(t, 1, st.States[tasking.StateRunning])
	require.Len(t, st.Workers, 1)
	require.Equal(t, 1, st.Workers[0].Busy)

	var list dashboard.TaskList
	getJSON(t, cl, srv.URL+"/api/tasks?state=waiting", &list)
	require.Len(t, list.Tasks, 1, "page size 1")
	require.Equal(t, f.blocked.ID, list.Tasks[0].ID)
	require.Equal(t, f.blocked.ID, list.Next)
	getJSON(t, cl, srv.URL+"/api/tasks?state=waiting&after="+strconv.FormatInt(list.Next, 10), &list)
	require.Equal(t, f.unhandled.ID, list.Tasks[0].ID)
	getJSON(t, cl, srv.URL+"/api/tasks?limit=10", &list)
	require.Len(t, list.Tasks, 4)
	code, _ := get(t, cl, srv.URL+"/api/tasks?limit=x")
	require.Equal(t, http.StatusBadRequest, code)

	var d dashboard.TaskDetail
	getJSON(t, cl, srv.URL+"/api/tasks/"+id(f.blocked), &d)
	require.Equal(t, tasking.StateWaiting, d.Task.State)
	require.NotNil(t, d.Wait)
	require.False(t, d.Wait.Ready)
	require.Len(t, d.Wait.Resources, 1)
	require.Equal(t, "doc:7", d.Wait.Resources[0].Resource)
	require.Equal(t, f.running.ID, d.Wait.Resources[0].Ahead[0].ID)
	require.Equal(t, tasking.StateRunning, d.Wait.Resources[0].Ahead[0].State)

	var dd dashboard.TaskDetail
	getJSON(t, cl, srv.URL+"/api/tasks/"+id(f.done), &dd)
	require.Nil(t, dd.Wait)
	require.JSONEq(t, `{"answer": "forty-two"}`, string(dd.Task.Result))

	var ws []dashboard.WorkerView
	getJSON(t, cl, srv.URL+"/api/workers", &ws)
	require.Len(t, ws, 1)
	require.Equal(t, "dash-worker", ws[0].Name)
	require.Equal(t, []string{"hold", "ok"}, ws[0].Handles)

	code, body := get(t, cl, srv.URL+"/api/tasks/99999999")
	require.Equal(t, http.StatusNotFound, code)
	require.JSONEq(t, `{"error": "no such task"}`, body)
}

func post(t *testing.T, cl *http.Client, u string, form url.Values, header map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, u, strings.NewReader(form.Encode()))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := cl.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Location")
}

// TestCancel: cancel only when the host enables it, only by POST, only
// with the page's token (or the API's header).
func TestCancel(t *testing.T) {
	t.Parallel()
	f := newFleet(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	off, offCl := serve(t, dashboard.New(f.c))
	code, _ := post(t, offCl, off.URL+"/tasks/"+id(f.blocked)+"/cancel", nil, nil)
	require.Equal(t, http.StatusForbidden, code)
	code, _ = post(t, offCl, off.URL+"/api/tasks/"+id(f.blocked)+"/cancel", nil, map[string]string{"X-Tasking-Request": "1"})
	require.Equal(t, http.StatusForbidden, code, "not enabled")

	// Mounted under a prefix, as a host would.
	mux := http.NewServeMux()
	mux.Handle("/admin/", http.StripPrefix("/admin", dashboard.New(f.c, dashboard.AllowCancel())))
	on, cl := serve(t, mux)
	code, body := get(t, cl, on.URL+"/admin/tasks/"+id(f.blocked))
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `id="cancel"`)
	require.Contains(t, body, `href="/admin/tasks/`+id(f.running)+`"`, "links keep the mount prefix")
	token := regexp.MustCompile(`name="token" value="([0-9a-f]+)"`).FindStringSubmatch(body)
	require.Len(t, token, 2)

	code, _ = get(t, cl, on.URL+"/admin/tasks/"+id(f.blocked)+"/cancel")
	require.Equal(t, http.StatusMethodNotAllowed, code, "GET does not cancel")
	code, _ = post(t, cl, on.URL+"/admin/tasks/"+id(f.blocked)+"/cancel", url.Values{"token": {"forged"}}, nil)
	require.Equal(t, http.StatusForbidden, code, "a cross-site form has no token")
	got, err := f.c.Get(ctx, f.blocked.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateWaiting, got.State)

	code, loc := post(t, cl, on.URL+"/admin/tasks/"+id(f.blocked)+"/cancel", url.Values{"token": {token[1]}}, nil)
	require.Equal(t, http.StatusSeeOther, code)
	require.Equal(t, "/admin/tasks/"+id(f.blocked), loc)
	got, err = f.c.Get(ctx, f.blocked.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, got.State)
	_, body = get(t, cl, on.URL+loc)
	require.NotContains(t, body, `id="cancel"`, "a final task has no cancel button")

	// The API: the running task, with the header.
	code, _ = post(t, cl, on.URL+"/admin/api/tasks/"+id(f.running)+"/cancel", nil, nil)
	require.Equal(t, http.StatusForbidden, code, "no header")
	code, _ = post(t, cl, on.URL+"/admin/api/tasks/"+id(f.running)+"/cancel", nil, map[string]string{"X-Tasking-Request": "1"})
	require.Equal(t, http.StatusOK, code)
	done, err := f.c.Wait(ctx, f.running.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCanceled, done.State)
	code, _ = post(t, cl, on.URL+"/admin/api/tasks/"+id(f.done)+"/cancel", nil, map[string]string{"X-Tasking-Request": "1"})
	require.Equal(t, http.StatusConflict, code, "a completed task cannot be canceled")
}
