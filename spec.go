// Validation and normalisation of what a dispatch asks for: nothing that
// fails here is sent to the database.

package tasking

import (
	"encoding/json"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// preparedBatch is a validated, normalised batch ready for insert.
type preparedBatch struct {
	specs []TaskSpec // normalised names
	args  [][]byte
}

func prepareBatch(specs []TaskSpec) (*preparedBatch, error) {
	b := &preparedBatch{specs: make([]TaskSpec, len(specs)), args: make([][]byte, len(specs))}
	for i, s := range specs {
		if err := checkName("task name", s.Name, MaxTaskNameLen); err != nil {
			return nil, err
		}
		a, err := marshalArgs(s.Args)
		if err != nil {
			return nil, err
		}
		excl, shared, err := normalizeResources(s.Exclusive, s.Shared)
		if err != nil {
			return nil, err
		}
		if s.Timeout < 0 || (s.Timeout > 0 && s.Timeout < time.Millisecond) {
			return nil, inputErr("timeout", "%v, need at least 1ms (or 0 for none)", s.Timeout)
		}
		if s.Group < NoGroup {
			return nil, inputErr("group", "%d, need a group id, 0 (the parent's) or NoGroup", s.Group)
		}
		if s.Unique != "" || s.uniqueSet {
			if err := checkName("unique key", s.Unique, MaxResourceNameLen); err != nil {
				return nil, err
			}
		}
		if s.Retry != nil {
			if err := s.Retry.check(); err != nil {
				return nil, err
			}
		}
		b.specs[i] = TaskSpec{Name: s.Name, Exclusive: excl, Shared: shared, Timeout: s.Timeout, Group: s.Group,
			Unique: s.Unique, Retry: s.Retry, RunAt: s.RunAt}
		b.args[i] = a
	}
	return b, nil
}

func marshalArgs(args any) ([]byte, error) {
	var b []byte
	switch a := args.(type) {
	case nil:
		return []byte("{}"), nil
	case json.RawMessage:
		b = a
	case []byte:
		b = a
	default:
		var err error
		if b, err = json.Marshal(args); err != nil {
			return nil, inputErr("args", "do not marshal to JSON: %v", err)
		}
	}
	// Before anything reads the bytes: PostgreSQL would take seconds to
	// refuse them (SQLSTATE 54000), aborting the caller's transaction.
	if len(b) > MaxArgsSize {
		return nil, inputErr("args", "%d bytes of JSON, at most %d allowed (MaxArgsSize)", len(b), MaxArgsSize)
	}
	if !json.Valid(b) {
		return nil, inputErr("args", "raw args are not valid JSON")
	}
	if !utf8.Valid(b) {
		return nil, inputErr("args", "not valid UTF-8")
	}
	if err := checkJSONForPostgres(b); err != nil {
		return nil, err
	}
	return b, nil
}

// numericFits reports whether a JSON number fits PostgreSQL's numeric: at
// most 131072 digits before the decimal point and 16383 after.
func numericFits(num string) bool {
	mant, exp, _ := strings.Cut(strings.ToLower(num), "e")
	e, err := strconv.Atoi(exp)
	if exp == "" {
		e, err = 0, nil
	}
	if err != nil {
		return false // an exponent too long for an int is far out of range
	}
	intPart, frac, _ := strings.Cut(strings.TrimLeft(mant, "-"), ".")
	intDigits := len(strings.TrimLeft(intPart, "0"))
	if intDigits > 0 && intDigits+e > 131072 {
		return false
	}
	return len(frac)-e <= 16383
}

// checkJSONForPostgres rejects what JSON allows but PostgreSQL's jsonb cannot
// store: \u0000 and unpaired UTF-16 surrogates. b is valid JSON.
func checkJSONForPostgres(b []byte) error {
	hex4 := func(i int) (rune, bool) {
		if i+6 > len(b) || b[i] != '\\' || b[i+1] != 'u' {
			return 0, false
		}
		var r rune
		for _, c := range b[i+2 : i+6] {
			switch {
			case c >= '0' && c <= '9':
				r = r<<4 | rune(c-'0')
			case c >= 'a' && c <= 'f':
				r = r<<4 | rune(c-'a'+10)
			case c >= 'A' && c <= 'F':
				r = r<<4 | rune(c-'A'+10)
			}
		}
		return r, true
	}
	inString := false
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case !inString && (c == '-' || (c >= '0' && c <= '9')):
			n := i
			for n < len(b) && strings.IndexByte("+-0123456789.eE", b[n]) >= 0 {
				n++
			}
			if !numericFits(string(b[i:n])) {
				return inputErr("args", "contain the number %.40s, outside PostgreSQL's numeric range", b[i:n])
			}
			i = n - 1
		case c == '"':
			inString = !inString
		case c == '\\' && inString:
			r, ok := hex4(i)
			if !ok {
				i++ // a one-character escape
				continue
			}
			switch {
			case r == 0:
				return inputErr("args", "contain \\u0000, which PostgreSQL jsonb cannot store")
			case r >= 0xDC00 && r <= 0xDFFF:
				return inputErr("args", "contain an unpaired UTF-16 surrogate escape")
			case r >= 0xD800 && r <= 0xDBFF:
				low, ok := hex4(i + 6)
				if !ok || low < 0xDC00 || low > 0xDFFF {
					return inputErr("args", "contain an unpaired UTF-16 surrogate escape")
				}
				i += 6
			}
			i += 5
		}
	}
	return nil
}

