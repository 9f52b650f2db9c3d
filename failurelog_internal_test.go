package tasking

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestFailureLogOnce: a failure that repeats (a heartbeat every TTL/3
// during an outage) is logged once, not on every attempt, and its recovery
// once.
func TestFailureLogOnce(t *testing.T) {
	var buf bytes.Buffer
	f := failureLog{log: slog.New(slog.NewTextHandler(&buf, nil)), what: "heartbeat"}
	for i := 0; i < 50; i++ {
		f.failed(errors.New("password authentication failed"))
	}
	f.ok()
	f.ok()
	out := buf.String()
	require.Equal(t, 1, strings.Count(out, "heartbeat failed"), out)
	require.Equal(t, 1, strings.Count(out, "heartbeat recovered"), out)
	require.Contains(t, out, "failures=50")
}
