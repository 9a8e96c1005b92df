package pglocks

import (
	"math"
	"strconv"
	"testing"
)

// The hot statements' text codec reads and writes what PostgreSQL's text
// format says, at the edges too.
func TestFastCodec(t *testing.T) {
	for _, n := range []int64{0, 1, -1, 42, math.MaxInt64, math.MinInt64, math.MaxInt32, math.MinInt32} {
		got, err := parseInt([]byte(strconv.FormatInt(n, 10)))
		if err != nil || got != n {
			t.Errorf("parseInt(%d) = %d, %v", n, got, err)
		}
	}
	for _, bad := range []string{"", "-", "1x", "9223372036854775808", "-9223372036854775809", "99999999999999999999"} {
		if got, err := parseInt([]byte(bad)); err == nil {
			t.Errorf("parseInt(%q) = %d, want an error", bad, got)
		}
	}

	var f fastConn
	ps, err := f.encode([]any{int64(-7), int32(3), true, "it's"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"-7", "3", "true", "it's"}
	for i, p := range ps {
		if string(p) != want[i] {
			t.Errorf("param %d = %q, want %q", i, p, want[i])
		}
	}
	if _, err := f.encode([]any{1.5}); err == nil {
		t.Error("encode(1.5): no error")
	}

	var ok bool
	var tok int64
	var s string
	if err := scanText([][]byte{[]byte("t"), []byte("-12"), []byte("x")}, []any{&ok, &tok, &s}); err != nil {
		t.Fatal(err)
	}
	if !ok || tok != -12 || s != "x" {
		t.Errorf("scanText = %v %d %q", ok, tok, s)
	}
	if err := scanText([][]byte{[]byte("f")}, []any{&ok}); err != nil || ok {
		t.Errorf("scanText(f) = %v, %v", ok, err)
	}
	if err := scanText([][]byte{nil}, []any{&ok}); err == nil {
		t.Error("scanText(NULL into *bool): no error")
	}
	if err := scanText([][]byte{[]byte("t")}, []any{&ok, &tok}); err == nil {
		t.Error("scanText with a column missing: no error")
	}

	// Every lock statement is hot; a session's setup is not.
	if !hot[statements[stmtTry][1][1][1]] || !hot[statements[stmtUnlock][0][0][0]] || hot[sqlInitSession] {
		t.Error("hot statements misclassified")
	}
}
