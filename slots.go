package pglocks

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Slots (a fleet-wide semaphore): slot i of key K is the key K.Slot(i). A
// Lock with Slots(n) claims, in this process, the slots no goroutine of the
// Locker holds or is taking, tries them on the server in one statement that
// stops at the first it gets, and keeps that one. When every slot is held,
// Lock waits multiplexed: it says it wants the slots (other Lockers then tell
// when they free one), and tries again when told, when a goroutine of this
// Locker frees one, or after a backoff of muxMinPoll to muxMaxPoll.

// slotTaker takes slots for a Locker's acquisitions with Slots.
type slotTaker struct{ *acquirer }

// errSlotsSettling says that no slot could be tried because goroutines of
// this Locker are taking or releasing some of them.
var errSlotsSettling = fmt.Errorf("%w: slots being taken or released in this process", ErrLocked)

// maxSettle is how many times a TryLock with Slots waits for the tries of
// other goroutines of the Locker to end.
const maxSettle = 32

// lockSlot is Lock and TryLock with Slots.
func (st slotTaker) lockSlot(ctx context.Context, base Key, o lockConfig, wait bool) (*hold, error) {
	if o.slots == 1 {
		return st.lockOnlySlot(ctx, base, o, wait)
	}
	keys := make([]Key, o.slots)
	for i := range keys {
		keys[i] = base.Slot(i)
	}
	var w *muxWatch
	delay := muxMinPoll
	for settled := 0; ; {
		h, err := st.trySlots(ctx, base, keys, o)
		if err == nil || !errors.Is(err, ErrLocked) {
			return h, err
		}
		if !wait {
			// A try of another goroutine of this Locker claims every slot
			// free here, for a round trip, and keeps one: a TryLock that
			// finds them claimed waits for that try to end (a few times,
			// if other tries follow) before it says ErrLocked.
			if !errors.Is(err, errSlotsSettling) || settled >= maxSettle {
				return nil, lockError(base, ErrLocked)
			}
			settled++
		}
		if w == nil {
			// Say they are wanted, then try again at once: a slot freed
			// before the want was heard is told by its Locker when it hears
			// it (it was released lately).
			w = st.mux.watch(keys, !wait)
			defer st.mux.unwatch(w)
			continue
		}
		if delay, err = st.awaitSlot(ctx, w, delay); err != nil {
			return nil, lockError(base, err)
		}
	}
}

// lockOnlySlot is lockSlot for Slots(1): one slot is one key, which waits in
// the server's queue, first come first served, like any key.
func (st slotTaker) lockOnlySlot(ctx context.Context, base Key, o lockConfig, wait bool) (*hold, error) {
	slot := base.Slot(0)
	holds, err := st.acquire(ctx, []Key{slot}, o, wait)
	if err != nil {
		// Name the key asked for, not its slot's.
		if ke, ok := err.(*keyError); ok && ke.key == slot {
			err = lockError(base, ke.err)
		}
		return nil, err
	}
	st.table.setTerms(holds, base, 0, time.Time{})
	return holds[0], nil
}

// awaitSlot waits until w is woken or delay has passed (then the next delay
// is twice as long, up to muxMaxPoll), as long as ctx allows.
func (st slotTaker) awaitSlot(ctx context.Context, w *muxWatch, delay time.Duration) (time.Duration, error) {
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-w.wake:
		return muxMinPoll, nil
	case <-t.C:
		return min(2*delay, muxMaxPoll), nil
	case <-ctx.Done():
		return 0, ctxError(ctx)
	case <-st.closeCtx.Done():
		return 0, ErrClosed
	}
}

// slotChunk is how many slots an acquisition's first try claims; each
// further try claims twice as many of those it has not tried. Goroutines of
// one Locker taking slots of one key at once so claim some each, not all,
// and try them side by side (claiming every free slot made each wait for
// the others' round trips, and a TryLock give up on slots that were free),
// while a try that finds every slot held elsewhere still takes few round
// trips (Slots(50): 4).
const slotChunk = 4

