package pglocks

// table.go: the in-process lock table, which arbitrates the goroutines of
// one Locker and knows what it holds on which session; no I/O.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
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
// the caller must do on the server; the callers do it. It knows handles
// only as holds: what it is given at construction (tableEvents) makes them,
// and hears of a minimum hold's end. mu guards everything but ops.
type table struct {
	mu   sync.Mutex
	keys map[Key]*entry
	on   map[*session]map[*entry]struct{} // the entries held on each session
	// spareOn is an emptied map of on, kept for the next session that
	// holds a key, so that a Lock/Release loop makes no map.
	spareOn map[*entry]struct{}
	max     int // WithMaxLocks
	closed  bool
	n       tally
	// yields are the keys let go lately that waiters elsewhere wanted
	// (see yields).
	yields yields
	// recent remembers keys released lately, for a notification that asks
	// for one just after it was let go (see want).
	recent recentKeys
	ev     tableEvents
	// ops counts what Close waits for: acquisitions, releases, a leader's
	// naming (see begin).
	ops sync.WaitGroup
}

// tally is what the table counts.
type tally struct {
	held   int    // keys held, or being taken or released, on the server: WithMaxLocks
	byMode [2]int // keys held on the server by mode ([1]: shared), for Stat
	queued int    // goroutines in entries' queues, for Stat
}

// tableEvents is what the table is given to make handles and to tell of
// what happens without a caller: a minimum hold's end, a loss.
type tableEvents struct {
	// newHold makes a handle's hold, which the table fills in.
	newHold func() *hold
	// lingerEnd is called, on a timer's goroutine, when a minimum hold
	// that outlived its handles may end (see release).
	lingerEnd func(e *entry)
	// losses counts the locks lost.
	losses *atomic.Int64
}

func newTable(max int, ev tableEvents) *table {
	return &table{keys: make(map[Key]*entry), on: make(map[*session]map[*entry]struct{}), max: max, ev: ev}
}

// hold is one handle's share of the server's hold of a key (a Lock embeds
// one): several goroutines that share a key in shared mode have a hold each.
// done, base and slot are guarded by table.mu (base and slot are set before
// the hold is handed out); the rest is set when it is made.
type hold struct {
	e      *entry
	ctx    context.Context // done once the lock is released or lost
	cancel context.CancelCauseFunc
	done   bool // guarded by table.mu: released, lost or closed
	token  int64
	// For a lock taken with Slots: the key asked for, and the slot held
	// (e is the slot's entry); slot is -1 otherwise.
	base Key
	slot int
	// handle is what newHold made the hold for (a *Lock): opaque here.
	handle any
}

// key is the hold's key: for a slot, the key asked for.
func (h *hold) key() Key {
	if h.slot >= 0 {
		return h.base
	}
	return h.e.key
}

// entryState is where a key stands in this process.
type entryState uint8

const (
	stateIdle      entryState = iota // not held by this Locker
	stateAcquiring                   // one goroutine is taking it on the server
	stateHeld                        // held on the server, by e.s
	stateReleasing                   // one goroutine is releasing it on the server
)

// entry is one key that this Locker holds or that goroutines wait for. Its
// fields are guarded by table.mu. (Its flags are together, to keep it in a
// small size class.)
type entry struct {
	key     Key
	state   entryState
	shared  bool // the mode held or being acquired
	counted bool // counted in tally.held
	// wanted is set when a waiter of another process asked for the key
	// while this Locker holds it: its release then notifies.
	wanted bool
	// slot is set for a slot's entry held by a Lock with Slots: its release
	// may leave it to a waiter elsewhere (see yields).
	slot   bool
	token  int64    // the fencing token of the server's hold, or 0
	s      *session // the session holding it, in stateHeld and stateReleasing
	holds  []*hold  // the handles sharing the server's hold: one, or several shared
	queue  []*waiter
	linger lingerState
	// unlock is, in stateReleasing, the unlock posted (see post), until it
	// has run; in stateAcquiring, a posted unlock of the key on the session
	// named in it that this acquisition follows (see claim).
	unlock *pendingUnlock
}

// lingerState is how long the server's hold of an entry must last (MinHold):
// until is when it may go at the earliest; lingering is set once its last
// handle is released before then, and timer ends it (stopped when the entry
// goes idle).
type lingerState struct {
	until     time.Time
	lingering bool
	timer     *time.Timer
}

// waiter is a goroutine waiting in this process for a key; it is in its
// entry's queue (guarded by table.mu) until ready receives.
type waiter struct {
	shared bool
	// ready receives nil when the waiter is to take the key on the server
	// itself, or the hold it was given by joining a shared hold.
	ready chan *hold
}

