package pglocks_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

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
		// django-pglock and DistributedLock (.NET): computed with an
		// independent Python implementation of the libraries' code
		// (hashlib, int.from_bytes), not with this package.
		{"NameDjangoPglock some lock", pglocks.NameDjangoPglock("some lock"), "-1292339565357005894"},
		{"NameDjangoPglock empty", pglocks.NameDjangoPglock(""), "1449310910991872227"},
		{"NameDjangoPglock non-ASCII", pglocks.NameDjangoPglock("héllo wörld 🔒"), "8654147950142049629"},
		{"NameDjangoPglock non-ASCII (NFC)", pglocks.NameDjangoPglock("h\u00e9llo"), "5010828037090527292"},
		{"NameDjangoPglock non-ASCII (NFD)", pglocks.NameDjangoPglock("he\u0301llo"), "1508660261921186516"},
		{"NameDjangoPglock CJK", pglocks.NameDjangoPglock("日本"), "-3808106454699791665"},
		{"NameDjangoPglock decorator", pglocks.NameDjangoPglock("myapp.tasks.send_report"), "-8738959259959048344"},
		{"NameDjangoPglock nightly-report", pglocks.NameDjangoPglock("nightly-report"), "-8663603374018903193"},
		{"NameDotNet 9 ASCII packed", pglocks.NameDotNet("some lock"), "-406884780,456647638"},
		{"NameDotNet empty", pglocks.NameDotNet(""), "2147483647,-1"},
		{"NameDotNet 1 char", pglocks.NameDotNet("a"), "-1023410177,-1"},
		{"NameDotNet 8 chars", pglocks.NameDotNet("abcdefgh"), "-1014292916,-1179391873"},
		{"NameDotNet 9 chars", pglocks.NameDotNet("abcdefghi"), "-1014292916,-1179391790"},
		{"NameDotNet 10 chars hashed", pglocks.NameDotNet("abcdefghij"), "-1533680579028349738"},
		{"NameDotNet 9 chars sign bit", pglocks.NameDotNet("zzzzzzzzz"), "-169093201,1589476084"},
		{"NameDotNet 9 chars @", pglocks.NameDotNet("@@@@@@@@@"), "-2130574328,270549120"},
		{"NameDotNet NUL and DEL", pglocks.NameDotNet("a\x00b\x7f"), "-1039984649,-1"},
		{"NameDotNet NUL", pglocks.NameDotNet("\x00"), "16777215,-1"},
		{"NameDotNet non-ASCII (NFC)", pglocks.NameDotNet("h\u00e9llo"), "8655888544762082613"},
		{"NameDotNet non-ASCII (NFD)", pglocks.NameDotNet("he\u0301llo"), "8028780111987030497"},
		{"NameDotNet CJK", pglocks.NameDotNet("日本"), "-5490585093105001916"},
		{"NameDotNet non-ASCII", pglocks.NameDotNet("héllo wörld 🔒"), "-6061424589606753406"},
		{"NameDotNet nightly-report", pglocks.NameDotNet("nightly-report"), "7635146791061737145"},
		{"NameDotNet hex 1", pglocks.NameDotNet("0000000000000001"), "1"},
		{"NameDotNet hex low half", pglocks.NameDotNet("00000000ffffffff"), "4294967295"},
		{"NameDotNet hex max", pglocks.NameDotNet("7fffffffffffffff"), "9223372036854775807"},
		{"NameDotNet hex -1", pglocks.NameDotNet("ffffffffffffffff"), "-1"},
		{"NameDotNet hex upper", pglocks.NameDotNet("DEADBEEF00C0FFEE"), "-2401053092599496722"},
		{"NameDotNet hex lower", pglocks.NameDotNet("deadbeef00c0ffee"), "-2401053092599496722"},
		{"NameDotNet hex pair", pglocks.NameDotNet("00000001,ffffffff"), "1,-1"},
		{"NameDotNet hex pair -1,1", pglocks.NameDotNet("ffffffff,00000001"), "-1,1"},
		{"NameDotNet hex pair upper", pglocks.NameDotNet("7FFFFFFF,80000000"), "2147483647,-2147483648"},
		{"NameDotNet 16 with 0x hashed", pglocks.NameDotNet("0x00000000000001"), "-6098146074694787403"},
		{"NameDotNet 16 not hex hashed", pglocks.NameDotNet("zzzzzzzzzzzzzzzz"), "3144716526739222159"},
		{"NameDotNet 16 with space hashed", pglocks.NameDotNet("00000000 0000001"), "8921596851317730971"},
		{"NameDotNet pair with space hashed", pglocks.NameDotNet(" 0000001,00000001"), "5272325857818421787"},
		{"NameDotNet pair with sign hashed", pglocks.NameDotNet("-0000001,00000001"), "6997436477373315063"},
		{"NameDotNet 17 with + hashed", pglocks.NameDotNet("+0000000000000001"), "-8392668100293388863"},
		{"NameDotNet 17 comma elsewhere hashed", pglocks.NameDotNet("0000000,000000001"), "2529617344825383724"},
		{"NameDotNet 17 semicolon hashed", pglocks.NameDotNet("00000001;ffffffff"), "5755264947371599"},
		{"NameDotNet 17 hex digits hashed", pglocks.NameDotNet("00000000000000001"), "-1737481186710052528"},
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

