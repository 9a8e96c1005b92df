package pglocks

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
)

// table is a Locker's in-process lock table: which keys this process holds
// or is taking, on which session, with which handles, and which goroutines
// wait in this process for them. It arbitrates the Locker's goroutines
// (PostgreSQL would let one session take its own lock twice): they exclude
// each other as separate sessions would, first come first served, and
// goroutines taking a key shared join a shared hold the Locker already has.
// It also counts the keys held on the server for WithMaxLocks.
//
// It does no I/O. Its methods decide (grant, queue, hand over) and say what
// the caller must do on the server; the callers do it.
type table struct {
	owner  *Locker // what handles are made for: opaque here
	mu     sync.Mutex
	keys   map[Key]*entry
	on     map[*holder]map[*entry]struct{} // the entries held on each session
	held   int                             // keys held, or being taken or released, on the server
	max    int                             // WithMaxLocks
	closed bool
	// ops counts what Close waits for: acquisitions, releases, a leader's
	// naming (see begin).
	ops sync.WaitGroup
	// nHeld counts the keys held on the server by mode ([1]: shared), and
	// queued the goroutines in entries' queues, for Stat.
	nHeld  [2]int
	queued int
	// yields are the keys let go lately that waiters elsewhere wanted
	// (see yielding).
	yields map[Key]time.Time
	// recent remembers keys released lately, for a notification that asks
	// for one just after it was let go (see Locker.heard).
	recent recentKeys
}

func newTable(owner *Locker, max int) *table {
	return &table{owner: owner, keys: make(map[Key]*entry), on: make(map[*holder]map[*entry]struct{}), max: max}
}

// entryState is where a key stands in this process.
type entryState uint8

const (
	stateIdle      entryState = iota // not held by this Locker
	stateAcquiring                   // one goroutine is taking it on the server
	stateHeld                        // held on the server, by e.h
	stateReleasing                   // one goroutine is releasing it on the server
)

// entry is one key that this Locker holds or that goroutines wait for.
// (Its flags are together, to keep it in a small size class.)
type entry struct {
	key     Key
	state   entryState
	shared  bool // the mode held or being acquired
	counted bool // counted in table.held
	// wanted is set when a waiter of another process asked for the key
	// while this Locker holds it: its release then notifies.
	wanted bool
	// slot is set for a slot's entry held by a Lock with Slots: its release
	// may leave it to a waiter elsewhere (see yielding).
	slot bool
	// lingering: see holdUntil.
	lingering bool
	token     int64   // the fencing token of the server's hold, or 0
	h         *holder // the session holding it, in stateHeld and stateReleasing
	locks     []*Lock // the handles sharing the server's hold: one, or several shared
	queue     []*waiter
	// holdUntil is when the server's hold may go at the earliest (MinHold);
	// lingering is set once its last handle is released before then, and
	// linger is the timer that ends it (stopped when the entry goes idle).
	holdUntil time.Time
	linger    *time.Timer
}

// waiter is a goroutine waiting in this process for a key.
type waiter struct {
	shared bool
	// ready receives nil when the waiter is to take the key on the server
	// itself, or the handle it was given by joining a shared hold.
	ready chan *Lock
}

// errSessionGone says that the session a grant came on was closed before
// the grant was recorded: the server freed the locks with it.
var errSessionGone = fmt.Errorf("%w: its session was closed as it was granted", ErrLockLost)

// claim arbitrates key between the goroutines of this Locker. It returns a
// handle if the caller joined a shared hold, or the key's entry in
// stateAcquiring for the caller to take on the server (then grant or
// abandon it), or, if wait is set and the key is busy in this process, a
// waiter queued for it (see leave). Without wait a busy key is ErrLocked.
func (t *table) claim(key Key, shared, wait bool) (*Lock, *entry, *waiter, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, nil, nil, ErrClosed
	}
	e := t.keys[key]
	if e == nil {
		e = &entry{key: key}
		t.keys[key] = e
	}
	if len(e.queue) == 0 {
		switch {
		case e.state == stateIdle:
			e.state, e.shared = stateAcquiring, shared
			return nil, e, nil, nil
		case e.state == stateHeld && e.shared && shared:
			return t.newLock(e), nil, nil, nil
		}
	}
	if !wait {
		t.gc(e)
		return nil, nil, nil, ErrLocked
	}
	w := &waiter{shared: shared, ready: make(chan *Lock, 1)}
	e.queue = append(e.queue, w)
	t.queued++
	return nil, e, w, nil
}

