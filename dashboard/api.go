package dashboard

import (
	"net/http"
)

func (h *Handler) apiStats(w http.ResponseWriter, r *http.Request) {
	st, err := h.c.Stats(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, statsView(st))
}

func (h *Handler) apiTasks(w http.ResponseWriter, r *http.Request) {
	f, err := filter(r, h.cfg.pageSize)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if l := r.URL.Query().Get("limit"); l != "" {
		f.Limit = -1 // rejected by List unless it parses in range
		if n, err := parseLimit(l); err == nil {
			f.Limit = n
		}
	}
	ts, next, err := h.c.List(r.Context(), f)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	out := TaskList{Tasks: []TaskView{}, Next: next}
	for _, t := range ts {
		out.Tasks = append(out.Tasks, taskView(t))
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) apiTask(w http.ResponseWriter, r *http.Request) {
	rep, err := h.detail(r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, TaskDetail{Task: taskView(rep.Task), Wait: waitView(rep), Live: rep.LiveWorkers})
}

func (h *Handler) apiCancel(w http.ResponseWriter, r *http.Request) {
	id, err := taskID(r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if !h.cancelAllowed(r, true) {
		h.fail(w, r, errForbidden)
		return
	}
	if err := h.c.Cancel(r.Context(), id); err != nil {
		h.fail(w, r, err)
		return
	}
	t, err := h.c.Get(r.Context(), id)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, taskView(t))
}

func (h *Handler) apiWorkers(w http.ResponseWriter, r *http.Request) {
	ws, err := h.c.Workers(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, workerViews(ws))
}