// DistributedLock's hex forms spell the key: 16 hex digits a bigint, 8,8
// a pair, in either case.
func TestNameDotNetHexRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 10000 {
		v := int64(r.Uint64())
		if got := pglocks.NameDotNet(fmt.Sprintf("%016x", uint64(v))); got != pglocks.ID(v) {
			t.Fatalf("NameDotNet(%016x) = %v, want ID(%d)", uint64(v), got, v)
		}
		if got := pglocks.NameDotNet(fmt.Sprintf("%016X", uint64(v))); got != pglocks.ID(v) {
			t.Fatalf("NameDotNet(%016X) = %v, want ID(%d)", uint64(v), got, v)
		}
		a, b := int32(r.Uint32()), int32(r.Uint32())
		if got := pglocks.NameDotNet(fmt.Sprintf("%08x,%08x", uint32(a), uint32(b))); got != pglocks.Pair(a, b) {
			t.Fatalf("NameDotNet(%08x,%08x) = %v, want Pair(%d, %d)", uint32(a), uint32(b), got, a, b)
		}
	}
}

// dotNetSQL is DistributedLock's name-to-key rule restated in SQL (pgcrypto
// for SHA-1), giving the key as Key.String does.
const dotNetSQL = `
SELECT CASE
  WHEN char_length(n) <= 9 AND n ~ '^[\x01-\x7f]*$' THEN (
    SELECT (v >> 32)::int4 || ',' || v::bit(32)::int4 FROM (
      SELECT coalesce(bit_or(ascii(substr(n, i, 1))::bigint << (57 - 7 * (i - 1))), 0)
             | ~((-1)::bigint << (63 - 7 * char_length(n))) AS v
      FROM generate_series(1, char_length(n)) i) p)
  WHEN n ~ '^[0-9a-fA-F]{16}$' THEN ('x' || n)::bit(64)::bigint::text
  WHEN n ~ '^[0-9a-fA-F]{8},[0-9a-fA-F]{8}$' THEN
    ('x' || left(n, 8))::bit(32)::int4 || ',' || ('x' || right(n, 8))::bit(32)::int4
  ELSE (
    SELECT ('x' || string_agg(lpad(to_hex(get_byte(h, 7 - i)), 2, '0'), '' ORDER BY i))::bit(64)::bigint::text
    FROM (SELECT digest(convert_to(n, 'UTF8'), 'sha1') AS h) d, generate_series(0, 7) i)
END
FROM unnest($1::text[]) WITH ORDINALITY AS u(n, o) ORDER BY o`

// djangoPglockSQL is django-pglock's rule in SQL: SHA-256, the first 8
// bytes little-endian.
const djangoPglockSQL = `
SELECT (SELECT ('x' || string_agg(lpad(to_hex(get_byte(h, 7 - i)), 2, '0'), '' ORDER BY i))::bit(64)::bigint::text
        FROM (SELECT sha256(convert_to(n, 'UTF8')) AS h) d, generate_series(0, 7) i)
FROM unnest($1::text[]) WITH ORDINALITY AS u(n, o) ORDER BY o`

// TestNameSchemesMatchServer derives the django-pglock and DistributedLock
// keys on the server, from the libraries' rules written in SQL, and checks
// that NameDjangoPglock and NameDotNet agree: a third check beside the
// vectors and the Go code.
func TestNameSchemesMatchServer(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, srv.DB(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "CREATE EXTENSION IF NOT EXISTS pgcrypto"); err != nil {
		t.Fatalf("CREATE EXTENSION pgcrypto (SHA-1 for the DistributedLock rule): %v; pgcrypto ships with the server "+
			"(Debian's postgresql-15); on a server of your own the test role must be allowed to create it", err)
	}
	r := rand.New(rand.NewPCG(5, 6))
	names := []string{"", "a", "some lock", "abcdefghi", "abcdefghij", "zzzzzzzzz", "@@@@@@@@@", "a\x01b\x7f",
		"h\u00e9llo", "he\u0301llo", "日本", "héllo wörld 🔒", "myapp.tasks.send_report",
		"0000000000000001", "ffffffffffffffff", "DEADBEEF00C0FFEE", "00000001,ffffffff", "7FFFFFFF,80000000",
		"0x00000000000001", "zzzzzzzzzzzzzzzz", "0000000,000000001", "+0000000000000001"}
	const hexDigits = "0123456789abcdefABCDEF"
	for range 2000 {
		switch r.IntN(4) {
		case 0: // ASCII around the 9-character boundary
			b := make([]byte, r.IntN(12))
			for i := range b {
				b[i] = byte(1 + r.IntN(0x7f))
			}
			names = append(names, string(b))
		case 1: // hex forms, some spoiled
			b := make([]byte, 16+r.IntN(2))
			for i := range b {
				b[i] = hexDigits[r.IntN(len(hexDigits))]
			}
			if len(b) == 17 {
				b[8] = ','
			}
			if r.IntN(4) == 0 {
				b[r.IntN(len(b))] = "gx ,-+"[r.IntN(6)]
			}
			names = append(names, string(b))
		default:
			names = append(names, randomName(r, r.IntN(40)))
		}
	}
	for _, tt := range []struct {
		scheme string
		sql    string
		key    func(string) pglocks.Key
	}{
		{"django-pglock", djangoPglockSQL, pglocks.NameDjangoPglock},
		{"dotnet", dotNetSQL, pglocks.NameDotNet},
	} {
		rows, err := conn.Query(ctx, tt.sql, names)
		if err != nil {
			t.Fatal(err)
		}
		want, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		for i, name := range names {
			if got := tt.key(name).String(); got != want[i] {
				t.Errorf("%s: %q: Go %s, server %s", tt.scheme, name, got, want[i])
			}
		}
	}
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