// leave takes w out of e's queue when its goroutine gives up waiting. If w
// was given its turn meanwhile, turn reports it: then w.ready holds what it
// was given, which the caller must hand back (release the handle, or
// abandon e).
func (t *table) leave(e *entry, w *waiter) (turn bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i := slices.Index(e.queue, w); i >= 0 {
		e.queue = slices.Delete(e.queue, i, i+1)
		t.queued--
		t.dispatch(e) // those behind w may be free to go now
		t.gc(e)
		return false
	}
	return true
}

// reserve counts es, which the caller has in stateAcquiring, against
// WithMaxLocks before they are taken on the server.
func (t *table) reserve(es []*entry) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.held+len(es) > t.max {
		return fmt.Errorf("%w (%d)", ErrTooManyLocks, t.max)
	}
	t.held += len(es)
	for _, e := range es {
		e.counted = true
	}
	return nil
}

// moveCount moves reserve's count from one entry the caller has in
// stateAcquiring to another (the slot it got instead).
func (t *table) moveCount(from, to *entry) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if from != to && from.counted && !to.counted {
		from.counted, to.counted = false, true
	}
}

// abandon puts entries the caller had in stateAcquiring back to stateIdle:
// their acquisition failed, and nothing of them is held.
func (t *table) abandon(es ...*entry) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range es {
		t.setIdle(e)
		t.dispatch(e)
		t.gc(e)
	}
}

// grant records that es (in stateAcquiring, reserved) are held on h, with
// their fencing tokens, and returns their handles. If h was closed since
// (h.dead), the server freed them: grant records nothing and returns
// errSessionGone, leaving es in stateAcquiring for the caller to take again
// or abandon. After close it returns ErrClosed and abandons es: Close
// clears every session of its locks.
func (t *table) grant(es []*entry, h *holder, tokens []int64) ([]*Lock, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if h.dead.Load() {
		return nil, errSessionGone
	}
	if t.closed {
		for _, e := range es {
			t.setIdle(e)
			t.dispatch(e)
			t.gc(e)
		}
		return nil, ErrClosed
	}
	on := t.on[h]
	if on == nil {
		on = make(map[*entry]struct{})
		t.on[h] = on
	}
	locks := make([]*Lock, len(es))
	for i, e := range es {
		e.state, e.h, e.token = stateHeld, h, tokens[i]
		t.nHeld[b2i(e.shared)]++
		on[e] = struct{}{}
		h.held.Add(1)
		locks[i] = t.newLock(e)
		t.dispatch(e)
	}
	return locks, nil
}

// newLock makes a handle sharing e's hold. It runs with t.mu held.
func (t *table) newLock(e *entry) *Lock {
	ctx, cancel := context.WithCancelCause(context.Background())
	lk := &Lock{l: t.owner, e: e, ctx: ctx, cancel: cancel, token: e.token, slot: -1}
	e.locks = append(e.locks, lk)
	return lk
}

// unlock is a release that must unlock on the server: the key's statement
// runs on h, and notifies (see entry.wanted) if notify is set.
type unlock struct {
	lk     *Lock
	e      *entry
	h      *holder
	shared bool
	notify bool
}

// granted finishes the handles an acquisition made: for a Lock with Slots
// it records the key asked for and the slot (slot >= 0), and for MinHold
// it makes the server's hold last at least until until (the entry lingers
// past its last handle's release). A handle lost since its grant is left
// alone: its entry may be another's by now.
func (t *table) granted(locks []*Lock, base Key, slot int, until time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, lk := range locks {
		if slot >= 0 {
			lk.base, lk.slot = base, slot
		}
		if lk.done {
			continue
		}
		if slot >= 0 {
			lk.e.slot = true
		}
		if until.After(lk.e.holdUntil) {
			lk.e.holdUntil = until
		}
	}
}

// release marks lk released. If the server's hold must go (lk was its last
// handle), it puts the entry in stateReleasing and returns the unlock to
// run, counted in t.ops, after which the caller calls released. Otherwise it
// returns nil and Release's result: nil when other handles share the hold,
// or why lk was no longer held. If the hold must last until a later time
// (MinHold), the entry lingers, held and without handles, until a timer
// calls the owner's endLinger (lingering keys count against WithMaxLocks).
func (t *table) release(lk *Lock) (u *unlock, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := lk.e
	if lk.done {
		err := lk.Err()
		switch {
		case errors.Is(err, ErrClosed):
			return nil, lockError(lk.Key(), ErrClosed)
		case errors.Is(err, ErrLockLost):
			return nil, err
		}
		return nil, lockError(lk.Key(), ErrReleased)
	}
	lk.done = true
	e.locks = slices.DeleteFunc(e.locks, func(x *Lock) bool { return x == lk })
	if t.closed {
		lk.cancel(ErrClosed) // Close releases the server's hold
		return nil, lockError(lk.Key(), ErrClosed)
	}
	if len(e.locks) > 0 {
		lk.cancel(ErrReleased) // others share the server's hold
		return nil, nil
	}
	if until := e.holdUntil; time.Now().Before(until) {
		lk.cancel(ErrReleased)
		e.lingering = true
		if e.linger == nil {
			e.linger = time.AfterFunc(time.Until(until), func() { t.owner.endLinger(e) })
		} else {
			e.linger.Reset(time.Until(until))
		}
		return nil, nil
	}
	e.state = stateReleasing
	t.ops.Add(1)
	return &unlock{lk: lk, e: e, h: e.h, shared: e.shared, notify: e.wanted}, nil
}

