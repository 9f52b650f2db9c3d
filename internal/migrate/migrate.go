// Package migrate applies tasking's embedded, versioned SQL migrations.
//
// Each file sql/NNN_name.sql is one version. Files refer to the schema as
// {{schema}}, replaced by the quoted schema name, so one set of migrations
// serves any schema (and to {{seed}}, see expand). Migrate runs every missing version in one transaction,
// under a transaction-scoped advisory lock so that concurrent callers apply
// each version once.
package migrate

import (
	"context"
	"crypto/sha256"
	"embed"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

//go:embed sql/*.sql
var files embed.FS

// Migration is one schema version.
type Migration struct {
	Version int
	Name    string
	SQL     string // with {{schema}} placeholders
}

// All returns the migrations in version order.
func All() []Migration {
	entries, err := fs.ReadDir(files, "sql")
	if err != nil {
		panic(err) // embedded: cannot fail
	}
	var ms []Migration
	for _, e := range entries {
		num, name, ok := strings.Cut(strings.TrimSuffix(e.Name(), ".sql"), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			panic("migrate: bad migration file name " + e.Name())
		}
		b, _ := files.ReadFile("sql/" + e.Name())
		ms = append(ms, Migration{Version: v, Name: name, SQL: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].Version < ms[j].Version })
	return ms
}

// Latest is the version the code expects.
func Latest() int {
	ms := All()
	return ms[len(ms)-1].Version
}

// Beginner is what Migrate needs: a pool or a connection.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// Querier runs one query.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// lockKey serialises concurrent Migrate calls (any schema; migrations are rare).
const lockKey = 0x7461736b696e67 // "tasking"

// Migrate brings schema up to Latest. It returns the version before and after.
func Migrate(ctx context.Context, db Beginner, schema string) (from, to int, err error) {
	q := pgx.Identifier{schema}.Sanitize()
	tx, err := db.Begin(ctx)
	if err != nil {
		return 0, 0, err
	}
	defer func() { _ = tx.Rollback(ctx) }()
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(lockKey)); err != nil {
		return 0, 0, err
	}
	if _, err := tx.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+q); err != nil {
		return 0, 0, fmt.Errorf("create schema %s: %w", q, err)
	}
	if _, err := tx.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+q+".schema_version (version integer NOT NULL)"); err != nil {
		return 0, 0, err
	}
	var cur int
	err = tx.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM "+q+".schema_version").Scan(&cur)
	if err != nil {
		return 0, 0, err
	}
	latest := Latest()
	if cur > latest {
		return cur, cur, &TooNewError{Schema: schema, Have: cur, Want: latest}
	}
	for _, m := range All() {
		if m.Version <= cur {
			continue
		}
		if _, err := tx.Exec(ctx, expand(m.SQL, schema)); err != nil {
			return cur, cur, fmt.Errorf("migration %03d_%s: %w", m.Version, m.Name, err)
		}
	}
	if latest > cur {
		if _, err := tx.Exec(ctx, "DELETE FROM "+q+".schema_version"); err != nil {
			return cur, cur, err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO "+q+".schema_version (version) VALUES ($1)", latest); err != nil {
			return cur, cur, err
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return cur, cur, err
	}
	return cur, latest, nil
}

// expand fills in a migration's placeholders: {{schema}}, the quoted schema
// name, and {{seed}}, a 64-bit number derived from it (the seed of the
// schema's advisory-lock keys, so that two schemas in one database do not
// share keys).
func expand(sql, schema string) string {
	sum := sha256.Sum256([]byte("tasking/seed/" + schema))
	seed := int64(binary.BigEndian.Uint64(sum[:8]))
	return strings.NewReplacer("{{schema}}", pgx.Identifier{schema}.Sanitize(),
		"{{seed}}", strconv.FormatInt(seed, 10)).Replace(sql)
}

// TooNewError says the schema was migrated by a newer release.
type TooNewError struct {
	Schema     string
	Have, Want int
}

func (e *TooNewError) Error() string {
	return fmt.Sprintf("schema %q is at version %d, newer than this release's %d", e.Schema, e.Have, e.Want)
}

// ErrNotMigrated says the schema or its version table does not exist.
var ErrNotMigrated = errors.New("schema not migrated")

// Version reads the schema's version. It returns ErrNotMigrated (wrapped) when
// the schema has no version table.
func Version(ctx context.Context, db Querier, schema string) (int, error) {
	q := pgx.Identifier{schema}.Sanitize()
	var v int
	err := db.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM "+q+".schema_version").Scan(&v)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && (pgErr.Code == "42P01" || pgErr.Code == "3F000") {
		return 0, ErrNotMigrated
	}
	if err != nil {
		return 0, err
	}
	if v == 0 {
		return 0, ErrNotMigrated
	}
	return v, nil
}
