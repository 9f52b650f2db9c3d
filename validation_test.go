package tasking_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/tasking-go/tasking"
	"github.com/tasking-go/tasking/internal/testdb"
)

// vEnv is a migrated client together with the pool and schema under it, so
// a test can count what actually reached the database.
type vEnv struct {
	c      *tasking.Client
	pool   *pgxpool.Pool
	schema string
}

func newVEnv(t *testing.T, opts ...tasking.Option) *vEnv {
	t.Helper()
	pool := testdb.Pool(t, 8)
	schema := testdb.Schema(t, pool)
	opts = append([]tasking.Option{tasking.WithSchema(schema), tasking.WithLogger(quietLogger())}, opts...)
	c, err := tasking.New(pool, opts...)
	require.NoError(t, err)
	require.NoError(t, c.Migrate(ctxT(t, 30*time.Second)))
	return &vEnv{c: c, pool: pool, schema: schema}
}

// rows counts the rows of one of the schema's tables.
func (e *vEnv) rows(t *testing.T, table string) int {
	t.Helper()
	var n int
	err := e.pool.QueryRow(ctxT(t, 10*time.Second),
		"SELECT count(*) FROM "+pgx.Identifier{e.schema, table}.Sanitize()).Scan(&n)
	require.NoError(t, err)
	return n
}

// requireInputError checks that err is an *InputError about field whose text
// contains every one of words.
func requireInputError(t *testing.T, err error, field string, words ...string) {
	t.Helper()
	require.Error(t, err)
	require.ErrorIs(t, err, tasking.ErrInvalidInput, "error: %v", err)
	var ie *tasking.InputError
	require.ErrorAs(t, err, &ie)
	require.Equal(t, field, ie.Field, "error: %v", err)
	require.Contains(t, err.Error(), field)
	for _, w := range words {
		require.Contains(t, err.Error(), w)
	}
}

// names returns n distinct resource names with prefix p.
func names(p string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%03d", p, i)
	}
	return out
}

type failingMarshaler struct{}

func (failingMarshaler) MarshalJSON() ([]byte, error) {
	return nil, errors.New("boom from MarshalJSON")
}

func TestNewValidation(t *testing.T) {
	t.Parallel()
	c, err := tasking.New(nil)
	require.Nil(t, c)
	requireInputError(t, err, "pool", "nil")

	pool := testdb.Pool(t, 2)
	for _, s := range []string{"", strings.Repeat("s", 64), "a\x00b", "a\xffb"} {
		c, err := tasking.New(pool, tasking.WithSchema(s))
		require.Nil(t, c)
		requireInputError(t, err, "schema")
	}
}

// TestNewSchemaNames: New refuses a schema name Migrate could not use (a '
// or $$ ends a quote inside the migrations) or that is merely odd, before
// anything is created; every name it accepts migrates.
func TestNewSchemaNames(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 2)
	ctx := ctxT(t, 60*time.Second)
	for _, s := range []string{"a'b", "a$$b", "a$b", `a"b`, "a b", "a-b", "a.b", "a;b", `a\b`, "é", "1abc", "pg_tasks", "a\nb"} {
		c, err := tasking.New(pool, tasking.WithSchema(s))
		require.Nil(t, c, "schema %q", s)
		requireInputError(t, err, "schema", fmt.Sprintf("%q", s))
	}
	base := testdb.Schema(t, pool) // dropped at the end; the others below too
	longest := base + "_" + strings.Repeat("9", 62-len(base))
	require.Len(t, longest, 63)
	for _, s := range []string{base, "T" + base[1:], longest} {
		if s != base {
			t.Cleanup(func() {
				_, _ = pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+pgx.Identifier{s}.Sanitize()+" CASCADE")
			})
		}
		c, err := tasking.New(pool, tasking.WithSchema(s), tasking.WithLogger(quietLogger()))
		require.NoError(t, err, "schema %q", s)
		require.NoError(t, c.Migrate(ctx), "schema %q", s)
		_, err = c.Dispatch(ctx, "t", nil, tasking.Exclusive("x"))
		require.NoError(t, err, "schema %q", s)
	}
}

