package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/pglocks/pglocks"
)

const keyHead = `Usage: pglocks key [-k SCHEME] [--slots N] [--json] NAME
       pglocks key -k goose|prisma [--json]

Prints the key that NAME stands for, and the SQL that takes the same lock
from psql or any other client; with --slots N, the keys of NAME's N slots
(what 'pglocks run --slots N NAME' takes one of) and the SQL for each. With
-k all, NAME's key under every scheme (id and pair only when NAME is one);
with --json, as an array.
`

// keyInfo is what "pglocks key" prints.
type keyInfo struct {
	Name   string    `json:"name"`
	Scheme string    `json:"scheme"`
	Bigint *int64    `json:"bigint"` // the key, for the bigint key space
	Pair   *[2]int32 `json:"pair"`   // the key, for the int4-pair key space
	SQL    string    `json:"sql"`
	Slots  []slotKey `json:"slots,omitempty"`
}

// slotKey is one slot of a key (--slots).
type slotKey struct {
	Slot int      `json:"slot"`
	Pair [2]int32 `json:"pair"`
	SQL  string   `json:"sql"`
}

// slotSQL is the SQL that takes slot i of key, computed by the server.
func slotSQL(key pglocks.Key, i int) string {
	return fmt.Sprintf("SELECT pg_advisory_lock((h >> 32)::int4, h::bit(32)::int4) FROM (SELECT hashtextextended('pglocks:slot:%s:%d', 0) AS h) s;", key, i)
}

func describeKey(scheme, name string, key pglocks.Key) keyInfo {
	ki := keyInfo{Name: name, Scheme: scheme}
	if id, ok := key.Int64(); ok {
		ki.Bigint = &id
		ki.SQL = fmt.Sprintf("SELECT pg_advisory_lock(%d);", id)
		if scheme == "name" {
			ki.SQL += fmt.Sprintf(" -- or: SELECT pg_advisory_lock(hashtextextended('%s', 0));", strings.ReplaceAll(name, "'", "''"))
		}
	} else {
		a, b, _ := key.Int32s()
		ki.Pair = &[2]int32{a, b}
		ki.SQL = fmt.Sprintf("SELECT pg_advisory_lock(%d, %d);", a, b)
	}
	return ki
}

// keyCommand is "pglocks key".
func keyCommand(args []string, stdout, stderr io.Writer) int {
	fs := flagSet("key", keyHead, stderr)
	var scheme string
	var asJSON bool
	var slots int
	keyFlag(fs, &scheme, "how NAME becomes a key, `SCHEME`: ")
	fs.BoolVar(&asJSON, "json", false, "print JSON")
	fs.IntVar(&slots, "slots", 0, fmt.Sprintf("also print the keys of NAME's `N` slots (1..%d)", pglocks.MaxSlots))
	if code := parseFlags(fs, args, stdout); code >= 0 {
		return code
	}
	var name string
	switch fixed := scheme == "goose" || scheme == "prisma"; {
	case fixed && fs.NArg() == 0:
		// The tool's key takes no NAME.
	case fs.NArg() != 1:
		return usageError(stderr, "key", "want exactly one NAME, got %d", fs.NArg())
	case fs.Arg(0) == "":
		// An unset variable ($JOB): run refuses it too.
		return usageError(stderr, "key", "empty NAME")
	default:
		name = fs.Arg(0)
	}
	if slots < 0 || slots > pglocks.MaxSlots {
		return usageError(stderr, "key", "--slots must be 1..%d", pglocks.MaxSlots)
	}
	var keys []schemeKey
	if scheme == "all" {
		keys = allKeys(name)
	} else {
		key, err := parseKey(scheme, name)
		if err != nil {
			return usageError(stderr, "key", "%v", err)
		}
		keys = []schemeKey{{scheme, key}}
	}
	var infos []keyInfo
	for _, sk := range keys {
		ki := describeKey(sk.scheme, name, sk.key)
		if migrationSchemes[sk.scheme] {
			ki.Name, _ = pglocks.MigrationLabel(sk.key, name)
		}
		for i := range slots {
			a, b, _ := sk.key.Slot(i).Int32s()
			ki.Slots = append(ki.Slots, slotKey{Slot: i, Pair: [2]int32{a, b}, SQL: slotSQL(sk.key, i)})
		}
		infos = append(infos, ki)
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.SetEscapeHTML(false) // for people and jq: "<<", not "\u003c\u003c"
		if scheme == "all" {
			_ = enc.Encode(infos)
		} else {
			_ = enc.Encode(infos[0])
		}
		return 0
	}
	for i, ki := range infos {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		printKey(stdout, ki)
	}
	return 0
}

// printKey prints one key as text.
func printKey(w io.Writer, ki keyInfo) {
	fmt.Fprintf(w, "name:   %s\nscheme: %s\n", ki.Name, ki.Scheme)
	if ki.Bigint != nil {
		fmt.Fprintf(w, "key:    %d (bigint)\n", *ki.Bigint)
	} else {
		fmt.Fprintf(w, "key:    %d,%d (int4 pair)\n", ki.Pair[0], ki.Pair[1])
	}
	fmt.Fprintf(w, "sql:    %s\n", ki.SQL)
	for _, s := range ki.Slots {
		fmt.Fprintf(w, "slot %d: %d,%d (int4 pair)\n        %s\n", s.Slot, s.Pair[0], s.Pair[1], s.SQL)
	}
}
