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

// errSlotsSettling says that no slot could be tried because goroutines of
// this Locker are taking or releasing some of them.
var errSlotsSettling = fmt.Errorf("%w: slots being taken or released in this process", ErrLocked)

// maxSettle is how many times a TryLock with Slots waits for the tries of
// other goroutines of the Locker to end.
const maxSettle = 8

// lockSlot is Lock and TryLock with Slots.
func (l *Locker) lockSlot(ctx context.Context, base Key, o lockConfig, wait bool) (*Lock, error) {
	if o.slots == 1 {
		// One slot is one key: it waits in the server's queue, first come
		// first served, like any key.
		slot := base.Slot(0)
		locks, err := l.acquire(ctx, []Key{slot}, o, wait)
		if err != nil {
			// Name the key asked for, not its slot's.
			if inner := errors.Unwrap(err); inner != nil && err.Error() == lockError(slot, inner).Error() {
				err = lockError(base, inner)
			}
			return nil, err
		}
		l.table.granted(locks, base, 0, time.Time{})
		return locks[0], nil
	}
	keys := make([]Key, o.slots)
	for i := range keys {
		keys[i] = base.Slot(i)
	}
	var w *muxWatch
	delay := muxMinPoll
	for settled := 0; ; {
		lk, err := l.trySlots(ctx, base, keys, o)
		if err == nil || !errors.Is(err, ErrLocked) {
			return lk, err
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
			w = l.mux.watch(keys, !wait)
			defer l.mux.unwatch(w)
			continue
		}
		t := time.NewTimer(delay)
		select {
		case <-w.wake:
			delay = muxMinPoll
		case <-t.C:
			delay = min(2*delay, muxMaxPoll)
		case <-ctx.Done():
			t.Stop()
			return nil, lockError(base, ctxError(ctx))
		case <-l.closing:
			t.Stop()
			return nil, lockError(base, ErrClosed)
		}
		t.Stop()
	}
}

// trySlots takes the first of keys, base's slots, that it can have at once,
// in one round trip, or returns an error matching ErrLocked.
func (l *Locker) trySlots(ctx context.Context, base Key, keys []Key, o lockConfig) (*Lock, error) {
	if !l.beginCall() {
		return nil, lockError(base, ErrClosed)
	}
	defer l.endCall()
	var es []*entry
	var slot []int // es[i] is slot slot[i]
	for i, k := range keys {
		if l.table.yielding(k) {
			continue // just let go, and wanted elsewhere: leave it to them
		}
		_, e, _, err := l.table.claim(k, false, false)
		if errors.Is(err, ErrClosed) {
			l.table.abandon(es...)
			return nil, lockError(base, ErrClosed)
		}
		if e != nil {
			es, slot = append(es, e), append(slot, i)
		}
	}
	if len(es) == 0 {
		// Every slot is held or being taken here.
		if l.table.settling(keys) {
			return nil, errSlotsSettling
		}
		return nil, lockError(base, ErrLocked)
	}
	if err := l.table.reserve(es[:1]); err != nil {
		l.table.abandon(es...)
		return nil, lockError(base, err)
	}
	claimed := make([]Key, len(es))
	for i, e := range es {
		claimed[i] = e.key
	}
	for attempt := 1; ; attempt++ {
		h, err := l.sessions.primaryHolder(ctx)
		if err != nil {
			l.table.abandon(es...)
			return nil, lockError(base, err)
		}
		got, token := -1, int64(0)
		q, args := slotTryStmt(claimed, l.cfg.fencing)
		err = l.sessions.do(ctx, h, &req{row: row{q: q, args: args, dest: []any{&got, &token}},
			onErr: func(sctx context.Context, err error) error {
				if sqlState(err) != stateOutOfMemory {
					return err
				}
				// The lock table is full. A fenced try may have taken its
				// slot before the token's transaction id found no room:
				// let go of any the statement took (none is held otherwise).
				uq, uargs := keysStmt(stmtMuxUnlock, claimed, false)
				var freed string
				if uerr := h.c.query(sctx, uq, uargs, &freed); uerr != nil {
					return uerr
				}
				return keepConn{classify(err)}
			}})
		if err != nil {
			dead := h.dead.Load()
			l.sessions.unuse(h)
			if dead && attempt < 2 && ctx.Err() == nil {
				continue // the primary's session had ended: once more, on a fresh one
			}
			l.table.abandon(es...)
			return nil, lockError(base, err)
		}
		if got < 0 || got >= len(es) {
			l.sessions.unuse(h)
			l.table.abandon(es...) // held on the server: nobody here could have them
			return nil, lockError(base, ErrLocked)
		}
		winner := es[got]
		l.table.moveCount(es[0], winner)
		others := make([]*entry, 0, len(es)-1)
		for i, e := range es {
			if i != got {
				others = append(others, e)
			}
		}
		l.table.abandon(others...)
		if l.mux.nwatch.Load() > 0 && len(others) > 0 {
			// Other goroutines of this Locker may wait for these.
			keys := make([]Key, len(others))
			for i, e := range others {
				keys[i] = e.key
			}
			l.mux.freed(keys)
		}
		es = []*entry{winner}
		locks, err := l.table.grant(es, h, []int64{token})
		if err != nil {
			gone := errors.Is(err, errSessionGone)
			l.dropGrant(grant{h: h}, claimed[got:got+1], false, gone)
			if gone && attempt < 3 && ctx.Err() == nil && !l.isClosed() {
				// Taken again below, as the only one claimed.
				claimed, slot = claimed[got:got+1], slot[got:got+1]
				continue
			}
			if gone {
				l.table.abandon(es...)
			}
			return nil, lockError(base, err)
		}
		l.sessions.unuse(h)
		var until time.Time
		if o.minHold > 0 {
			until = time.Now().Add(o.minHold)
		}
		l.table.granted(locks, base, slot[got], until)
		return locks[0], nil
	}
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