// TestValidationDispatch feeds Dispatch, DispatchMany and DispatchManyTx
// every kind of bad input: each is rejected with an error that names the
// problem, and nothing reaches the tasks table.
func TestValidationDispatch(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 60*time.Second)
	long := func(n int) string { return strings.Repeat("r", n) }
	tooMany := names("r", tasking.MaxResources+1)
	one := func(name string, args any, opts ...tasking.DispatchOption) func() error {
		return func() error { _, err := e.c.Dispatch(ctx, name, args, opts...); return err }
	}
	cases := []struct {
		name  string
		call  func() error
		field string
		words []string
	}{
		{"empty task name", one("", nil), "task name", []string{"empty"}},
		{"task name too long", one(strings.Repeat("n", tasking.MaxTaskNameLen+1), nil),
			"task name", []string{"256 bytes", "at most 255"}},
		{"task name with NUL", one("a\x00b", nil), "task name", []string{"NUL"}},
		{"task name not UTF-8", one("a\xffb", nil), "task name", []string{"UTF-8"}},
		{"args chan", one("t", make(chan int)), "args", []string{"marshal", "chan int"}},
		{"args func", one("t", func() {}), "args", []string{"marshal", "func()"}},
		{"args +Inf", one("t", math.Inf(1)), "args", []string{"marshal", "+Inf"}},
		{"args NaN in a struct", one("t", struct{ F float64 }{math.NaN()}), "args", []string{"marshal", "NaN"}},
		{"args chan field", one("t", struct{ C chan int }{}), "args", []string{"marshal", "chan int"}},
		{"args MarshalJSON fails", one("t", failingMarshaler{}), "args", []string{"marshal", "boom from MarshalJSON"}},
		{"raw args truncated", one("t", json.RawMessage(`{"a":`)), "args", []string{"not valid JSON"}},
		{"raw args garbage", one("t", json.RawMessage(`hello`)), "args", []string{"not valid JSON"}},
		{"raw []byte args", one("t", []byte(`{"a":1}{"b":2}`)), "args", []string{"not valid JSON"}},
		{"empty exclusive resource", one("t", nil, tasking.Exclusive("a", "")), "resource name", []string{"empty"}},
		{"empty shared resource", one("t", nil, tasking.Shared("")), "resource name", []string{"empty"}},
		{"exclusive resource too long", one("t", nil, tasking.Exclusive(long(tasking.MaxResourceNameLen+1))),
			"resource name", []string{"1025 bytes", "at most 1024"}},
		{"shared resource too long", one("t", nil, tasking.Shared(long(tasking.MaxResourceNameLen+1))),
			"resource name", []string{"1025 bytes", "at most 1024"}},
		{"resource with NUL", one("t", nil, tasking.Shared("a\x00")), "resource name", []string{"NUL"}},
		{"resource not UTF-8", one("t", nil, tasking.Exclusive("\xc3\x28")), "resource name", []string{"UTF-8"}},
		{"too many exclusive", one("t", nil, tasking.Exclusive(tooMany...)),
			"resources", []string{"129 distinct names", "at most 128"}},
		{"too many across modes", one("t", nil, tasking.Exclusive(tooMany[:65]...), tasking.Shared(tooMany[65:]...)),
			"resources", []string{"129 distinct names", "at most 128"}},
		{"third of a batch bad", func() error {
			_, err := e.c.DispatchMany(ctx,
				tasking.Spec("ok1", nil, tasking.Exclusive("x")),
				tasking.Spec("ok2", map[string]int{"n": 1}, tasking.Shared("y")),
				tasking.Spec("bad", nil, tasking.Exclusive("x"), tasking.Shared("")),
				tasking.Spec("ok4", nil))
			return err
		}, "resource name", []string{"empty"}},
		{"empty batch", func() error { _, err := e.c.DispatchMany(ctx); return err }, "batch", []string{"no tasks"}},
		{"DispatchManyTx nil tx", func() error {
			_, err := e.c.DispatchManyTx(ctx, nil, tasking.Spec("t", nil))
			return err
		}, "transaction", []string{"nil pgx.Tx"}},
		{"DispatchTx nil tx", func() error {
			_, err := e.c.DispatchTx(ctx, nil, "t", nil)
			return err
		}, "transaction", []string{"nil pgx.Tx"}},
		{"DispatchManyTx empty batch", func() error {
			tx, err := e.pool.Begin(ctx)
			require.NoError(t, err)
			_, err = e.c.DispatchManyTx(ctx, tx)
			require.NoError(t, tx.Commit(ctx))
			return err
		}, "batch", []string{"no tasks"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			requireInputError(t, err, tc.field, tc.words...)
			require.Zero(t, e.rows(t, "tasks"), "a rejected dispatch wrote a task")
		})
	}
	page, _, err := e.c.List(ctx, tasking.ListFilter{})
	require.NoError(t, err)
	require.Empty(t, page)
}

