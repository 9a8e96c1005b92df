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
	"hash/fnv"
	"math"
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
	// closing; a wait whose connection was severed, still in the server's
	// queue until its backend notices), or of a loss's hold on the server:
	// called just after the acquisition returned (or the loss was seen),
	// it says that by its Return, at the latest, nothing of it is held.
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
	// says nothing of the lock, but may have left it held for a moment,
	// now or a little later (until its Cleared op).
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

// state is the model's: who holds (a bit mask of clients 0..63); and, of
// the holds that belong to no call (ghosts, numbered by when they are
// cleared at the latest), which may still begin (pending: a failed wait
// still in the server's queue) and which may be holding now, as bit sets.
type state struct {
	holders         uint64
	pending, ghosts set
}

// set is a bit set, as a string so that states compare with ==.
type set string

func (s set) has(i int) bool { return i/8 < len(s) && s[i/8]&(1<<(i%8)) != 0 }

func (s set) with(i int, on bool) set {
	b := []byte(s)
	for len(b) <= i/8 {
		b = append(b, 0)
	}
	if on {
		b[i/8] |= 1 << (i % 8)
	} else {
		b[i/8] &^= 1 << (i % 8)
	}
	for len(b) > 0 && b[len(b)-1] == 0 {
		b = b[:len(b)-1] // one spelling of each set
	}
	return set(b)
}

func (s set) count() int {
	n := 0
	for i := range len(s) {
		n += bits.OnesCount8(s[i])
	}
	return n
}

// members returns the set's members, lowest first.
func (s set) members() []int {
	var m []int
	for i := range len(s) * 8 {
		if s.has(i) {
			m = append(m, i)
		}
	}
	return m
}

// step is the model's input: an operation, and the ghost it may start or
// ends (its number + 1; 0 if none), which Check assigns.
type step struct {
	op    Op
	ghost int
}

// Model is a semaphore of n that a loss may end (for n = 1, an exclusive
// lock), over clients 0..63, for the histories Check gives it. An
// acquisition that failed otherwise than by ErrLocked (Outcome Unknown)
// may have left a hold that belongs to none of its client's later calls:
// its wait was granted as it gave up, or (its connection severed, its
// backend not yet aware) is granted later, at any moment until its
// Cleared op, and held for a while. A lost hold may likewise go on on the
// server until its Cleared op. Such a ghost hold begins at most once,
// only while a slot is free, and may end at any moment.
//
// The model is deterministic, as the ghosts' freedom lets it be: it keeps
// every ghost it can (one may end at any later moment), and when an
// ErrLocked needs one to begin, it begins the pending one cleared first
// (the others may still begin later). Ghosts are numbered by when they
// are cleared at the latest, so that the first cleared is the lowest.
func Model(n int) porcupine.Model {
	nm := porcupine.NondeterministicModel{
		Init: func() []any { return []any{state{}} },
		Step: func(st, input, _ any) []any {
			s, in := st.(state), input.(step)
			op, me, g := in.op, uint64(1)<<in.op.Client, in.ghost-1
			held := bits.OnesCount64(s.holders)
			switch op.Kind {
			case Acquire:
				switch op.Outcome {
				case OK:
					if s.holders&me != 0 || held >= n {
						return nil
					}
					// Ghosts in the way ended before the grant: those
					// cleared first.
					s.holders |= me
					for _, i := range s.ghosts.members() {
						if s.ghosts.count() <= n-1-held {
							break
						}
						s.ghosts = s.ghosts.with(i, false)
					}
					return []any{s}
				case Held:
					// Failed waits still queued were granted by then.
					for _, i := range s.pending.members() {
						if held+s.ghosts.count() >= n {
							break
						}
						s.pending, s.ghosts = s.pending.with(i, false), s.ghosts.with(i, true)
					}
					if held+s.ghosts.count() < n {
						return nil
					}
					return []any{s}
				case Unknown:
					if g >= 0 {
						s.pending = s.pending.with(g, true)
					}
				}
				return []any{s} // Failed: nothing taken
			case Release:
				switch op.Outcome {
				case OK:
					if s.holders&me == 0 {
						return nil
					}
					s.holders &^= me
				case Lost:
					if s.holders&me != 0 {
						return nil
					}
				}
				// Otherwise its connection was closed, which freed the
				// lock (a Loss op says when).
				return []any{s}
			case Loss:
				// The server freed the key, or (the holder told first)
				// frees it a moment later, when its session's backend
				// sees the connection gone: by the loss's Cleared op.
				if s.holders&me == 0 {
					return nil
				}
				s.holders &^= me
				if g >= 0 {
					s.ghosts = s.ghosts.with(g, true)
				}
				return []any{s}
			case Cleared:
				if g >= 0 {
					s.pending, s.ghosts = s.pending.with(g, false), s.ghosts.with(g, false)
				}
				return []any{s}
			}
			return nil
		},
		Equal: func(a, b any) bool { return a.(state) == b.(state) },
		Hash: func(st any) uint64 {
			s := st.(state)
			h := fnv.New64a()
			h.Write([]byte(s.pending))
			h.Write([]byte{0})
			h.Write([]byte(s.ghosts))
			return s.holders*0x9e3779b97f4a7c15 ^ h.Sum64()
		},
		DescribeOperation: func(input, _ any) string { return input.(step).op.String() },
		DescribeState: func(st any) string {
			s := st.(state)
			var who []string
			for c := range 64 {
				if s.holders&(1<<c) != 0 {
					who = append(who, fmt.Sprintf("c%d", c))
				}
			}
			if g := s.ghosts.count(); g > 0 {
				who = append(who, fmt.Sprintf("%d failed or lost session(s)", g))
			}
			d := "free"
			if len(who) > 0 {
				d = "held by " + strings.Join(who, ", ")
			}
			if p := s.pending.count(); p > 0 {
				d += fmt.Sprintf("; %d failed wait(s) may still be granted", p)
			}
			return d
		},
	}
	return nm.ToModel()
}

