package tasking

import "context"

// Parent and child tasks: a task dispatched with the context of a running
// handler records the handler's task as its parent, and joins its group
// unless its spec says otherwise (TaskSpec.Group). The handler passes
// nothing by hand: the context carries the task (TaskFromContext), and the
// schema's dispatch_related resolves the parent's group in the dispatching
// transaction.

// parentOf is the id of the task whose handler runs with ctx in this
// process, 0 if none or if that task lives in another schema.
func (c *Client) parentOf(ctx context.Context) int64 {
	if t := TaskFromContext(ctx); t != nil && t.live != nil && t.live.schema == c.schema {
		return t.ID
	}
	return 0
}