// TestValidationArgsPostgresRejects covers args that pass the Go-side checks
// (json.Marshal succeeds, json.Valid says yes) but that PostgreSQL's jsonb
// refuses. They must be rejected as bad input before the round trip:
// today they come back as a raw SQLSTATE error, and in DispatchTx they also
// abort the caller's transaction.
func TestValidationArgsPostgresRejects(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)
	cases := []struct {
		name string
		args any
	}{
		// json.Marshal writes "\u0000"; jsonb cannot store that code point.
		{"string with NUL", map[string]string{"path": "a\x00b"}},
		{"raw JSON with \\u0000", json.RawMessage(`{"a":"\u0000"}`)},
		// json.Valid does not check UTF-8 or surrogate pairs; jsonb does.
		{"raw JSON with invalid UTF-8", json.RawMessage("\"\xff\"")},
		{"raw JSON with a lone surrogate", json.RawMessage(`["\ud800"]`)},
		// Valid JSON, but beyond the range of PostgreSQL's numeric.
		{"raw JSON number out of range", json.RawMessage(`1e1000000`)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.c.Dispatch(ctx, "t", tc.args)
			require.ErrorIs(t, err, tasking.ErrInvalidInput, "got: %v", err)
			require.Contains(t, err.Error(), "args")
			require.Zero(t, e.rows(t, "tasks"))

			// Rejected input must leave the caller's transaction usable.
			tx, err := e.pool.Begin(ctx)
			require.NoError(t, err)
			defer func() { _ = tx.Rollback(ctx) }()
			_, err = e.c.DispatchTx(ctx, tx, "t", tc.args)
			require.ErrorIs(t, err, tasking.ErrInvalidInput, "got: %v", err)
			_, err = tx.Exec(ctx, "SELECT 1")
			require.NoError(t, err, "bad args aborted the caller's transaction")
		})
	}
}

// TestValidationArgsTooLarge: args over MaxArgsSize are refused before
// anything is sent, and the caller's transaction stays usable. Without the
// check PostgreSQL takes seconds to refuse a value over jsonb's ~255 MiB
// (SQLSTATE 54000) and aborts the transaction.
func TestValidationArgsTooLarge(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 60*time.Second)

	// The case from the field: a string jsonb cannot hold at all (its
	// strings stop at 2^28-1 bytes). Raw, so the test does not spend its
	// time in json.Marshal.
	huge := json.RawMessage(`{"blob":"` + strings.Repeat("x", 256<<20) + `"}`)
	_, err := e.c.Dispatch(ctx, "t", huge)
	requireInputError(t, err, "args", fmt.Sprint(len(huge)), "at most 33554432", "MaxArgsSize")
	huge = nil

	// One byte over the limit, inside the caller's transaction.
	over := json.RawMessage(`"` + strings.Repeat("x", tasking.MaxArgsSize-1) + `"`)
	tx, err := e.pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctx) }()
	_, err = e.c.DispatchTx(ctx, tx, "t", over)
	requireInputError(t, err, "args", "33554433 bytes")
	_, err = tx.Exec(ctx, "SELECT 1")
	require.NoError(t, err, "oversized args aborted the caller's transaction")

	// In a batch, as []byte: none of the batch is stored.
	_, err = e.c.DispatchMany(ctx, tasking.Spec("ok", nil), tasking.Spec("t", []byte(over)))
	requireInputError(t, err, "args", "33554433 bytes")
	require.Zero(t, e.rows(t, "tasks"))
}

