// Package dashboard serves a web view of a tasking queue and its fleet, as
// an [http.Handler] that a service mounts in its own mux:
//
//	mux.Handle("/tasks/", http.StripPrefix("/tasks", dashboard.New(client)))
//
// Pages are rendered on the server (html/template, no JavaScript): the
// overview (tasks by state and by name, the oldest waiting task's age per
// name, names no live worker handles, the workers), a task list filtered by
// state, name and resource, a task's detail (args, result, error, progress
// reports, failed attempts, parent and group, and for a
// waiting task what it waits for, resource by resource, from
// [tasking.Client.WhyWaiting]) and the workers. Every page has a JSON
// twin under api/:
//
//	GET  api/stats              StatsView
//	GET  api/tasks              TaskList (?state=&name=&resource=&after=&limit=)
//	GET  api/tasks/{id}         TaskDetail (with what a waiting task waits for)
//	GET  api/workers            []WorkerView
//	POST api/tasks/{id}/cancel  TaskView (with AllowCancel and an X-Tasking-Request header)
//
// Errors come back as {"error": "..."} with a 400, 403, 404, 409 or 500.
//
// It is read-only unless the host enables cancel ([AllowCancel]); cancel is
// a POST guarded against cross-site requests. The dashboard has no
// authentication of its own: mount it behind the host's.
//
// It lives in a package of its own so that services that do not serve it
// do not link its templates, and it uses only tasking's public API.
package dashboard

import (
	"crypto/rand"
	"crypto/subtle"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"html/template"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/tasking-go/tasking"
)

//go:embed templates/*.html
var templateFS embed.FS

// Option configures the dashboard.
type Option func(*config)

type config struct {
	cancel   bool
	pageSize int
	title    string
	logger   *slog.Logger
}

// AllowCancel shows a cancel button on the pages of waiting and running
// tasks and accepts cancel requests (POST, with a token the pages carry, or
// the API's X-Tasking-Request header, so that another site cannot make a
// browser send one). Default: off; the dashboard only reads.
func AllowCancel() Option { return func(c *config) { c.cancel = true } }

// WithPageSize sets how many tasks a list page shows, 1 to 1,000.
// Default: 50.
func WithPageSize(n int) Option { return func(c *config) { c.pageSize = n } }

// WithTitle sets the title shown on every page. Default: "tasking".
func WithTitle(s string) Option { return func(c *config) { c.title = s } }

// WithLogger sets where internal errors (a failed query) are logged; the
// browser gets a generic message. Default: [slog.Default].
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.logger = l } }

// Handler is the dashboard. It is safe for concurrent use.
type Handler struct {
	c     *tasking.Client
	cfg   config
	mux   *http.ServeMux
	pages map[string]*template.Template
	token string // guards cancel forms against cross-site posts
}

// New returns the dashboard of c's queue. It panics on a nil client or a
// page size out of range, as these are programming errors.
func New(c *tasking.Client, opts ...Option) *Handler {
	if c == nil {
		panic("dashboard: nil *tasking.Client")
	}
	cfg := config{pageSize: 50, title: "tasking", logger: slog.Default()}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.pageSize < 1 || cfg.pageSize > 1000 {
		panic("dashboard: page size " + strconv.Itoa(cfg.pageSize) + " out of 1..1000")
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	h := &Handler{c: c, cfg: cfg, mux: http.NewServeMux(), token: hex.EncodeToString(b[:]), pages: map[string]*template.Template{}}
	for _, p := range []string{"overview", "tasks", "task", "workers"} {
		// workers.html also defines the workers table the overview shows.
		h.pages[p] = template.Must(template.New("layout.html").Funcs(funcs).ParseFS(templateFS,
			"templates/layout.html", "templates/workers.html", "templates/"+p+".html"))
	}
	h.mux.HandleFunc("GET /{$}", h.overview)
	h.mux.HandleFunc("GET /tasks", h.tasks)
	h.mux.HandleFunc("GET /tasks/{id}", h.task)
	h.mux.HandleFunc("POST /tasks/{id}/cancel", h.cancelForm)
	h.mux.HandleFunc("GET /workers", h.workers)
	h.mux.HandleFunc("GET /api/stats", h.apiStats)
	h.mux.HandleFunc("GET /api/tasks", h.apiTasks)
	h.mux.HandleFunc("GET /api/tasks/{id}", h.apiTask)
	h.mux.HandleFunc("POST /api/tasks/{id}/cancel", h.apiCancel)
	h.mux.HandleFunc("GET /api/workers", h.apiWorkers)
	return h
}

// ServeHTTP serves the dashboard. Mounted under a prefix with
// http.StripPrefix, its links keep that prefix.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "" {
		r.URL.Path = "/"
	}
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("X-Frame-Options", "DENY")
	h.mux.ServeHTTP(w, r)
}

// base is the path the dashboard is mounted at, without the trailing
// slash: what http.StripPrefix took off the request's path.
func base(r *http.Request) string {
	orig := r.URL.Path
	if u, err := url.ParseRequestURI(r.RequestURI); err == nil {
		orig = u.Path
	}
	return strings.TrimSuffix(strings.TrimSuffix(orig, r.URL.Path), "/")
}

// pageData is what every page template gets.
type pageData struct {
	Title  string
	Base   string
	Page   string
	Cancel bool
	Token  string
	Data   any
}

func (h *Handler) render(w http.ResponseWriter, r *http.Request, page string, status int, data any) {
	var buf strings.Builder
	err := h.pages[page].Execute(&buf, pageData{
		Title: h.cfg.title, Base: base(r), Page: page, Cancel: h.cfg.cancel, Token: h.token, Data: data,
	})
	if err != nil {
		h.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(buf.String()))
}

// fail answers an error: bad input and unknown tasks as such, anything else
// as an internal error, logged.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, msg := http.StatusInternalServerError, "internal error"
	switch {
	case errors.Is(err, tasking.ErrNotFound):
		status, msg = http.StatusNotFound, "no such task"
	case errors.Is(err, tasking.ErrInvalidInput), errors.Is(err, errBadID):
		status, msg = http.StatusBadRequest, err.Error()
	case errors.Is(err, tasking.ErrTaskFinal):
		status, msg = http.StatusConflict, "the task is already final"
	case errors.Is(err, errForbidden):
		status, msg = http.StatusForbidden, err.Error()
	default:
		h.cfg.logger.Error("dashboard: request failed", "path", r.URL.Path, "err", err)
	}
	if strings.HasPrefix(r.URL.Path, "/api/") {
		writeJSON(w, status, map[string]string{"error": msg})
		return
	}
	http.Error(w, msg, status)
}

var (
	errBadID     = errors.New("bad task id")
	errForbidden = errors.New("cancel is not enabled on this dashboard, or the request did not come from it")
)

func taskID(r *http.Request) (int64, error) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil || id <= 0 {
		return 0, errBadID
	}
	return id, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// cancelAllowed checks a cancel request: enabled, and either the form's
// token (pages) or the X-Tasking-Request header (API), which a cross-site
// form cannot carry and a cross-site script cannot send without a CORS
// preflight this handler never approves.
func (h *Handler) cancelAllowed(r *http.Request, api bool) bool {
	if !h.cfg.cancel {
		return false
	}
	if api {
		return r.Header.Get("X-Tasking-Request") != ""
	}
	tok := r.PostFormValue("token")
	return subtle.ConstantTimeCompare([]byte(tok), []byte(h.token)) == 1
}
