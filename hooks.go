package tasking

import (
	"context"
	"errors"
	"fmt"
)

// Middleware wraps a handler: it gets the next handler (another middleware
// or the task's own handler) and returns one that runs around it, seeing
// the task and the context, and the error (or panic) coming back. Use it
// for your own tracing, logging, metrics or panic policy:
//
//	logTasks := func(next tasking.HandlerFunc) tasking.HandlerFunc {
//		return func(ctx context.Context, t *tasking.Task) error {
//			err := next(ctx, t)
//			slog.Info("task ran", "id", t.ID, "name", t.Name, "err", err)
//			return err
//		}
//	}
//	w := tasking.NewWorker(client, tasking.WithMiddleware(logTasks))
//
// A panic that no middleware recovers fails the task as one in the handler
// does ([ErrPanic]).
type Middleware func(next HandlerFunc) HandlerFunc

// WithMiddleware wraps every handler of the worker in mw, in order: the
// first given is the outermost, so it sees the task first and the outcome
// last. Several WithMiddleware options add up in the order given.
// Default: none.
func WithMiddleware(mw ...Middleware) WorkerOption {
	return func(c *workerConfig) {
		for _, m := range mw {
			if m != nil {
				c.middleware = append(c.middleware, m)
			}
		}
	}
}

// ErrorHandler is told about a task that failed on this worker: its handler
// returned an error or panicked, or its run was cut off (timeout, locks
// lost, worker lost, shutdown, a handler abandoned at shutdown). err is the
// handler's own error, a [*PanicError] for a panic, or the library's reason
// ([ErrTimeout], [ErrLockLost], [ErrWorkerLost], [ErrShutdown],
// [ErrHandlersAbandoned]). It is not called for a canceled task: a cancel is
// not a failure.
//
// ctx carries the handler's values (the task, a trace span a middleware
// put there) but is not canceled. The call is made before the task's final
// state is written, from the goroutine that ran the handler, so the task's
// slot stays busy until it returns: keep it short. A panic in it is
// recovered and logged.
type ErrorHandler func(ctx context.Context, t *Task, err error)

// WithErrorHandler sets the function told about every task that fails on
// this worker, and why. Default: none (failures are only stored, in
// [Task.Error]).
func WithErrorHandler(fn ErrorHandler) WorkerOption {
	return func(c *workerConfig) { c.onError = fn }
}

// PanicError is what a handler's panic becomes: the error an [ErrorHandler]
// and middleware around the panicking one are given. errors.Is(err,
// ErrPanic) matches it. Its text, the task's stored reason, starts with
// "panic: ", then the value and the stack.
type PanicError struct {
	Value any    // what was passed to panic
	Stack []byte // the panicking goroutine's stack
}

func (e *PanicError) Error() string { return fmt.Sprintf("panic: %v\n%s", e.Value, e.Stack) }

// Is makes errors.Is(err, ErrPanic) true.
func (e *PanicError) Is(target error) bool { return target == ErrPanic }

// Unwrap returns the panic value when it is an error (panic(err)).
func (e *PanicError) Unwrap() error {
	err, _ := e.Value.(error)
	return err
}

// chain wraps fn in the worker's middleware, the first outermost.
func chain(fn HandlerFunc, mw []Middleware) HandlerFunc {
	for i := len(mw) - 1; i >= 0; i-- {
		fn = mw[i](fn)
	}
	return fn
}

// failed calls the worker's error handler, if any, for a task that ends
// failed with err. Canceled tasks are not failures.
func (r *run) failed(ctx context.Context, t *Task, err error) {
	fn := r.w.cfg.onError
	if fn == nil || err == nil || errors.Is(err, ErrCanceled) {
		return
	}
	defer func() {
		if v := recover(); v != nil {
			r.log.Error("tasking: error handler panicked", "task", t.ID, "name", t.Name, "panic", v)
		}
	}()
	fn(context.WithoutCancel(ctx), t, err)
}