// TestMaxArgsSizeFitsJsonb: every JSON text of MaxArgsSize bytes fits in
// jsonb, whose containers hold at most 2^28-1 bytes. JSON grows most on the
// way into jsonb as arrays of tiny values (about six times for one-digit
// numbers); jsonb's size is linear in the element count, so a sample of
// each shape, scaled up, bounds the worst case without moving 200 MiB.
func TestMaxArgsSizeFitsJsonb(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 1)
	ctx := ctxT(t, 60*time.Second)
	const sample = 64 << 10
	const jsonbMax = 1<<28 - 1
	for _, elem := range []string{"1", "0", "[]", "{}", "[1]", `""`, "true", "null", "1.5", "-1"} {
		text := "[" + strings.Repeat(elem+",", sample/(len(elem)+1)) + elem + "]"
		var size int64
		require.NoError(t, pool.QueryRow(ctx, "SELECT pg_column_size($1::text::jsonb)", text).Scan(&size))
		worst := size * tasking.MaxArgsSize / int64(len(text))
		require.Less(t, worst, int64(jsonbMax),
			"%d bytes of [%s,%s,...] would become about %d bytes of jsonb", tasking.MaxArgsSize, elem, elem, worst)
	}
}

// TestValidationLimitsAccepted: input right at the limits is stored as given.
func TestValidationLimitsAccepted(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)

	name := strings.Repeat("n", tasking.MaxTaskNameLen)
	kib := strings.Repeat("k", tasking.MaxResourceNameLen) // 1 KiB
	require.Len(t, kib, 1024)
	task, err := e.c.Dispatch(ctx, name, json.RawMessage(`{"ok":true}`), tasking.Exclusive(kib), tasking.Shared("é"))
	require.NoError(t, err)
	got, err := e.c.Get(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, name, got.Name)
	require.Equal(t, []string{kib}, got.Exclusive)
	require.Equal(t, []string{"é"}, got.Shared)
	require.JSONEq(t, `{"ok":true}`, string(got.Args))

	// Exactly MaxResources distinct names, and one more that is a duplicate.
	max := names("m", tasking.MaxResources)
	task, err = e.c.Dispatch(ctx, "t", nil, tasking.Exclusive(max[:100]...), tasking.Shared(append(max[100:], max[0])...))
	require.NoError(t, err)
	require.Len(t, task.Exclusive, 100)
	require.Len(t, task.Shared, tasking.MaxResources-100)
	got, err = e.c.Get(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, task.Exclusive, got.Exclusive)
	require.Equal(t, task.Shared, got.Shared)
	require.JSONEq(t, `{}`, string(got.Args), "nil args are stored as {}")
	require.Equal(t, 2, e.rows(t, "tasks"))
}

// TestValidationNormalisesResources: duplicates are dropped and a name given
// in both modes becomes exclusive, in the returned Task and in the stored row.
func TestValidationNormalisesResources(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)
	task, err := e.c.Dispatch(ctx, "t", nil,
		tasking.Exclusive("z", "x", "x"), tasking.Shared("y", "x", "y", "w"), tasking.Exclusive("w"))
	require.NoError(t, err)
	require.Equal(t, []string{"w", "x", "z"}, task.Exclusive)
	require.Equal(t, []string{"y"}, task.Shared)
	got, err := e.c.Get(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, []string{"w", "x", "z"}, got.Exclusive)
	require.Equal(t, []string{"y"}, got.Shared)
	require.Equal(t, tasking.StateWaiting, got.State)

	ts, err := e.c.DispatchMany(ctx,
		tasking.Spec("a", nil, tasking.Shared("s", "s")),
		tasking.Spec("b", nil, tasking.Shared("s"), tasking.Exclusive("s")))
	require.NoError(t, err)
	require.Equal(t, []string{}, ts[0].Exclusive)
	require.Equal(t, []string{"s"}, ts[0].Shared)
	require.Equal(t, []string{"s"}, ts[1].Exclusive)
	require.Equal(t, []string{}, ts[1].Shared)
	for _, want := range ts {
		got, err := e.c.Get(ctx, want.ID)
		require.NoError(t, err)
		require.Equal(t, want.Exclusive, got.Exclusive)
		require.Equal(t, want.Shared, got.Shared)
	}
}