// errSessionGone says that the session a grant came on was closed before
// the grant was recorded: the server freed the locks with it.
var errSessionGone = fmt.Errorf("%w as it was granted", ErrLockLost)

// claim arbitrates key between the goroutines of this Locker. It returns a
// hold if the caller joined a shared hold, or the key's entry in
// stateAcquiring for the caller to take on the server (then record or
// abandon it), or, if wait is set and the key is busy in this process, a
// waiter queued for it (see leave). Without wait a busy key is ErrLocked.
func (t *table) claim(key Key, shared, wait bool) (*hold, *entry, *waiter, error) {
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
			return t.join(e), nil, nil, nil
		case e.state == stateReleasing && e.unlock != nil:
			// Its unlock is posted but has not run: the key's entry is
			// made anew for the caller, whose statement sent after the
			// unlock on its session sees the key free. e is left to its
			// unlock (released finds it replaced), and its count against
			// WithMaxLocks passes on: the key is held once.
			n := &entry{key: key, state: stateAcquiring, shared: shared, unlock: e.unlock, wanted: e.wanted}
			n.counted, e.counted = e.counted, false
			t.keys[key] = n
			return nil, n, nil, nil
		}
	}
	if !wait {
		t.gc(e)
		return nil, nil, nil, ErrLocked
	}
	w := &waiter{shared: shared, ready: make(chan *hold, 1)}
	e.queue = append(e.queue, w)
	t.n.queued++
	return nil, e, w, nil
}

// post records that u's unlock will be queued and run without its caller
// waiting (see releaser.releaseNoWait): until then, a goroutine of this
// Locker may take the key behind it (see claim). It refuses, reporting
// false, when goroutines wait in this process for the key already: they
// are let go only once the unlock has run, which had better be now.
func (t *table) post(u *pendingUnlock) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(u.e.queue) > 0 || u.released {
		return false
	}
	u.e.unlock = u
	return true
}

