package main

import (
	"context"
	"encoding/json"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
)

// pglocks key -k all prints NAME's key under every scheme, as the library
// makes it; id and pair only when NAME is one.
func TestKeySchemeAll(t *testing.T) {
	t.Parallel()
	prefix := rubyToI(os.Getenv("WITH_ADVISORY_LOCK_PREFIX")) // as the child reads it
	for _, tt := range []struct {
		name  string
		extra map[string]pglocks.Key // id and pair, when NAME parses as one
	}{
		{"some lock", nil},
		{"0000000000000005", map[string]pglocks.Key{"id": pglocks.ID(5)}},
		{"1,-2", map[string]pglocks.Key{"pair": pglocks.Pair(1, -2)}},
	} {
		want := map[string]pglocks.Key{
			"name":          pglocks.Name(tt.name),
			"crc32":         pglocks.NameCRC32(tt.name),
			"django-pglock": pglocks.NameDjangoPglock(tt.name),
			"dotnet":        pglocks.NameDotNet(tt.name),
			"rails":         pglocks.NameRails(tt.name, prefix),
			"node":          pglocks.NameNode(tt.name),
		}
		for s, k := range tt.extra {
			want[s] = k
		}
		stdout, stderr, code := pglocksRun(t, "", "key", "-k", "all", "--json", tt.name)
		if code != 0 {
			t.Fatalf("%q: exit %d: %s", tt.name, code, stderr)
		}
		var got []keyInfo
		if err := json.Unmarshal([]byte(stdout), &got); err != nil {
			t.Fatalf("%q: %v\n%s", tt.name, err, stdout)
		}
		seen := map[string]bool{}
		for _, ki := range got {
			var k pglocks.Key
			if ki.Bigint != nil {
				k = pglocks.ID(*ki.Bigint)
			} else if ki.Pair != nil {
				k = pglocks.Pair(ki.Pair[0], ki.Pair[1])
			}
			if w, ok := want[ki.Scheme]; !ok || k != w || ki.Name != tt.name || seen[ki.Scheme] {
				t.Errorf("%q: scheme %s: key %v, want %v (%+v)", tt.name, ki.Scheme, k, w, ki)
			}
			seen[ki.Scheme] = true
		}
		if len(seen) != len(want) {
			t.Errorf("%q: schemes %v, want those of %v", tt.name, seen, want)
		}
		// The text form: one block a scheme.
		stdout, _, code = pglocksRun(t, "", "key", "-k", "all", tt.name)
		if code != 0 || strings.Count(stdout, "scheme: ") != len(want) || !strings.Contains(stdout, "scheme: dotnet\nkey:    "+keyText(pglocks.NameDotNet(tt.name))) {
			t.Errorf("%q: text: exit %d:\n%s", tt.name, code, stdout)
		}
	}
}

// keyText is how pglocks key prints a key.
func keyText(k pglocks.Key) string {
	if _, ok := k.Int64(); ok {
		return k.String() + " (bigint)"
	}
	return k.String() + " (int4 pair)"
}

// pglocks ls --name NAME -k all names the scheme of each of NAME's keys
// that a plain SQL session holds; a key two schemes share gets one label.
func TestLsSchemeAll(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	c, err := pgx.Connect(t.Context(), dsn+"&application_name=dotnet-app")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	// "nightly" is DistributedLock's ASCII form, a pair; "0000000000000005"
	// its hex form, ID(5), which is also what -k id makes of it.
	a, b, _ := pglocks.NameDotNet("nightly").Int32s()
	if _, err := c.Exec(t.Context(), "SELECT pg_advisory_lock($1, $2), pg_advisory_lock(5)", a, b); err != nil {
		t.Fatal(err)
	}
	defer func() { _, _ = c.Exec(context.Background(), "SELECT pg_advisory_unlock_all()") }()

	stdout, stderr, code := pglocksRun(t, dsn, "ls", "--name", "nightly", "--name", "0000000000000005", "-k", "all")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"nightly (dotnet)", "0000000000000005 (dotnet, id)", "dotnet-app"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("ls lacks %q:\n%s", want, stdout)
		}
	}
	stdout, _, code = pglocksRun(t, dsn, "ls", "--json", "--name", "nightly", "--name", "0000000000000005", "-k", "all")
	var got []lockInfo
	if err := json.Unmarshal([]byte(stdout), &got); err != nil || code != 0 {
		t.Fatalf("--json: exit %d, %v\n%s", code, err, stdout)
	}
	var pair, id bool
	for _, l := range got {
		switch {
		case l.Pair != nil && *l.Pair == [2]int32{a, b}:
			pair = l.Name == "nightly" && slices.Equal(l.Schemes, []string{"dotnet"})
		case l.Bigint != nil && *l.Bigint == 5:
			id = l.Name == "0000000000000005" && slices.Equal(l.Schemes, []string{"dotnet", "id"})
		}
	}
	if !pair || !id {
		t.Errorf("--json: dotnet pair labelled %v, shared id %v: %+v", pair, id, got)
	}
	// With one scheme the label is NAME alone, as before.
	stdout, _, _ = pglocksRun(t, dsn, "ls", "--name", "nightly", "-k", "dotnet")
	if !strings.Contains(stdout, "nightly ") || strings.Contains(stdout, "(dotnet)") {
		t.Errorf("-k dotnet:\n%s", stdout)
	}
}
