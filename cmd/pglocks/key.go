package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/pglocks/pglocks"
)

const keyHead = `Usage: pglocks key [-k SCHEME] [--json] NAME

Prints the key that NAME stands for, and the SQL that takes the same lock
from psql or any other client.
`

// keyInfo is what "pglocks key" prints.
type keyInfo struct {
	Name   string    `json:"name"`
	Scheme string    `json:"scheme"`
	Bigint *int64    `json:"bigint"` // the key, for the bigint key space
	Pair   *[2]int32 `json:"pair"`   // the key, for the int4-pair key space
	SQL    string    `json:"sql"`
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
	keyFlag(fs, &scheme, "how NAME becomes a key: ")
	fs.BoolVar(&asJSON, "json", false, "print JSON")
	if code := parseFlags(fs, args, stdout); code >= 0 {
		return code
	}
	if fs.NArg() != 1 {
		return usageError(stderr, "key", "want exactly one NAME, got %d", fs.NArg())
	}
	name := fs.Arg(0)
	key, err := parseKey(scheme, name)
	if err != nil {
		return usageError(stderr, "key", "%v", err)
	}
	ki := describeKey(scheme, name, key)
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(ki)
		return 0
	}
	fmt.Fprintf(stdout, "name:   %s\nscheme: %s\n", name, scheme)
	if ki.Bigint != nil {
		fmt.Fprintf(stdout, "key:    %d (bigint)\n", *ki.Bigint)
	} else {
		fmt.Fprintf(stdout, "key:    %d,%d (int4 pair)\n", ki.Pair[0], ki.Pair[1])
	}
	fmt.Fprintf(stdout, "sql:    %s\n", ki.SQL)
	return 0
}