func TestValidationGetAndList(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)

	_, err := e.c.Get(ctx, 424242)
	require.ErrorIs(t, err, tasking.ErrNotFound)
	require.Contains(t, err.Error(), "424242")

	for _, limit := range []int{-1, 10001} {
		_, _, err := e.c.List(ctx, tasking.ListFilter{Limit: limit})
		requireInputError(t, err, "limit", fmt.Sprint(limit))
	}
	_, _, err = e.c.List(ctx, tasking.ListFilter{State: "bogus"})
	requireInputError(t, err, "state", `"bogus"`)
	// Text filters are checked as Dispatch checks the names they match.
	for _, tc := range []struct {
		f     tasking.ListFilter
		field string
		words string
	}{
		{tasking.ListFilter{Name: "a\x00b"}, "task name", "NUL"},
		{tasking.ListFilter{Name: "a\xffb"}, "task name", "UTF-8"},
		{tasking.ListFilter{Name: strings.Repeat("n", tasking.MaxTaskNameLen+1)}, "task name", "at most 255"},
		{tasking.ListFilter{Resource: "r\x00"}, "resource name", "NUL"},
		{tasking.ListFilter{Resource: "\xc3\x28"}, "resource name", "UTF-8"},
		{tasking.ListFilter{Resource: strings.Repeat("r", tasking.MaxResourceNameLen+1)}, "resource name", "at most 1024"},
	} {
		_, _, err = e.c.List(ctx, tc.f)
		requireInputError(t, err, tc.field, tc.words)
	}
	_, _, err = e.c.List(ctx, tasking.ListFilter{Limit: 10000, State: tasking.StateWaiting})
	require.NoError(t, err)
}

// TestValidationNotMigrated: a schema that does not exist, or exists without
// tasking's tables, fails every call with ErrNotMigrated naming the schema,
// and nothing is created behind the caller's back.
func TestValidationNotMigrated(t *testing.T) {
	t.Parallel()
	pool := testdb.Pool(t, 4)
	ctx := ctxT(t, 30*time.Second)
	missing := testdb.Schema(t, pool)
	empty := testdb.Schema(t, pool)
	_, err := pool.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{empty}.Sanitize())
	require.NoError(t, err)

	for _, schema := range []string{missing, empty} {
		c, err := tasking.New(pool, tasking.WithSchema(schema), tasking.WithLogger(quietLogger()))
		require.NoError(t, err)
		check := func(what string, err error) {
			t.Helper()
			require.ErrorIs(t, err, tasking.ErrNotMigrated, what)
			require.Contains(t, err.Error(), schema, what+": the error must say which schema")
		}
		_, err = c.Dispatch(ctx, "t", nil, tasking.Exclusive("x"))
		check("Dispatch", err)
		_, err = c.Get(ctx, 1)
		check("Get", err)
		_, _, err = c.List(ctx, tasking.ListFilter{})
		check("List", err)
		_, err = c.Wait(ctx, 1)
		check("Wait", err)
		w := tasking.NewWorker(c)
		w.Handle("t", func(context.Context, *tasking.Task) error { return nil })
		check("Worker.Run", w.Run(ctx))

		var tables int
		require.NoError(t, pool.QueryRow(ctx,
			"SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema).Scan(&tables))
		require.Zero(t, tables, "a failed call created tables in %s", schema)
	}
	var exists bool
	require.NoError(t, pool.QueryRow(ctx,
		"SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", missing).Scan(&exists))
	require.False(t, exists, "a failed call created schema %s", missing)
}

// TestValidationSchemaTooNew: a schema migrated by a newer release is
// refused by every call, including Migrate, and left untouched.
func TestValidationSchemaTooNew(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)
	_, err := e.pool.Exec(ctx, "UPDATE "+pgx.Identifier{e.schema, "schema_version"}.Sanitize()+" SET version = 999")
	require.NoError(t, err)

	// A fresh client: e.c has already seen the schema match and remembers it.
	c, err := tasking.New(e.pool, tasking.WithSchema(e.schema), tasking.WithLogger(quietLogger()))
	require.NoError(t, err)
	check := func(what string, err error) {
		t.Helper()
		require.ErrorIs(t, err, tasking.ErrSchemaTooNew, what)
		require.Contains(t, err.Error(), e.schema, what+": the error must say which schema")
		require.Contains(t, err.Error(), "999", what+": the error must say which version")
	}
	_, err = c.Dispatch(ctx, "t", nil)
	check("Dispatch", err)
	_, err = c.Get(ctx, 1)
	check("Get", err)
	w := tasking.NewWorker(c)
	w.Handle("t", func(context.Context, *tasking.Task) error { return nil })
	check("Worker.Run", w.Run(ctx))
	check("Migrate", c.Migrate(ctx))

	require.Zero(t, e.rows(t, "tasks"))
	require.Zero(t, e.rows(t, "workers"))
	var v int
	require.NoError(t, e.pool.QueryRow(ctx,
		"SELECT max(version) FROM "+pgx.Identifier{e.schema, "schema_version"}.Sanitize()).Scan(&v))
	require.Equal(t, 999, v, "Migrate must not downgrade a newer schema")
}