// endLinger ends a minimum hold that release began: it returns the unlock
// to run, or nil if the entry is held by handles again, or was lost or
// released meanwhile, or its hold was made longer since (a later endLinger
// ends it).
func (t *table) endLinger(e *entry) *unlock {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e.state != stateHeld || !e.lingering || len(e.locks) > 0 {
		return nil
	}
	if d := time.Until(e.holdUntil); d > 0 {
		e.linger.Reset(d) // made longer since
		return nil
	}
	e.linger = nil
	e.state = stateReleasing
	t.ops.Add(1)
	// No handle is left: the unlock's is a stand-in, released already.
	ctx, cancel := context.WithCancelCause(context.Background())
	cancel(ErrReleased)
	return &unlock{lk: &Lock{e: e, ctx: ctx, cancel: cancel, slot: -1}, e: e, h: e.h, shared: e.shared, notify: e.wanted}
}

// yieldFor is how long a Locker leaves a slot it let go, that a waiter
// elsewhere wanted, to that waiter: its next try comes a notification's
// round trip later than the releaser's own, which would otherwise win again
// and again (see trySlots).
const yieldFor = 3 * time.Millisecond

// settling reports whether one of keys is being taken or released by a
// goroutine of this Locker: whether it is busy here only for a moment.
func (t *table) settling(keys []Key) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		if e := t.keys[k]; e != nil && (e.state == stateAcquiring || e.state == stateReleasing) {
			return true
		}
	}
	return false
}

// yield records that slot key was let go while a waiter elsewhere wanted
// it, and forgets the yields that are over. It runs with t.mu held.
func (t *table) yield(key Key) {
	now := time.Now()
	if t.yields == nil {
		t.yields = make(map[Key]time.Time)
	}
	if len(t.yields) >= 64 {
		for k, at := range t.yields {
			if now.Sub(at) >= yieldFor {
				delete(t.yields, k)
			}
		}
	}
	t.yields[key] = now
}

// yielding reports whether key was let go less than yieldFor ago while a
// waiter elsewhere wanted it.
func (t *table) yielding(key Key) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	at, ok := t.yields[key]
	if ok && time.Since(at) >= yieldFor {
		delete(t.yields, key)
		return false
	}
	return ok
}

// released finishes an unlock: the key is no longer held by this Locker
// (if the unlock failed, its session was closed, which freed it). tell
// reports that a waiter elsewhere asked for the key while it was being
// released, after its unlock was sent without a notification: the caller
// tells it now.
func (t *table) released(u *unlock) (tell bool) {
	defer t.ops.Done()
	t.mu.Lock()
	defer t.mu.Unlock()
	e := u.e
	if on := t.on[u.h]; on != nil {
		if _, ok := on[e]; ok {
			delete(on, e)
			u.h.held.Add(-1)
		}
		if len(on) == 0 {
			delete(t.on, u.h)
		}
	}
	t.recent.add(e.key)
	u.lk.cancel(ErrReleased)
	wanted := e.wanted
	tell = wanted && !u.notify
	if wanted && e.slot {
		t.yield(e.key)
	}
	t.setIdle(e)
	t.dispatch(e)
	if e.state == stateAcquiring {
		// Handed to a goroutine of this Locker: a waiter elsewhere still
		// wants it, and must hear when this process lets it go.
		e.wanted = wanted
	}
	t.gc(e)
	return tell
}

// lost reports every lock held on h lost with cause, and forgets them: h's
// session ended, and the server freed them. Keys being released are left to
// the releasing goroutine. It returns the handles told, and how many
// minimum holds were cut short (see MinHold).
func (t *table) lost(h *holder, cause error) (told []*Lock, lingering int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for e := range t.on[h] {
		if e.state != stateHeld {
			continue // being released: released finishes it
		}
		if e.lingering && len(e.locks) == 0 {
			lingering++
			t.countLoss()
		}
		for _, lk := range e.locks {
			lk.done = true
			t.countLoss() // before Done closes, so that Stat already shows it
			lk.cancel(fmt.Errorf("pglocks: lock %v: %w: %w", lk.Key(), ErrLockLost, cause))
			told = append(told, lk)
		}
		e.locks = nil
		delete(t.on[h], e)
		h.held.Add(-1)
		t.setIdle(e)
		t.dispatch(e)
		t.gc(e)
	}
	if len(t.on[h]) == 0 {
		delete(t.on, h)
	}
	return told, lingering
}

