// Package histories checks the histories of pglocks Lockers under faults
// against a model of the lock, with porcupine (a linearizability checker):
// the tests in this module run clients that take, hold and release one key
// (or one of its slots) while faults end their sessions, record every
// operation with the moments it was called and returned, and check that
// some order of the operations, each taking effect between its call and
// its return, is one a single exclusive lock (or a semaphore of n) that a
// loss may end could have produced. It is a module of its own so that
// pglocks does not depend on porcupine.
package histories

import (
	"fmt"
	"math/bits"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"
)

// Kind is what an operation did.
type Kind int

const (
	// Acquire is a Lock or TryLock.
	Acquire Kind = iota
	// Release is a Release.
	Release
	// Loss is a loss of a held lock, seen by its holder: it happened at
	// some moment between the acquisition's call and its being seen (the
	// server may end the session between the grant and the client's
	// hearing of it). The server may still hold the key a moment after the
	// holder is told (a cut connection's backend has yet to notice): until
	// a Cleared op of the holder, called just after the loss was seen.
	Loss
	// Cleared is the end of what a failed acquisition may hold for a
	// moment (a wait granted as it was cancelled, whose session is
	// closing): called just after the acquisition returned, it says that by its
	// Return, at the latest, nothing of it is held.
	Cleared
)

// Outcome is how an operation ended.
type Outcome int

const (
	// OK: acquired, or released while held.
	OK Outcome = iota
	// Held: a TryLock said ErrLocked, so every slot was held at some moment
	// of the call.
	Held
	// Lost: a Release said the lock had been lost before.
	Lost
	// Unknown: the call failed otherwise (a timeout, a connection cut by a
	// fault, or a TryLock whose ErrLocked the model cannot check): it
	// says nothing of the lock, but may have left it held for a moment
	// (until its Cleared op).
	Unknown
	// Failed: the call failed before it could take anything (no
	// connection to be had, its session gone): it says nothing of the lock,
	// and changes nothing.
	Failed
)

// Op is one operation of a client, with the moments it was called and
// returned (nanoseconds since the history began).
type Op struct {
	Client       int
	Kind         Kind
	Outcome      Outcome
	Call, Return int64
	Token        int64 // an acquisition's fencing token, if any
}

func (o Op) String() string {
	k := [...]string{"acquire", "release", "loss", "cleared"}[o.Kind]
	out := [...]string{"ok", "held", "lost", "unknown", "failed"}[o.Outcome]
	return fmt.Sprintf("c%d %s -> %s [%.3f ms, %.3f ms]", o.Client, k, out, float64(o.Call)/1e6, float64(o.Return)/1e6)
}

// History records the operations of many clients.
type History struct {
	began time.Time
	mu    sync.Mutex
	ops   []Op
}

// NewHistory starts a history.
func NewHistory() *History { return &History{began: time.Now()} }

// Now is the moment to record as a call or return.
func (h *History) Now() int64 { return int64(time.Since(h.began)) }

// Add records op.
func (h *History) Add(op Op) {
	h.mu.Lock()
	h.ops = append(h.ops, op)
	h.mu.Unlock()
}

// Ops returns the operations recorded, in order of call.
func (h *History) Ops() []Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	ops := append([]Op(nil), h.ops...)
	sort.Slice(ops, func(i, j int) bool { return ops[i].Call < ops[j].Call })
	return ops
}

// state is the model's: who holds (a bit mask of clients 0..63), and who
// may still hold for a moment after a failed acquisition (ghosts).
type state struct{ holders, ghosts uint64 }