// Check checks ops against Model(n), giving up after timeout (the result is
// then porcupine.Unknown), and returns the linearization info for a
// visualization. Each failed acquisition and each loss is paired with its
// client's next Cleared op (the first called after it returned), which
// ends what it may hold; one with none may hold to the end.
func Check(ops []Op, n int, timeout time.Duration) (porcupine.CheckResult, porcupine.LinearizationInfo) {
	steps, err := ghosts(ops)
	if err != nil {
		panic(err)
	}
	// Ops that change nothing and are always legal are left out: each
	// would only multiply the orders the checker tries.
	var pops []porcupine.Operation
	for i, op := range ops {
		inert := op.Kind == Acquire && (op.Outcome == Failed || op.Outcome == Unknown && steps[i].ghost == 0) ||
			op.Kind == Release && op.Outcome == Unknown ||
			op.Kind == Cleared && steps[i].ghost == 0
		if !inert {
			pops = append(pops, porcupine.Operation{ClientId: op.Client, Input: steps[i], Call: op.Call, Output: nil, Return: op.Return})
		}
	}
	return porcupine.CheckOperationsVerbose(Model(n), pops, timeout)
}

// ghosts pairs each op that may leave a ghost with its Cleared op, and
// numbers the pairs by when they are cleared at the latest.
func ghosts(ops []Op) ([]step, error) {
	steps := make([]step, len(ops))
	for i, op := range ops {
		steps[i].op = op
	}
	type span struct{ from, cleared int }
	var spans []span
	open := map[int][]int{} // by client: spans awaiting their Cleared op
	order := make([]int, len(ops))
	for i := range order {
		order[i] = i
	}
	// Cleared ops are matched by when they were called, the others by when
	// they returned: an op's Cleared is called after it returned.
	at := func(i int) int64 {
		if ops[i].Kind == Cleared {
			return ops[i].Call
		}
		return ops[i].Return
	}
	sort.SliceStable(order, func(a, b int) bool { return at(order[a]) < at(order[b]) })
	for _, i := range order {
		op := ops[i]
		switch {
		case op.Kind == Cleared:
			q := open[op.Client]
			if len(q) == 0 {
				return nil, fmt.Errorf("histories: %v clears nothing", op)
			}
			spans[q[len(q)-1]].cleared = i
			open[op.Client] = q[:len(q)-1]
		case op.Kind == Loss || op.Kind == Acquire && op.Outcome == Unknown:
			open[op.Client] = append(open[op.Client], len(spans))
			spans = append(spans, span{from: i, cleared: -1})
		}
	}
	deadline := func(sp span) int64 {
		if sp.cleared < 0 {
			return math.MaxInt64
		}
		return ops[sp.cleared].Return
	}
	// A ghost matters only to an ErrLocked (one in the way of a grant
	// ends): one with none in its span is left out, so that histories
	// reached in different orders meet in the same state.
	var helds []Op
	for _, op := range ops {
		if op.Kind == Acquire && op.Outcome == Held {
			helds = append(helds, op)
		}
	}
	kept := spans[:0]
	for _, sp := range spans {
		for _, h := range helds {
			if h.Return >= ops[sp.from].Call && h.Call <= deadline(sp) {
				kept = append(kept, sp)
				break
			}
		}
	}
	spans = kept
	sort.SliceStable(spans, func(a, b int) bool { return deadline(spans[a]) < deadline(spans[b]) })
	for g, sp := range spans {
		steps[sp.from].ghost = g + 1
		if sp.cleared >= 0 {
			steps[sp.cleared].ghost = g + 1
		}
	}
	return steps, nil
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