// countLoss counts a lock lost in the owner's totals.
func (t *table) countLoss() {
	if t.owner != nil {
		t.owner.counts.losses.Add(1)
	}
}

// stat returns the keys held by mode and the goroutines queued, for Stat.
func (t *table) stat() (exclusive, shared, queued int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nHeld[0], t.nHeld[1], t.queued
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// begin counts an operation in t.ops, unless the table is closed.
func (t *table) begin() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.ops.Add(1)
	return true
}

// holderOf returns the session lk is held on, or nil once lk is done.
func (t *table) holderOf(lk *Lock) *holder {
	t.mu.Lock()
	defer t.mu.Unlock()
	if lk.done {
		return nil
	}
	return lk.e.h
}

// close refuses every claim and operation from now on (ErrClosed). It
// reports false if the table was closed already.
func (t *table) close() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.closed = true
	return true
}

func (t *table) isClosed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.closed
}

// closeAll tells every handle still held that Close released it, once Close
// has cleared the sessions.
func (t *table) closeAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.keys {
		for _, lk := range e.locks {
			lk.done = true
			lk.cancel(ErrClosed)
		}
		e.locks = nil
		if e.linger != nil {
			e.linger.Stop() // Close clears the sessions, minimum holds with them
			e.linger = nil
		}
	}
}

// want is told that a waiter in another process asks for key. If this
// Locker holds it, the key's release will notify (entry.wanted) and want
// returns false. It returns true when the key was released lately, so the
// release the waiter asks to hear of is past: the caller tells it now.
func (t *table) want(key Key) (releasedLately bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.keys[key]; e != nil && e.state != stateIdle {
		// Held, being taken, or being released (then released tells).
		e.wanted = true
		return false
	}
	// Tell once per release: a waiter that hears, tries, fails and asks
	// again must wait for the next release.
	return t.recent.take(key)
}

// dispatch lets the waiters at the front of e's queue go, as far as the
// key's state allows. It runs with t.mu held.
func (t *table) dispatch(e *entry) {
	for len(e.queue) > 0 {
		w := e.queue[0]
		switch {
		case e.state == stateIdle:
			e.queue = e.queue[1:]
			t.queued--
			e.state, e.shared = stateAcquiring, w.shared
			w.ready <- nil
			return
		case e.state == stateHeld && e.shared && w.shared:
			e.queue = e.queue[1:]
			t.queued--
			w.ready <- t.newLock(e)
		default:
			return
		}
	}
}

// setIdle puts e back in stateIdle, no longer counted against
// WithMaxLocks. It runs with t.mu held.
func (t *table) setIdle(e *entry) {
	if e.state == stateHeld || e.state == stateReleasing {
		t.nHeld[b2i(e.shared)]--
	}
	if e.counted {
		t.held--
		e.counted = false
	}
	e.state, e.h, e.token, e.wanted, e.slot = stateIdle, nil, 0, false, false
	e.holdUntil, e.lingering = time.Time{}, false
	if e.linger != nil {
		e.linger.Stop()
		e.linger = nil
	}
}

// gc forgets e when nothing refers to it any more. It runs with t.mu held.
func (t *table) gc(e *entry) {
	if e.state == stateIdle && len(e.queue) == 0 && t.keys[e.key] == e {
		delete(t.keys, e.key)
	}
}

// recentKeys remembers keys released in the last recentFor, at most
// recentMax of them.
type recentKeys struct {
	at    map[Key]time.Time
	order []recentKey // oldest first; a key may appear more than once
}

type recentKey struct {
	k  Key
	at time.Time
}

const (
	recentFor = 2 * time.Second
	recentMax = 4096
)

func (r *recentKeys) add(k Key) {
	now := time.Now()
	if r.at == nil {
		r.at = make(map[Key]time.Time)
	}
	r.at[k] = now
	r.order = append(r.order, recentKey{k, now})
	for len(r.order) > recentMax || now.Sub(r.order[0].at) >= recentFor {
		old := r.order[0]
		r.order = r.order[1:]
		if r.at[old.k].Equal(old.at) {
			delete(r.at, old.k)
		}
	}
}

// take reports whether k was released lately, and forgets it.
func (r *recentKeys) take(k Key) bool {
	ok := r.has(k)
	delete(r.at, k)
	return ok
}

func (r *recentKeys) has(k Key) bool {
	t, ok := r.at[k]
	return ok && time.Since(t) < recentFor
}