// leave takes w out of e's queue when its goroutine gives up waiting. If w
// was given its turn meanwhile, turn reports it: then w.ready holds what it
// was given, which the caller must hand back (release the hold, or abandon
// e).
func (t *table) leave(e *entry, w *waiter) (turn bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i := slices.Index(e.queue, w); i >= 0 {
		e.queue = slices.Delete(e.queue, i, i+1)
		t.n.queued--
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
	more := 0
	for _, e := range es {
		more += b2i(!e.counted)
	}
	if t.n.held+more > t.max {
		held := t.n.byMode[0] + t.n.byMode[1]
		return fmt.Errorf("%w (%d): %d held, %d being taken or waited for", ErrTooManyLocks, t.max, held, t.n.held-held)
	}
	for _, e := range es {
		if !e.counted { // already, for an entry that follows a posted unlock
			e.counted = true
			t.n.held++
		}
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

// record records that es (in stateAcquiring, reserved) are held on s, with
// their fencing tokens, and returns their holds. If s was closed since
// (s.dead), the server freed them: record records nothing and returns
// errSessionGone, leaving es in stateAcquiring for the caller to take again
// or abandon. After close it returns ErrClosed and abandons es: Close
// clears every session of its locks.
func (t *table) record(es []*entry, s *session, tokens []int64) ([]*hold, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s.dead.Load() {
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
	on := t.on[s]
	if on == nil {
		on, t.spareOn = t.spareOn, nil
		if on == nil {
			on = make(map[*entry]struct{})
		}
		t.on[s] = on
	}
	holds := make([]*hold, len(es))
	for i, e := range es {
		e.state, e.s, e.token, e.unlock = stateHeld, s, tokens[i], nil
		t.n.byMode[b2i(e.shared)]++
		on[e] = struct{}{}
		s.held.Add(1)
		holds[i] = t.join(e)
		t.dispatch(e)
	}
	return holds, nil
}

// join makes a hold sharing e's. It runs with t.mu held.
func (t *table) join(e *entry) *hold {
	h := t.ev.newHold()
	h.ctx, h.cancel = context.WithCancelCause(context.Background())
	h.e, h.token, h.slot = e, e.token, -1
	e.holds = append(e.holds, h)
	return h
}

// pendingUnlock is a release that must unlock on the server: the key's statement
// runs on s, and notifies (see entry.wanted) if notify is set.
type pendingUnlock struct {
	h      *hold
	e      *entry
	s      *session
	shared bool
	notify bool
	// For an unlock posted (see releaser.releaseNoWait): its statement,
	// done once it has run, and the lease on s until then.
	r *req
	l lease
	// released is set by released (guarded by table.mu).
	released bool
}

// setTerms finishes the holds an acquisition made: for a Lock with Slots it
// records the key asked for and the slot (slot >= 0), and for MinHold it
// makes the server's hold last at least until until (the entry lingers past
// its last handle's release). A hold lost since its grant is left alone:
// its entry may be another's by now.
func (t *table) setTerms(holds []*hold, base Key, slot int, until time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, h := range holds {
		if slot >= 0 {
			h.base, h.slot = base, slot
		}
		if h.done {
			continue
		}
		if slot >= 0 {
			h.e.slot = true
		}
		if until.After(h.e.linger.until) {
			h.e.linger.until = until
		}
	}
}

// release marks h released. If the server's hold must go (h was its last
// handle), it puts the entry in stateReleasing and returns the unlock to
// run, counted in t.ops, after which the caller calls released. Otherwise it
// returns nil and Release's result: nil when other handles share the hold,
// or why h was no longer held. If the hold must last until a later time
// (MinHold), the entry lingers, held and without handles, until a timer
// calls lingerEnd (lingering keys count against WithMaxLocks). When the
// server's hold stays (shared by other handles, or lingering), prove is its
// session: nothing was sent to the server, so nothing showed that the
// session still held the key when h was released (see releaser.prove).
func (t *table) release(h *hold) (u *pendingUnlock, prove *session, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := h.e
	if h.done {
		err := context.Cause(h.ctx)
		switch {
		case errors.Is(err, ErrClosed):
			return nil, nil, lockError(h.key(), ErrClosed)
		case errors.Is(err, ErrLockLost):
			return nil, nil, err
		}
		return nil, nil, lockError(h.key(), ErrReleased)
	}
	h.done = true
	e.holds = slices.DeleteFunc(e.holds, func(x *hold) bool { return x == h })
	if t.closed {
		h.cancel(ErrClosed) // Close releases the server's hold
		return nil, nil, lockError(h.key(), ErrClosed)
	}
	if len(e.holds) > 0 {
		h.cancel(ErrReleased) // others share the server's hold
		return nil, e.s, nil
	}
	if until := e.linger.until; time.Now().Before(until) {
		h.cancel(ErrReleased)
		e.linger.lingering = true
		if e.linger.timer == nil {
			e.linger.timer = time.AfterFunc(time.Until(until), func() { t.ev.lingerEnd(e) })
		} else {
			e.linger.timer.Reset(time.Until(until))
		}
		return nil, e.s, nil
	}
	e.state = stateReleasing
	t.ops.Add(1)
	return &pendingUnlock{h: h, e: e, s: e.s, shared: e.shared, notify: e.wanted}, nil, nil
}

// endLinger ends a minimum hold that release began: it returns the unlock
// to run, or nil if the entry is held by handles again, or was lost or
// released meanwhile, or its hold was made longer since (a later lingerEnd
// ends it).
func (t *table) endLinger(e *entry) *pendingUnlock {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e.state != stateHeld || !e.linger.lingering || len(e.holds) > 0 {
		return nil
	}
	if d := time.Until(e.linger.until); d > 0 {
		e.linger.timer.Reset(d) // made longer since
		return nil
	}
	e.linger.timer = nil
	e.state = stateReleasing
	t.ops.Add(1)
	// No handle is left: the unlock's is a stand-in, released already.
	ctx, cancel := context.WithCancelCause(context.Background())
	cancel(ErrReleased)
	return &pendingUnlock{h: &hold{e: e, ctx: ctx, cancel: cancel, slot: -1}, e: e, s: e.s, shared: e.shared, notify: e.wanted}
}

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

// yielding reports whether key was let go less than yieldFor ago while a
// waiter elsewhere wanted it.
func (t *table) yielding(key Key) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.yields.has(key)
}

// released finishes an unlock: the key is no longer held by this Locker
// (if the unlock failed, its session was closed, which freed it). tell
// reports that a waiter elsewhere asked for the key while it was being
// released, after its unlock was sent without a notification: the caller
// tells it now.
func (t *table) released(u *pendingUnlock) (tell bool) {
	defer t.ops.Done()
	t.mu.Lock()
	defer t.mu.Unlock()
	e := u.e
	u.released = true
	if on := t.on[u.s]; on != nil {
		if _, ok := on[e]; ok {
			delete(on, e)
			u.s.held.Add(-1)
		}
		if len(on) == 0 {
			delete(t.on, u.s)
			t.spareOn = on // for the next session's record, without a new map
		}
	}
	t.recent.add(e.key)
	u.h.cancel(ErrReleased)
	wanted := e.wanted
	tell = wanted && !u.notify
	if wanted && e.slot {
		t.yields.add(e.key)
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

// lost reports every lock held on s lost with cause, and forgets them: s's
// session ended, and the server freed them. Keys being released are left to
// the releasing goroutine. It returns the holds told, and how many minimum
// holds were cut short (see MinHold).
func (t *table) lost(s *session, cause error) (told []*hold, lingering int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for e := range t.on[s] {
		if e.state != stateHeld {
			continue // being released: released finishes it
		}
		if e.linger.lingering && len(e.holds) == 0 {
			lingering++
			t.ev.losses.Add(1)
		}
		for _, h := range e.holds {
			h.done = true
			t.ev.losses.Add(1) // before Done closes, so that Stat already shows it
			h.cancel(lossError(h.key(), cause))
			told = append(told, h)
		}
		e.holds = nil
		delete(t.on[s], e)
		s.held.Add(-1)
		t.setIdle(e)
		t.dispatch(e)
		t.gc(e)
	}
	if len(t.on[s]) == 0 {
		delete(t.on, s)
	}
	return told, lingering
}

// stat returns the keys held by mode and the goroutines queued, for Stat.
func (t *table) stat() (exclusive, shared, queued int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.n.byMode[0], t.n.byMode[1], t.n.queued
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// begin counts an operation in t.ops, unless the table is closed; the
// caller ends it with t.ops.Done().
func (t *table) begin() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.ops.Add(1)
	return true
}

// sessionOf returns the session h is held on, or nil once h is done.
func (t *table) sessionOf(h *hold) *session {
	t.mu.Lock()
	defer t.mu.Unlock()
	if h.done {
		return nil
	}
	return h.e.s
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

// closeAll tells every hold still held that Close released it, once Close
// has cleared the sessions.
func (t *table) closeAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.keys {
		for _, h := range e.holds {
			h.done = true
			h.cancel(ErrClosed)
		}
		e.holds = nil
		if e.linger.timer != nil {
			e.linger.timer.Stop() // Close clears the sessions, minimum holds with them
			e.linger.timer = nil
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
			t.n.queued--
			e.state, e.shared = stateAcquiring, w.shared
			w.ready <- nil
			return
		case e.state == stateHeld && e.shared && w.shared:
			e.queue = e.queue[1:]
			t.n.queued--
			w.ready <- t.join(e)
		default:
			return
		}
	}
}

// setIdle puts e back in stateIdle, no longer counted against
// WithMaxLocks. It runs with t.mu held.
func (t *table) setIdle(e *entry) {
	if e.state == stateHeld || e.state == stateReleasing {
		t.n.byMode[b2i(e.shared)]--
	}
	if e.counted {
		t.n.held--
		e.counted = false
	}
	e.state, e.s, e.token, e.wanted, e.slot, e.unlock = stateIdle, nil, 0, false, false, nil
	if e.linger.timer != nil {
		e.linger.timer.Stop()
	}
	e.linger = lingerState{}
}

// gc forgets e when nothing refers to it any more. It runs with t.mu held.
func (t *table) gc(e *entry) {
	if e.state == stateIdle && len(e.queue) == 0 && t.keys[e.key] == e {
		delete(t.keys, e.key)
	}
}

// yieldFor is how long a Locker leaves a slot it let go, that a waiter
// elsewhere wanted, to that waiter: its next try comes a notification's
// round trip later than the releaser's own, which would otherwise win again
// and again (see Locker.trySlots).
const yieldFor = 3 * time.Millisecond

// yields are the slot keys let go lately while a waiter elsewhere wanted
// them; guarded by table.mu.
type yields map[Key]time.Time

// add records that slot key was let go while a waiter elsewhere wanted it,
// and forgets the yields that are over.
func (y *yields) add(key Key) {
	now := time.Now()
	if *y == nil {
		*y = make(yields)
	}
	if len(*y) >= 64 {
		for k, at := range *y {
			if now.Sub(at) >= yieldFor {
				delete(*y, k)
			}
		}
	}
	(*y)[key] = now
}

// has reports whether key was let go less than yieldFor ago.
func (y yields) has(key Key) bool {
	at, ok := y[key]
	if ok && time.Since(at) >= yieldFor {
		delete(y, key)
		return false
	}
	return ok
}