// Model is a semaphore of n that a loss may end (for n = 1, an exclusive
// lock), over clients 0..63. An acquisition that failed otherwise than by
// ErrLocked (Outcome Unknown) may or may not have left its client holding
// until its Cleared op: the library lets go of such a grant, but the
// server sees it go only when the session's unlock or end reaches it.
func Model(n int) porcupine.Model {
	nm := porcupine.NondeterministicModel{
		Init: func() []any { return []any{state{}} },
		Step: func(st, input, _ any) []any {
			s, op := st.(state), input.(Op)
			me := uint64(1) << op.Client
			count := bits.OnesCount64(s.holders | s.ghosts)
			one := func(ok bool, next state) []any {
				if ok {
					return []any{next}
				}
				return nil
			}
			switch op.Kind {
			case Acquire:
				switch op.Outcome {
				case OK:
					return one(s.holders&me == 0 && s.ghosts&me == 0 && count < n, state{s.holders | me, s.ghosts})
				case Held:
					return one(count == n, s)
				case Failed:
					return []any{s}
				}
				if count < n && s.ghosts&me == 0 && s.holders&me == 0 {
					return []any{s, state{s.holders, s.ghosts | me}}
				}
				return []any{s}
			case Release:
				switch op.Outcome {
				case OK:
					return one(s.holders&me != 0, state{s.holders &^ me, s.ghosts})
				case Lost:
					return one(s.holders&me == 0, s)
				}
				// It failed otherwise: its connection was closed, which
				// freed the lock (a Loss op says when).
				return []any{s}
			case Loss:
				// The server freed the key, or (the holder told first) it
				// frees it a moment later, when its session's backend sees
				// the connection gone: by the loss's Cleared op.
				if s.holders&me == 0 {
					return nil
				}
				return []any{state{s.holders &^ me, s.ghosts}, state{s.holders &^ me, s.ghosts | me}}
			case Cleared:
				return []any{state{s.holders, s.ghosts &^ me}}
			}
			return nil
		},
		Equal: func(a, b any) bool { return a.(state) == b.(state) },
		Hash: func(st any) uint64 {
			s := st.(state)
			return s.holders*0x9e3779b97f4a7c15 ^ s.ghosts
		},
		DescribeOperation: func(input, _ any) string { return input.(Op).String() },
		DescribeState: func(st any) string {
			s := st.(state)
			var who []string
			for c := range 64 {
				switch {
				case s.holders&(1<<c) != 0:
					who = append(who, fmt.Sprintf("c%d", c))
				case s.ghosts&(1<<c) != 0:
					who = append(who, fmt.Sprintf("c%d (failed acquisition)", c))
				}
			}
			if len(who) == 0 {
				return "free"
			}
			return "held by " + strings.Join(who, ", ")
		},
	}
	return nm.ToModel()
}

// Check checks ops against Model(n), giving up after timeout (the result is
// then porcupine.Unknown), and returns the linearization info for a
// visualization.
func Check(ops []Op, n int, timeout time.Duration) (porcupine.CheckResult, porcupine.LinearizationInfo) {
	pops := make([]porcupine.Operation, len(ops))
	for i, op := range ops {
		pops[i] = porcupine.Operation{ClientId: op.Client, Input: op, Call: op.Call, Output: nil, Return: op.Return}
	}
	return porcupine.CheckOperationsVerbose(Model(n), pops, timeout)
}

// TokensBackwards returns the pairs of exclusive acquisitions (n = 1)
// whose fencing tokens go backwards: a, which ended (its release returned,
// or its loss was seen) before b was called, has a token no lower than b's.
// ends maps an acquisition's index in ops to when its hold ended.
func TokensBackwards(ops []Op, ends map[int]int64) [][2]Op {
	type acq struct {
		op  Op
		end int64
	}
	var as []acq
	for i, op := range ops {
		if op.Kind == Acquire && op.Outcome == OK && op.Token != 0 {
			if end, ok := ends[i]; ok {
				as = append(as, acq{op, end})
			}
		}
	}
	var bad [][2]Op
	for _, a := range as {
		for _, b := range as {
			if a.end < b.op.Call && a.op.Token >= b.op.Token {
				bad = append(bad, [2]Op{a.op, b.op})
			}
		}
	}
	return bad
}
