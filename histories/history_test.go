package histories_test

import (
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/pglocks/pglocks/histories"
)

// op is an operation of client c over [call, ret] (milliseconds).
func op(c int, k histories.Kind, o histories.Outcome, call, ret int64) histories.Op {
	return histories.Op{Client: c, Kind: k, Outcome: o, Call: call * 1e6, Return: ret * 1e6}
}

const (
	acq, rel, loss, cleared = histories.Acquire, histories.Release, histories.Loss, histories.Cleared
	ok, held, lost, unknown = histories.OK, histories.Held, histories.Lost, histories.Unknown
)

// The model tells the histories a lock can have from those it cannot: each
// bad history is one of the failures the checks are for.
func TestModel(t *testing.T) {
	for _, tt := range []struct {
		name string
		n    int
		ops  []histories.Op
		want porcupine.CheckResult
	}{
		{"one after the other", 1, []histories.Op{
			op(0, acq, ok, 0, 1), op(0, rel, ok, 2, 3), op(1, acq, ok, 4, 5), op(1, rel, ok, 6, 7)}, porcupine.Ok},
		{"two holders at once", 1, []histories.Op{
			op(0, acq, ok, 0, 1), op(1, acq, ok, 2, 3), op(0, rel, ok, 4, 5), op(1, rel, ok, 6, 7)}, porcupine.Illegal},
		{"a loss ends the hold, then another holds", 1, []histories.Op{
			op(0, acq, ok, 0, 1), op(0, loss, ok, 0, 6), op(0, cleared, ok, 6, 2006), op(1, acq, ok, 2, 3), op(0, rel, lost, 7, 8), op(1, rel, ok, 9, 10)}, porcupine.Ok},
		{"the server frees a lost key a moment after the holder is told", 1, []histories.Op{
			op(0, acq, ok, 0, 1), op(0, loss, ok, 0, 2), op(0, cleared, ok, 3, 2003), op(1, acq, held, 4, 5), op(1, acq, ok, 2100, 2101)}, porcupine.Ok},
		{"held after a loss's bound", 1, []histories.Op{
			op(0, acq, ok, 0, 1), op(0, loss, ok, 0, 2), op(0, cleared, ok, 3, 4), op(1, acq, held, 5, 6)}, porcupine.Illegal},
		{"Release says nil after another took the key", 1, []histories.Op{
			op(0, acq, ok, 0, 1), op(1, acq, ok, 2, 3), op(0, rel, ok, 4, 5), op(1, rel, ok, 6, 7), op(0, loss, ok, 0, 8), op(0, cleared, ok, 8, 9)}, porcupine.Illegal},
		{"a loss seen only after the other grant is placed before it", 1, []histories.Op{
			op(0, acq, ok, 0, 1), op(1, acq, ok, 2, 3), op(0, loss, ok, 0, 4), op(0, cleared, ok, 4, 4), op(0, rel, lost, 5, 6), op(1, rel, ok, 7, 8)}, porcupine.Ok},
		{"ErrLocked while free", 1, []histories.Op{
			op(0, acq, ok, 0, 1), op(0, rel, ok, 2, 3), op(1, acq, held, 4, 5)}, porcupine.Illegal},
		{"ErrLocked while a failed wait may still hold", 1, []histories.Op{
			op(0, acq, unknown, 0, 1), op(0, cleared, ok, 2, 1001), op(1, acq, held, 4, 5)}, porcupine.Ok},
		{"ErrLocked after the failed wait's bound", 1, []histories.Op{
			op(0, acq, unknown, 0, 1), op(0, cleared, ok, 2, 3), op(1, acq, held, 4, 5)}, porcupine.Illegal},
		{"a failed wait granted after its client took the key again and let it go", 1, []histories.Op{
			op(0, acq, unknown, 0, 1), op(0, cleared, ok, 2, 2002), op(0, acq, ok, 3, 4), op(0, rel, ok, 5, 6), op(1, acq, held, 7, 8)}, porcupine.Ok},
		{"two failed waits of one client, each granted once", 1, []histories.Op{
			op(0, acq, unknown, 0, 1), op(0, cleared, ok, 2, 2002), op(0, acq, unknown, 3, 4), op(0, cleared, ok, 5, 2005),
			op(1, acq, held, 6, 7), op(2, acq, ok, 8, 9), op(2, rel, ok, 10, 11), op(1, acq, held, 12, 13)}, porcupine.Ok},
		{"a failed wait's hold begins only once", 1, []histories.Op{
			op(0, acq, unknown, 0, 1), op(0, cleared, ok, 2, 2002), op(1, acq, held, 3, 4), op(2, acq, ok, 5, 6), op(2, rel, ok, 7, 8), op(1, acq, held, 9, 10)}, porcupine.Illegal},
		{"a semaphore of 2 holds two", 2, []histories.Op{
			op(0, acq, ok, 0, 1), op(1, acq, ok, 2, 3), op(2, acq, held, 4, 5), op(0, rel, ok, 6, 7), op(1, rel, ok, 6, 7)}, porcupine.Ok},
		{"a semaphore of 2 holds three", 2, []histories.Op{
			op(0, acq, ok, 0, 1), op(1, acq, ok, 2, 3), op(2, acq, ok, 4, 5), op(0, rel, ok, 6, 7)}, porcupine.Illegal},
	} {
		if res, _ := histories.Check(tt.ops, tt.n, 10*time.Second); res != tt.want {
			t.Errorf("%s: %s, want %s", tt.name, res, tt.want)
		}
	}
}

func TestTokensBackwards(t *testing.T) {
	a := histories.Op{Client: 0, Kind: acq, Outcome: ok, Call: 0, Return: 1, Token: 10}
	b := histories.Op{Client: 1, Kind: acq, Outcome: ok, Call: 5, Return: 6, Token: 9}
	if bad := histories.TokensBackwards([]histories.Op{a, b}, map[int]int64{0: 3, 1: 8}); len(bad) != 1 {
		t.Errorf("a token lower than one before it: %v", bad)
	}
	b.Token = 11
	if bad := histories.TokensBackwards([]histories.Op{a, b}, map[int]int64{0: 3, 1: 8}); len(bad) != 0 {
		t.Errorf("rising tokens: %v", bad)
	}
	// Overlapping holds (a lost, b granted before a saw it) are not ordered.
	b.Token = 9
	if bad := histories.TokensBackwards([]histories.Op{a, b}, map[int]int64{0: 7, 1: 8}); len(bad) != 0 {
		t.Errorf("holds not ordered by their ends: %v", bad)
	}
}
