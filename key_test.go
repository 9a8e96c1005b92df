package pglocks_test

import (
	"context"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/pglocks/pglocks"
)

func TestKeyVectors(t *testing.T) {
	tests := []struct {
		name string
		key  pglocks.Key
		want string
	}{
		{"Name some lock", pglocks.Name("some lock"), "1837249113968243424"},
		{"Name empty", pglocks.Name(""), "-6939563903564495251"},
		{"Name non-ASCII", pglocks.Name("héllo wörld 🔒"), "-3166781526316548859"},
		{"Name twelve bytes", pglocks.Name("abcdefghijkl"), "-7556637188122330412"},
		{"NameCRC32 django-pglocks", pglocks.NameCRC32("some lock"), "-205618829"},
		{"NameCRC32 empty", pglocks.NameCRC32(""), "0"},
		{"NameCRC32 non-ASCII", pglocks.NameCRC32("héllo wörld 🔒"), "-787206237"},
		{"NameNode advisory-lock", pglocks.NameNode("some-lock-name"), "1253560211,-1237456625"},
		{"NameNode empty", pglocks.NameNode(""), "1120186595,337443992"},
		{"NameNode non-ASCII", pglocks.NameNode("héllo wörld 🔒"), "-2115744419,2014950837"},
		{"NameNode nightly-report", pglocks.NameNode("nightly-report"), "280642407,-2017152350"},
		{"NameNode CJK", pglocks.NameNode("日本"), "213854927,-886643877"},
		{"NameRails foo", pglocks.NameRails("foo", 0), "208889121,0"},
		{"NameRails foo prefix 42", pglocks.NameRails("foo", 42), "208889121,42"},
		{"NameRails some-lock-name", pglocks.NameRails("some-lock-name", 0), "1848384551,0"},
		{"NameRails non-ASCII (NFC)", pglocks.NameRails("h\u00e9llo", 0), "507216438,0"},
		{"NameRails non-ASCII (NFD)", pglocks.NameRails("he\u0301llo", 0), "1367670199,0"},
		{"NameRails CJK", pglocks.NameRails("日本", 0), "1203228108,0"},
		{"NameRails empty", pglocks.NameRails("", 0), "0,0"},
		{"NameRails prefix -1 is masked", pglocks.NameRails("", -1), "0,2147483647"},
		{"IDRails Integer name", pglocks.IDRails(12345, 0), "12345,0"},
		{"IDRails -1 is masked", pglocks.IDRails(-1, 0), "2147483647,0"},
		{"IDRails above 2^31 is masked", pglocks.IDRails(1<<31+5, 0), "5,0"},
		{"NameNode non-ASCII (NFC)", pglocks.NameNode("h\u00e9llo"), "492390460,1166674317"},
		{"NameNode non-ASCII (NFD)", pglocks.NameNode("he\u0301llo"), "-695246124,351262339"},
		{"ID", pglocks.ID(-42), "-42"},
		{"Pair", pglocks.Pair(-1, 7), "-1,7"},
		{"zero Key", pglocks.Key{}, "invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.key.String(); got != tt.want {
				t.Errorf("got %s, want %s", got, tt.want)
			}
		})
	}
}

func TestKeyAccessors(t *testing.T) {
	if id, ok := pglocks.ID(-7).Int64(); !ok || id != -7 {
		t.Errorf("ID(-7).Int64() = %d, %v", id, ok)
	}
	if _, ok := pglocks.Pair(1, 2).Int64(); ok {
		t.Error("a pair key has an Int64")
	}
	if a, b, ok := pglocks.Pair(-1, 2).Int32s(); !ok || a != -1 || b != 2 {
		t.Errorf("Pair(-1, 2).Int32s() = %d, %d, %v", a, b, ok)
	}
	if _, _, ok := pglocks.ID(1).Int32s(); ok {
		t.Error("a bigint key has Int32s")
	}
	if _, ok := (pglocks.Key{}).Int64(); ok {
		t.Error("the zero Key has an Int64")
	}
}

func TestKeyIdentity(t *testing.T) {
	if pglocks.ID(1) == pglocks.Pair(0, 1) {
		t.Error("ID(1) == Pair(0, 1): the two key spaces must not collide")
	}
	names := []string{"x", "x"}
	if pglocks.Name(names[0]) != pglocks.Name(names[1]) || pglocks.Pair(1, int32(len(names))) != pglocks.Pair(1, 2) {
		t.Error("equal keys compare unequal")
	}
}

// randomName returns a valid UTF-8 string of n runes from all of Unicode
// (no NUL: text cannot hold it).
func randomName(r *rand.Rand, n int) string {
	var b strings.Builder
	for b.Len() < n {
		var c rune
		switch r.IntN(4) {
		case 0:
			c = rune(1 + r.IntN(0x7f)) // ASCII
		case 1:
			c = rune(0x80 + r.IntN(0x800-0x80)) // two bytes
		case 2:
			c = rune(0x800 + r.IntN(0x10000-0x800)) // three bytes
		default:
			c = rune(0x10000 + r.IntN(utf8.MaxRune-0x10000)) // four bytes
		}
		if !utf8.ValidRune(c) {
			continue
		}
		b.WriteRune(c)
	}
	return b.String()
}

