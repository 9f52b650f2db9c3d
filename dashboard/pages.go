package dashboard

import (
	"net/http"
	"strconv"

	"github.com/tasking-go/tasking"
)

func (h *Handler) overview(w http.ResponseWriter, r *http.Request) {
	st, err := h.c.Stats(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.render(w, r, "overview", http.StatusOK, st)
}

// listPage is the task list page's data.
type listPage struct {
	Filter tasking.ListFilter
	Tasks  []*tasking.Task
	Next   int64
}

func (h *Handler) tasks(w http.ResponseWriter, r *http.Request) {
	f, err := filter(r, h.cfg.pageSize)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	ts, next, err := h.c.List(r.Context(), f)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.render(w, r, "tasks", http.StatusOK, listPage{Filter: f, Tasks: ts, Next: next})
}

// detail reads a task and, while it waits, what it waits for.
func (h *Handler) detail(r *http.Request) (*tasking.WaitReport, error) {
	id, err := taskID(r)
	if err != nil {
		return nil, err
	}
	return h.c.WhyWaiting(r.Context(), id)
}

func (h *Handler) task(w http.ResponseWriter, r *http.Request) {
	rep, err := h.detail(r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.render(w, r, "task", http.StatusOK, rep)
}

func (h *Handler) cancelForm(w http.ResponseWriter, r *http.Request) {
	id, err := taskID(r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if !h.cancelAllowed(r, false) {
		h.fail(w, r, errForbidden)
		return
	}
	if err := h.c.Cancel(r.Context(), id); err != nil {
		h.fail(w, r, err)
		return
	}
	// Post/redirect/get: a reload does not post again.
	http.Redirect(w, r, base(r)+"/tasks/"+strconv.FormatInt(id, 10), http.StatusSeeOther)
}

func (h *Handler) workers(w http.ResponseWriter, r *http.Request) {
	ws, err := h.c.Workers(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.render(w, r, "workers", http.StatusOK, ws)
}