// trySlots takes the first of keys, base's slots, that it can have at once,
// or returns an error matching ErrLocked: it claims some of the slots no
// goroutine of this Locker holds or is taking, tries them in one statement,
// and, if the server has every one of them held, the next ones.
func (st slotTaker) trySlots(ctx context.Context, base Key, keys []Key, o lockConfig) (*hold, error) {
	if !st.table.begin() {
		return nil, lockError(base, ErrClosed)
	}
	defer st.table.ops.Done()
	tried := make([]bool, len(keys))
	for chunk := slotChunk; ; chunk *= 2 {
		es, slot, err := st.claimSlots(keys, tried, chunk)
		if err != nil {
			return nil, lockError(base, err)
		}
		h, err := st.tryClaimed(ctx, base, es, slot, o)
		if err != errSlotsHeld {
			return h, err
		}
		for _, i := range slot {
			tried[i] = true
		}
	}
}

// errSlotsHeld says that the server has every slot a try claimed held.
var errSlotsHeld = errors.New("slots held")

// tryClaimed tries es, claimed slots slot of base, in one round trip, and
// keeps the first it gets; errSlotsHeld if it gets none.
func (st slotTaker) tryClaimed(ctx context.Context, base Key, es []*entry, slot []int, o lockConfig) (*hold, error) {
	if err := st.table.reserve(es[:1]); err != nil {
		st.table.abandon(es...)
		return nil, lockError(base, err)
	}
	for attempt := 1; ; attempt++ {
		claimed := entryKeys(es)
		g, err := st.trySlotsOnce(ctx, claimed)
		if primaryEnded(ctx, err) {
			g, err = st.trySlotsOnce(ctx, claimed) // once more, on a fresh session
		}
		switch {
		case err != nil:
			st.table.abandon(es...)
			return nil, lockError(base, sessionEnded(classify(err)))
		case g.i < 0:
			st.table.abandon(es...) // held on the server: nobody here could have them
			return nil, errSlotsHeld
		}
		es, slot = []*entry{st.keepWinner(es, g.i)}, slot[g.i:g.i+1]
		holds, again, err := st.keep(ctx, es, claimed[g.i:g.i+1], g.t, false, attempt)
		switch {
		case again:
			continue // taken again, as the only one claimed
		case err != nil:
			return nil, lockError(base, err)
		}
		var until time.Time
		if o.minHold > 0 {
			until = time.Now().Add(o.minHold)
		}
		st.table.setTerms(holds, base, slot[0], until)
		return holds[0], nil
	}
}

// claimSlots claims, in this process, up to limit of the slots of keys not
// tried yet that no goroutine of the Locker holds or is taking (leaving
// those it let go lately to the waiters elsewhere that wanted them); es[i]
// is slot slot[i]. If it can claim none, the error matches ErrLocked.
func (st slotTaker) claimSlots(keys []Key, tried []bool, limit int) (es []*entry, slot []int, err error) {
	for i, k := range keys {
		if len(es) == limit {
			break
		}
		if tried[i] || st.table.yielding(k) {
			continue // held on the server, or just let go and wanted elsewhere: leave it to them
		}
		_, e, _, err := st.table.claim(k, false, false)
		if errors.Is(err, ErrClosed) {
			st.table.abandon(es...)
			return nil, nil, ErrClosed
		}
		if e != nil {
			es, slot = append(es, e), append(slot, i)
		}
	}
	if len(es) == 0 {
		// Every slot is held, or being taken here, or held on the server.
		if st.table.settling(keys) {
			return nil, nil, errSlotsSettling
		}
		return nil, nil, ErrLocked
	}
	return es, slot, nil
}

// slotGot is what one try of slots got: the index of the slot taken (or
// -1), and the server's grant.
type slotGot struct {
	i int
	t grantSet
}