// normalizeResources drops duplicates, makes a name given in both modes
// exclusive, and rejects bad names. The result is sorted.
func normalizeResources(exclusive, shared []string) ([]string, []string, error) {
	mode := make(map[string]bool, len(exclusive)+len(shared))
	for _, n := range exclusive {
		if err := checkName("resource name", n, MaxResourceNameLen); err != nil {
			return nil, nil, err
		}
		mode[n] = true
	}
	for _, n := range shared {
		if err := checkName("resource name", n, MaxResourceNameLen); err != nil {
			return nil, nil, err
		}
		if _, ok := mode[n]; !ok {
			mode[n] = false
		}
	}
	if len(mode) > MaxResources {
		return nil, nil, inputErr("resources", "%d distinct names, at most %d allowed", len(mode), MaxResources)
	}
	excl, sh := []string{}, []string{}
	for n, x := range mode {
		if x {
			excl = append(excl, n)
		} else {
			sh = append(sh, n)
		}
	}
	sort.Strings(excl)
	sort.Strings(sh)
	return excl, sh, nil
}

func checkName(field, s string, max int) error {
	switch {
	case s == "":
		return inputErr(field, "empty")
	case len(s) > max:
		return inputErr(field, "%d bytes, at most %d allowed", len(s), max)
	case !utf8.ValidString(s):
		return inputErr(field, "not valid UTF-8")
	case containsNUL(s):
		return inputErr(field, "contains a NUL byte")
	}
	return nil
}

func containsNUL(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return true
		}
	}
	return false
}

// checkSchemaName enforces WithSchema's rule. Quoting alone is not enough:
// the migrations put the quoted name inside string literals and $$-quoted
// function bodies, where a ' or $$ in it ends the quote.
func checkSchemaName(s string) error {
	if s == "" || len(s) > 63 {
		return inputErr("schema", "name must be 1 to 63 bytes, got %d", len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '_':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return inputErr("schema", "name %q: only ASCII letters, digits and underscores, not starting with a digit", s)
		}
	}
	if strings.HasPrefix(s, "pg_") {
		return inputErr("schema", "name %q: names starting with pg_ are reserved by PostgreSQL", s)
	}
	return nil
}

// checkListFilter checks List's text filters as Dispatch checks the names
// they match: a NUL byte or invalid UTF-8 would otherwise come back from
// PostgreSQL as a raw SQLSTATE 22021. Empty means "any".
func checkListFilter(f ListFilter) error {
	if f.Name != "" {
		if err := checkName("task name", f.Name, MaxTaskNameLen); err != nil {
			return err
		}
	}
	if f.Resource != "" {
		if err := checkName("resource name", f.Resource, MaxResourceNameLen); err != nil {
			return err
		}
	}
	if f.Parent < 0 || f.Group < 0 {
		return inputErr("filter", "parent %d and group %d must not be negative", f.Parent, f.Group)
	}
	return nil
}
