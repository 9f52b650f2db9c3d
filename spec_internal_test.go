package tasking

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestMarshalArgsSizeBoundary: args of exactly MaxArgsSize bytes pass, one
// byte more is refused. Pure validation, so the 32 MiB never travel to
// PostgreSQL.
func TestMarshalArgsSizeBoundary(t *testing.T) {
	t.Parallel()
	at := json.RawMessage(`"` + strings.Repeat("x", MaxArgsSize-2) + `"`)
	b, err := marshalArgs(at)
	require.NoError(t, err)
	require.Len(t, b, MaxArgsSize)

	over := append(at[:len(at)-1:len(at)-1], 'x', '"')
	_, err = marshalArgs(over)
	require.ErrorIs(t, err, ErrInvalidInput)
	require.Contains(t, err.Error(), "33554433 bytes")
}