// trySlotsOnce tries claimed in one statement on the primary; an error is
// brokenSession if the primary's session had ended.
func (st slotTaker) trySlotsOnce(ctx context.Context, claimed []Key) (slotGot, error) {
	pl, err := st.pool.primary(ctx, false)
	if err != nil {
		return slotGot{}, err
	}
	got, token := -1, int64(0)
	q, args := slotTryStmt(claimed, st.cfg.fencing && !pl.s.pinned)
	// A fenced try may have taken its slot before the token's transaction id
	// found no room in the lock table: let go of any the statement took.
	uq, uargs := keysStmt(stmtMuxUnlock, claimed, false)
	err = st.batch.do(ctx, pl.s, &req{row: row{q: q, args: args, dest: []any{&got, &token}}, onErr: onFullUnlock(uq, uargs)})
	if err != nil {
		dead := pl.s.dead.Load()
		pl.end()
		if dead {
			err = brokenSession{err}
		}
		return slotGot{}, err
	}
	if got < 0 || got >= len(claimed) {
		pl.end()
		return slotGot{i: -1}, nil
	}
	if st.cfg.fencing && pl.s.pinned {
		if token, err = st.pool.open.token(ctx); err != nil {
			st.batch.doMany(context.Background(), pl.s, unlockReqs(claimed[got:got+1], false))
			pl.end()
			return slotGot{}, err
		}
	}
	return slotGot{i: got, t: grantSet{l: pl, tokens: []int64{token}}}, nil
}

// keepWinner keeps es[got], the slot a try took, and abandons the others,
// waking the goroutines of this Locker that may wait for them.
func (st slotTaker) keepWinner(es []*entry, got int) *entry {
	winner := es[got]
	st.table.moveCount(es[0], winner)
	others := make([]*entry, 0, len(es)-1)
	for i, e := range es {
		if i != got {
			others = append(others, e)
		}
	}
	st.table.abandon(others...)
	if len(others) > 0 {
		st.mux.freed(entryKeys(others)) // other goroutines of this Locker may wait for these
	}
	return winner
}

// entryKeys returns the keys of es.
func entryKeys(es []*entry) []Key {
	keys := make([]Key, len(es))
	for i, e := range es {
		keys[i] = e.key
	}
	return keys
}

// slotStatements caches slotTryStmt's texts by their number of keys and
// fencing.
var slotStatements sync.Map // [2]int{n, fenced} -> string

// slotTryStmt returns the statement that tries keys (pairs: slot keys) in
// order and stops at the first it gets. It returns one row: that key's
// index, or -1, and its fencing token (0 unless fenced). CASE evaluates its
// conditions in order and stops at the first true one, so no later key is
// tried:
//
//	SELECT CASE WHEN pg_try_advisory_lock($1::int4, $2::int4) THEN 0
//	            WHEN pg_try_advisory_lock($3::int4, $4::int4) THEN 1 ... ELSE -1 END, 0::bigint
func slotTryStmt(keys []Key, fenced bool) (string, []any) {
	f := 0
	if fenced {
		f = 1
	}
	args := make([]any, 0, 2*len(keys))
	for _, k := range keys {
		a, b, _ := k.Int32s()
		args = append(args, a, b)
	}
	if q, ok := slotStatements.Load([2]int{len(keys), f}); ok {
		return q.(string), args
	}
	var c strings.Builder
	c.WriteString("CASE")
	for i := range keys {
		c.WriteString(" WHEN pg_try_advisory_lock($" + strconv.Itoa(2*i+1) + "::int4, $" + strconv.Itoa(2*i+2) +
			"::int4) THEN " + strconv.Itoa(i))
	}
	c.WriteString(" ELSE -1 END")
	q := "SELECT " + c.String() + ", 0::bigint"
	if fenced {
		q = "SELECT s, CASE WHEN s >= 0 THEN pg_current_xact_id()::text::bigint ELSE 0 END FROM (SELECT " +
			c.String() + " AS s OFFSET 0) x"
	}
	slotStatements.Store([2]int{len(keys), f}, q)
	return q, args
}