// TestValidationWorker: Run refuses a worker without handlers or with bad
// options before it registers anything.
func TestValidationWorker(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)
	noop := func(context.Context, *tasking.Task) error { return nil }

	err := tasking.NewWorker(e.c).Run(ctx)
	require.ErrorIs(t, err, tasking.ErrNoHandlers)
	require.Contains(t, err.Error(), "no handlers")

	cases := []struct {
		opt   tasking.WorkerOption
		field string
	}{
		{tasking.WithSlots(0), "slots"},
		{tasking.WithSlots(-3), "slots"},
		{tasking.WithPollInterval(0), "poll interval"},
		{tasking.WithShutdownGrace(-time.Second), "shutdown grace"},
		{tasking.WithHeartbeatTTL(0), "heartbeat TTL"},
		{tasking.WithWorkerName(""), "worker name"},
	}
	for _, tc := range cases {
		w := tasking.NewWorker(e.c, tc.opt)
		w.Handle("t", noop)
		requireInputError(t, w.Run(ctx), tc.field)
		require.Zero(t, w.ID())
	}
	require.Zero(t, e.rows(t, "workers"), "a refused worker registered itself")
}

// panicText runs f and returns what it panicked with, as text.
func panicText(t *testing.T, f func()) (msg string) {
	t.Helper()
	defer func() {
		v := recover()
		require.NotNil(t, v, "expected a panic")
		msg = fmt.Sprint(v)
	}()
	f()
	return ""
}

func TestValidationHandlePanics(t *testing.T) {
	t.Parallel()
	c, err := tasking.New(testdb.Pool(t, 1), tasking.WithLogger(quietLogger()))
	require.NoError(t, err)
	noop := func(context.Context, *tasking.Task) error { return nil }
	w := tasking.NewWorker(c)

	require.Contains(t, panicText(t, func() { w.Handle("", noop) }), "task name")
	require.Contains(t, panicText(t, func() { w.Handle("a\x00", noop) }), "NUL")
	require.Contains(t, panicText(t, func() { w.Handle(strings.Repeat("n", 256), noop) }), "at most 255")
	require.Contains(t, panicText(t, func() {
		tasking.HandleFunc(w, "", func(context.Context, struct{}) error { return nil })
	}), "task name")
	msg := panicText(t, func() { w.Handle("sync", nil) })
	require.Contains(t, msg, "nil handler")
	require.Contains(t, msg, "sync")

	w.Handle("sync", noop)
	msg = panicText(t, func() { w.Handle("sync", noop) })
	require.Contains(t, msg, "registered twice")
	require.Contains(t, msg, "sync")
	msg = panicText(t, func() {
		tasking.HandleFunc(w, "sync", func(context.Context, struct{}) error { return nil })
	})
	require.Contains(t, msg, "registered twice")
}

// TestDispatchTxExistsIffCommitted: a task dispatched in the caller's
// transaction exists exactly when the caller commits; a rolled-back one is
// never seen or run, even by a worker that is watching.
func TestDispatchTxExistsIffCommitted(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)

	var mu sync.Mutex
	ran := map[int64]bool{}
	w := tasking.NewWorker(e.c, tasking.WithSlots(2), tasking.WithPollInterval(50*time.Millisecond))
	w.Handle("t", func(ctx context.Context, task *tasking.Task) error {
		mu.Lock()
		ran[task.ID] = true
		mu.Unlock()
		return nil
	})
	runWorker(t, w)

	// Rolled back: gone for good.
	tx, err := e.pool.Begin(ctx)
	require.NoError(t, err)
	rolled, err := e.c.DispatchTx(ctx, tx, "t", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	var inTx int
	require.NoError(t, tx.QueryRow(ctx, "SELECT count(*) FROM "+pgx.Identifier{e.schema, "tasks"}.Sanitize()+
		" WHERE id = $1", rolled.ID).Scan(&inTx))
	require.Equal(t, 1, inTx, "the task is visible inside the transaction")
	_, err = e.c.Get(ctx, rolled.ID)
	require.ErrorIs(t, err, tasking.ErrNotFound, "visible outside before commit")
	require.NoError(t, tx.Rollback(ctx))
	_, err = e.c.Get(ctx, rolled.ID)
	require.ErrorIs(t, err, tasking.ErrNotFound, "visible after rollback")

	// A batch in a transaction, rolled back: none of it.
	tx, err = e.pool.Begin(ctx)
	require.NoError(t, err)
	batch, err := e.c.DispatchManyTx(ctx, tx, tasking.Spec("t", nil), tasking.Spec("t", nil, tasking.Shared("x")))
	require.NoError(t, err)
	require.NoError(t, tx.Rollback(ctx))
	for _, b := range batch {
		_, err = e.c.Get(ctx, b.ID)
		require.ErrorIs(t, err, tasking.ErrNotFound)
	}

	// Committed: found, and run.
	tx, err = e.pool.Begin(ctx)
	require.NoError(t, err)
	kept, err := e.c.DispatchTx(ctx, tx, "t", map[string]int{"n": 1}, tasking.Exclusive("x"))
	require.NoError(t, err)
	require.NoError(t, tx.Commit(ctx))
	got, err := e.c.Get(ctx, kept.ID)
	require.NoError(t, err)
	require.Equal(t, []string{"x"}, got.Exclusive)
	require.JSONEq(t, `{"n":1}`, string(got.Args))
	done, err := e.c.Wait(ctx, kept.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, done.State, done.Error)

	require.Equal(t, 1, e.rows(t, "tasks"), "only the committed task exists")
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, map[int64]bool{kept.ID: true}, ran)
}