// serverHashes asks the server for hashtextextended(name, 0) of each name.
func serverHashes(t *testing.T, names []string) []int64 {
	t.Helper()
	rows, err := srv.Admin.Query(context.Background(),
		`SELECT hashtextextended(n, 0) FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i) ORDER BY i`, names)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []int64
	for rows.Next() {
		var h int64
		if err := rows.Scan(&h); err != nil {
			t.Fatal(err)
		}
		out = append(out, h)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestNameMatchesServer(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(1, 2))
	names := []string{"", "a", "some lock", "héllo wörld 🔒", "abcdefghijkl", "0", "-1", "9223372036854775807"}
	for n := range 24 { // every length around the 12-byte blocks
		names = append(names, strings.Repeat("x", n))
	}
	for range 4000 {
		names = append(names, randomName(r, r.IntN(1001)))
	}
	want := serverHashes(t, names)
	for i, name := range names {
		if got := pglocks.Name(name); got != pglocks.ID(want[i]) {
			t.Errorf("Name(%q) = %v, server says %d", name, got, want[i])
		}
	}
}

func FuzzName(f *testing.F) {
	for _, s := range []string{"", "some lock", "héllo wörld 🔒", "abcdefghijkl", "abcdefghijklm"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if !utf8.ValidString(name) || strings.ContainsRune(name, 0) {
			t.Skip("text cannot hold this string")
		}
		if got, want := pglocks.Name(name), pglocks.ID(serverHashes(t, []string{name})[0]); got != want {
			t.Errorf("Name(%q) = %v, server says %v", name, got, want)
		}
	})
}

// TestKeySpaces proves on the server that ID(1) and Pair(0, 1) are different
// locks, and that pg_locks shows each as expected.
func TestKeySpaces(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		a, b := e.locker(4), e.locker(4)
		id := mustLock(t, a, pglocks.ID(1))
		pair, err := b.TryLock(t.Context(), pglocks.Pair(0, 1))
		if err != nil {
			t.Fatalf("Pair(0, 1) while ID(1) is held: %v", err)
		}
		big := mustLock(t, a, pglocks.ID(-5_000_000_000))
		got := e.locks()
		keys := map[string]bool{}
		for _, r := range got {
			keys[r.key] = r.granted
		}
		for _, k := range []string{"bigint 1", "pair 0,1", "bigint -5000000000"} {
			if !keys[k] {
				t.Errorf("pg_locks has no granted %s: %v", k, got)
			}
		}
		mustRelease(t, id)
		mustRelease(t, pair)
		mustRelease(t, big)
	})
}

// TestNameInteropSQL: a session holding pg_advisory_lock(hashtextextended(…))
// in plain SQL excludes Name(…), and the reverse.
func TestNameInteropSQL(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		ctx := t.Context()
		name := t.Name()
		sqlConn := e.rawConn(t)
		if _, err := sqlConn.Exec(ctx, "SELECT pg_advisory_lock(hashtextextended($1, 0))", name); err != nil {
			t.Fatal(err)
		}
		_, err := l.TryLock(ctx, pglocks.Name(name))
		wantErr(t, err, pglocks.ErrLocked)
		if _, err := sqlConn.Exec(ctx, "SELECT pg_advisory_unlock(hashtextextended($1, 0))", name); err != nil {
			t.Fatal(err)
		}
		lk := mustLock(t, l, pglocks.Name(name))
		var ok bool
		if err := sqlConn.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", name).Scan(&ok); err != nil {
			t.Fatal(err)
		}
		if ok {
			t.Error("plain SQL took the lock that Name holds")
		}
		mustRelease(t, lk)
	})
}

// pg_locks shows bigint keys as objsubid 1 with the high and low 32 bits,
// pairs as objsubid 2 with both int4 read as unsigned.
func TestKeyPgLocks(t *testing.T) {
	for _, tt := range []struct {
		key            pglocks.Key
		sub            int16
		classid, objid uint32
	}{
		{pglocks.ID(1), 1, 0, 1},
		{pglocks.ID(-1), 1, 0xffffffff, 0xffffffff},
		{pglocks.ID(1 << 32), 1, 1, 0},
		{pglocks.Pair(0, 1), 2, 0, 1},
		{pglocks.Pair(-2, 3), 2, 0xfffffffe, 3},
	} {
		sub, c, o := tt.key.PgLocks()
		if sub != tt.sub || c != tt.classid || o != tt.objid {
			t.Errorf("%v.PgLocks() = %d %d %d, want %d %d %d", tt.key, sub, c, o, tt.sub, tt.classid, tt.objid)
		}
		if k, ok := pglocks.KeyFromPgLocks(sub, c, o); !ok || k != tt.key {
			t.Errorf("KeyFromPgLocks(%d, %d, %d) = %v %v, want %v", sub, c, o, k, ok, tt.key)
		}
	}
	if _, ok := pglocks.KeyFromPgLocks(3, 0, 0); ok {
		t.Error("objsubid 3 is not an advisory key")
	}
	if sub, _, _ := (pglocks.Key{}).PgLocks(); sub != 0 {
		t.Error("the zero Key has a pg_locks form")
	}
}