// TestUnhandledTaskKeepsItsPlace: a task no running worker handles stays
// waiting and keeps its place in line on its resources: a later conflicting
// task waits behind it even though a worker could run it, while a later
// non-conflicting task runs. Once a worker for it appears, both run in order.
func TestUnhandledTaskKeepsItsPlace(t *testing.T) {
	t.Parallel()
	e := newVEnv(t)
	ctx := ctxT(t, 30*time.Second)

	var mu sync.Mutex
	ran := map[int64]bool{}
	record := func(ctx context.Context, task *tasking.Task) error {
		mu.Lock()
		ran[task.ID] = true
		mu.Unlock()
		return nil
	}
	wb := tasking.NewWorker(e.c, tasking.WithSlots(4), tasking.WithWorkerName("only-b"),
		tasking.WithPollInterval(50*time.Millisecond))
	wb.Handle("b", record)
	runWorker(t, wb)

	a, err := e.c.Dispatch(ctx, "a", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	bx, err := e.c.Dispatch(ctx, "b", nil, tasking.Exclusive("x"))
	require.NoError(t, err)
	by, err := e.c.Dispatch(ctx, "b", nil, tasking.Exclusive("y"))
	require.NoError(t, err)

	waitCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	got, err := e.c.Wait(waitCtx, by.ID)
	require.NoError(t, err, "the non-conflicting task behind the unhandled one must run")
	require.Equal(t, tasking.StateCompleted, got.State, got.Error)

	// One more handled task, dispatched after, completes: the worker has
	// been through at least one more admission since, and still held bx.
	bz, err := e.c.Dispatch(ctx, "b", nil, tasking.Shared("z"))
	require.NoError(t, err)
	got, err = e.c.Wait(waitCtx, bz.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, got.State, got.Error)

	for _, id := range []int64{a.ID, bx.ID} {
		got, err := e.c.Get(ctx, id)
		require.NoError(t, err)
		require.Equal(t, tasking.StateWaiting, got.State, "task %d (%s %v)", id, got.Name, got.Exclusive)
	}
	mu.Lock()
	require.False(t, ran[bx.ID], "b on x overtook the earlier unhandled a on x (P2)")
	require.False(t, ran[a.ID])
	mu.Unlock()

	// A worker for "a" appears: a runs, then b on x after it.
	wa := tasking.NewWorker(e.c, tasking.WithSlots(1), tasking.WithWorkerName("only-a"),
		tasking.WithPollInterval(50*time.Millisecond))
	wa.Handle("a", record)
	runWorker(t, wa)
	doneA, err := e.c.Wait(waitCtx, a.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, doneA.State, doneA.Error)
	doneBx, err := e.c.Wait(waitCtx, bx.ID)
	require.NoError(t, err)
	require.Equal(t, tasking.StateCompleted, doneBx.State, doneBx.Error)
	require.False(t, doneBx.StartedAt.Before(doneA.FinishedAt), "b on x started before a on x was final")
}
