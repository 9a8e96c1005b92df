package pglocks

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// A wait for a key held elsewhere takes a session of its own in the server's
// queue while the Locker may have one (WithMaxConns). Beyond that, waits are
// multiplexed: their goroutines wait in this process, and one goroutine, the
// poller, tries every awaited key together on the primary, in one statement
// per round trip:
//
//   - at once when another Locker tells, by notification, that a key it
//     released is free (see notify.go: a multiplexed waiter first says which
//     keys it wants, so that the holder knows to tell);
//   - otherwise after a backoff from muxMinPoll to muxMaxPoll, for keys
//     freed by clients that do not tell (psql, other libraries);
//   - when a session becomes free for a wait, the oldest multiplexed wait
//     moves into the server's queue on it, so that none starves behind
//     tries that the server's queue always wins (a try never jumps the
//     queue).
//
// Keys granted to multiplexed waits are held on the primary, with the
// Locker's other locks. A multiplexed wait is never queued on the server, so
// a wait that is cancelled leaves nothing there; one cancelled while its try
// is in flight waits for the try's answer and lets go of what it got.
type mux struct {
	l    *Locker
	kick chan struct{} // poll (and move waits) now

	mu               sync.Mutex
	minPoll, maxPoll time.Duration // muxMinPoll and muxMaxPoll, but for tests
	reqs             []*muxReq     // oldest first
	watches          []*muxWatch   // waits that try for themselves (Slots)
	nwatch           atomic.Int32  // len(watches), read without mu
	awaited          map[Key]int   // the keys of reqs, and how many reqs want each
	free             []Key         // keys to tell freed: wanted by another Locker just after this one let them go
}

// Backoff bounds of the poller. A key freed by a client that does not
// notify reaches its multiplexed waiter within muxMaxPoll plus a round trip.
const (
	muxMinPoll = 5 * time.Millisecond
	muxMaxPoll = 250 * time.Millisecond
)

// muxReq is one multiplexed wait: keys taken all or nothing.
type muxReq struct {
	keys      []Key
	shared    bool
	announced bool // its keys were said wanted
	inFlight  bool // in a try that has not answered yet
	cancelled bool // its goroutine gave up while it was in flight
	done      chan muxResult
}

// muxWatch is a wait that tries for itself (a wait for any of a key's
// slots): the mux says its keys are wanted, and wakes it when one may have
// freed.
type muxWatch struct {
	keys      []Key
	local     bool // see watch
	announced bool
	wake      chan struct{} // cap 1
}

// watch registers a wait for any of keys.
//
// A local watch (TryLock's) is woken only by this Locker's releases and
// tries, and does not tell other Lockers that the keys are wanted.
func (m *mux) watch(keys []Key, local bool) *muxWatch {
	w := &muxWatch{keys: keys, local: local, announced: local, wake: make(chan struct{}, 1)}
	m.mu.Lock()
	m.watches = append(m.watches, w)
	m.nwatch.Add(1)
	if !local {
		for _, k := range keys {
			m.awaited[k]++
		}
	}
	m.mu.Unlock()
	if !local {
		m.poke() // to say they are wanted
	}
	return w
}

// unwatch ends what watch began.
func (m *mux) unwatch(w *muxWatch) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if i := slices.Index(m.watches, w); i >= 0 {
		m.watches = slices.Delete(m.watches, i, i+1)
		m.nwatch.Add(-1)
		if !w.local { // a local watch is not counted in awaited
			for _, k := range w.keys {
				if m.awaited[k]--; m.awaited[k] == 0 {
					delete(m.awaited, k)
				}
			}
		}
	}
}

// wakeWatches wakes the watches that want any of keys, which may be free:
// told by another Locker (told), or let go by this one. It runs with m.mu
// held.
func (m *mux) wakeWatches(keys map[Key]bool, told bool) {
	for _, w := range m.watches {
		for _, k := range w.keys {
			if keys[k] {
				select {
				case w.wake <- struct{}{}:
				default:
				}
				if told && !w.local {
					w.announced = false // another process may take it first
				}
				break
			}
		}
	}
}

// freed is told that this Locker let keys go.
func (m *mux) freed(keys []Key) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.watches) == 0 {
		return
	}
	set := make(map[Key]bool, len(keys))
	for _, k := range keys {
		set[k] = true
	}
	m.wakeWatches(set, false)
}

// muxResult ends a multiplexed wait: the keys were granted (g), or a session
// is free for it to wait on in the server's queue (moveTo), or it failed.
type muxResult struct {
	g      grant
	moveTo *holder
	err    error
}

func newMux(l *Locker) *mux {
	return &mux{l: l, kick: make(chan struct{}, 1), minPoll: muxMinPoll, maxPoll: muxMaxPoll, awaited: make(map[Key]int)}
}

// add queues r. It runs with m.mu held.
func (m *mux) add(r *muxReq) {
	m.reqs = append(m.reqs, r)
	for _, k := range r.keys {
		m.awaited[k]++
	}
}

// remove takes r out of the queue, if it is there. It runs with m.mu held.
func (m *mux) remove(r *muxReq) bool {
	i := slices.Index(m.reqs, r)
	if i < 0 {
		return false
	}
	m.reqs = slices.Delete(m.reqs, i, i+1)
	for _, k := range r.keys {
		if m.awaited[k]--; m.awaited[k] == 0 {
			delete(m.awaited, k)
		}
	}
	return true
}

// poke makes the poller run at once.
func (m *mux) poke() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// stat returns how many multiplexed waits there are, for Stat.
func (m *mux) stat() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := len(m.watches)
	for _, r := range m.reqs {
		if !r.cancelled {
			n++
		}
	}
	return n
}

// waiting reports whether multiplexed waits are pending.
func (m *mux) waiting() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.reqs) > 0 || len(m.watches) > 0
}

// wait waits multiplexed for keys, as long as ctx allows. It returns the
// index of the key whose wait failed, if it moved into the server's queue.
func (m *mux) wait(ctx context.Context, keys []Key, o lockConfig) (grant, int, error) {
	r := &muxReq{keys: keys, shared: o.shared, done: make(chan muxResult, 1)}
	m.mu.Lock()
	m.add(r)
	m.mu.Unlock()
	m.poke()
	var err error
	select {
	case res := <-r.done:
		if res.moveTo != nil {
			return m.l.waitOn(ctx, res.moveTo, keys, o)
		}
		return res.g, 0, res.err
	case <-ctx.Done():
		err = ctxError(ctx)
	case <-m.l.closing:
		err = ErrClosed
	}
	m.mu.Lock()
	if !r.inFlight && m.remove(r) {
		m.mu.Unlock()
		return grant{}, 0, err
	}
	r.cancelled = true
	m.mu.Unlock()
	// A try is in flight, or its result came as we gave up: hand back what
	// it got.
	m.undo(<-r.done)
	return grant{}, 0, err
}

// undo hands back what a wait was given after it gave up.
func (m *mux) undo(res muxResult) {
	switch {
	case res.moveTo != nil:
		m.l.sessions.unwait(res.moveTo)
	case res.g.h != nil:
		// keys are not in the table: unlock them as the try took them.
		m.l.sessions.doMany(context.Background(), res.g.h, unlockReqs(res.g.keys, res.g.shared))
		m.l.sessions.unuse(res.g.h)
	}
}

// tellFreed has the poller tell other Lockers that keys are free.
func (m *mux) tellFreed(keys []Key) {
	m.mu.Lock()
	m.free = append(m.free, keys...)
	m.mu.Unlock()
	m.poke()
}

// heard handles a notification of another Locker's.
func (m *mux) heard(n *pgconn.Notification) {
	if n.Channel != notifyChannel {
		return
	}
	kind, keys, ok := parsePayload(n.Payload)
	if !ok {
		return
	}
	switch kind {
	case wantedMark:
		var tell []Key
		for _, k := range keys {
			if m.l.table.want(k) {
				tell = append(tell, k) // released just before the want came
			}
		}
		if len(tell) > 0 {
			m.tellFreed(tell)
		}
	case freedMark:
		m.mu.Lock()
		wanted := false
		for _, k := range keys {
			wanted = wanted || m.awaited[k] > 0
		}
		if wanted {
			// If another process takes the key first, its holder must hear
			// that we want it: say so again with the next try.
			freed := make(map[Key]bool, len(keys))
			for _, k := range keys {
				freed[k] = true
			}
			for _, r := range m.reqs {
				for _, k := range r.keys {
					if freed[k] {
						r.announced = false
					}
				}
			}
			m.wakeWatches(freed, true)
		}
		m.mu.Unlock()
		if wanted {
			m.poke()
		}
	}
}

// run is the poller. It runs until Close.
func (m *mux) run() {
	defer m.l.bg.Done()
	t := time.NewTimer(time.Hour)
	t.Stop()
	delay := muxMinPoll
	for {
		m.mu.Lock()
		idle := len(m.reqs) == 0 && len(m.free) == 0 && !m.unannounced()
		minPoll, maxPoll := m.minPoll, m.maxPoll
		m.mu.Unlock()
		delay = max(delay, minPoll)
		if idle {
			delay = minPoll
		} else {
			t.Reset(delay)
		}
		select {
		case <-m.kick:
			delay = minPoll
		case <-t.C:
		case <-m.l.closing:
			t.Stop()
			m.failAll(ErrClosed)
			return
		}
		t.Stop()
		m.move()
		if m.poll() {
			delay = minPoll
		} else {
			delay = min(2*delay, maxPoll)
		}
		m.move()
	}
}

// move hands free wait sessions to the oldest multiplexed waits.
func (m *mux) move() {
	for m.l.closeCtx.Err() == nil {
		m.mu.Lock()
		var r *muxReq
		for _, x := range m.reqs {
			if !x.inFlight && !x.cancelled {
				r = x
				break
			}
		}
		m.mu.Unlock()
		if r == nil {
			return
		}
		w, err := m.l.sessions.waitSession(m.l.closeCtx, false)
		if w == nil || err != nil {
			return
		}
		m.mu.Lock()
		if r.inFlight || r.cancelled || !m.remove(r) {
			m.mu.Unlock()
			m.l.sessions.unwait(w)
			continue
		}
		r.done <- muxResult{moveTo: w}
		m.mu.Unlock()
	}
}

// failAll ends every multiplexed wait with err.
func (m *mux) failAll(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range slices.Clone(m.reqs) {
		if !r.inFlight {
			m.remove(r)
			r.done <- muxResult{err: err}
		}
	}
}

// poll sends what is pending in one round trip on the primary: the keys
// newly wanted, the keys to tell freed, and a try of every awaited key. It
// reports whether anything was granted.
func (m *mux) poll() bool {
	m.mu.Lock()
	pending := len(m.free) > 0 || m.unannounced()
	for _, r := range m.reqs {
		pending = pending || !r.inFlight && !r.cancelled
	}
	m.mu.Unlock()
	if !pending {
		return false
	}
	// The session first: waits that give up while it is being had (the
	// pool may be short) are not in flight, and go at once.
	ctx := m.l.closeCtx
	h, err := m.l.sessions.primaryHolder(ctx)
	if err != nil {
		// Nothing was sent. Waits go on (their ctx bounds them), unless
		// trying again cannot help.
		if errors.Is(err, ErrStandby) || errors.Is(err, ErrTransactionPooling) || errors.Is(err, ErrClosed) {
			m.failAll(err)
		} else {
			m.l.cfg.logger.Debug("pglocks: multiplexed waits: no session", "err", err)
		}
		return false
	}
	defer m.l.sessions.unuse(h)
	m.mu.Lock()
	var batch []*muxReq
	var announce []Key
	for _, r := range m.reqs {
		if r.inFlight || r.cancelled {
			continue
		}
		r.inFlight = true
		batch = append(batch, r)
		if !r.announced {
			r.announced = true
			announce = append(announce, r.keys...)
		}
	}
	for _, w := range m.watches {
		if !w.announced {
			w.announced = true
			announce = append(announce, w.keys...)
		}
	}
	free := m.free
	m.free = nil
	m.mu.Unlock()
	if len(batch) == 0 && len(free) == 0 && len(announce) == 0 {
		return false
	}
	var rs []*req
	for _, p := range append(payloads(wantedMark, announce), payloads(freedMark, free)...) {
		rs = append(rs, notifyReq(p))
	}
	// One try per mode for the waits of one key, one per wait of several
	// (all or nothing).
	type try struct {
		reqs []*muxReq
		got  string
		r    *req
	}
	var tries []*try
	singles := map[bool]*try{}
	for _, r := range batch {
		if len(r.keys) == 1 {
			t := singles[r.shared]
			if t == nil {
				t = &try{}
				singles[r.shared] = t
				tries = append(tries, t)
			}
			t.reqs = append(t.reqs, r)
			continue
		}
		tries = append(tries, &try{reqs: []*muxReq{r}})
	}
	for _, t := range tries {
		var keys []Key
		for _, r := range t.reqs {
			keys = append(keys, r.keys...)
		}
		shared := t.reqs[0].shared
		q, args := keysStmt(stmtMuxTry, keys, shared)
		t.r = &req{row: row{q: q, args: args, dest: []any{&t.got}},
			onErr: func(sctx context.Context, err error) error {
				if sqlState(err) != stateOutOfMemory {
					return err
				}
				// The lock table filled up during the statement: the keys it
				// had tried before stay held (session locks outlive a failed
				// statement). Let them all go; none is held otherwise.
				uq, uargs := keysStmt(stmtMuxUnlock, keys, shared)
				var n int64
				if uerr := h.c.query(sctx, uq, uargs, &n); uerr != nil {
					return uerr
				}
				return keepConn{classify(err)}
			}}
		rs = append(rs, t.r)
	}
	m.l.sessions.doMany(ctx, h, rs)

	// What was granted, per wait; what a wait of several got partly goes
	// back.
	granted := map[*muxReq]bool{}
	partial := map[bool][]Key{}
	failed := map[*muxReq]error{}
	gotAny := false
	for _, t := range tries {
		if t.r.err != nil {
			if errors.Is(t.r.err, ErrLockTableFull) {
				for _, r := range t.reqs {
					failed[r] = t.r.err
				}
			}
			continue
		}
		got := map[Key]bool{}
		for _, f := range strings.Fields(t.got) {
			if k, ok := parseKeyString(f); ok {
				got[k] = true
			}
		}
		for _, r := range t.reqs {
			all := true
			for _, k := range r.keys {
				all = all && got[k]
			}
			if all {
				granted[r] = true
				gotAny = true
				continue
			}
			for _, k := range r.keys {
				if got[k] {
					partial[r.shared] = append(partial[r.shared], k)
				}
			}
		}
	}
	for shared, keys := range partial {
		m.l.sessions.doMany(context.Background(), h, unlockReqs(keys, shared))
	}
	var token int64
	if gotAny && m.l.cfg.fencing {
		// Read after every grant of this round, in a transaction of its
		// own: higher than the token of any earlier holder of these keys.
		if err := m.l.sessions.do(context.Background(), h, &req{row: row{q: sqlToken, dest: []any{&token}}}); err != nil {
			granted = map[*muxReq]bool{} // its session failed, and was closed: nothing is held
		}
	}
	m.finishGranted(batch, h, granted, failed, token)
	return gotAny
}

// unannounced reports whether a watch's keys are still to be said wanted.
// It runs with m.mu held.
func (m *mux) unannounced() bool {
	for _, w := range m.watches {
		if !w.announced {
			return true
		}
	}
	return false
}

// finishGranted ends the in-flight state of batch after a round on h: the
// waits granted get their keys (a use of h each), those that failed their
// error, those that gave up meanwhile what they got handed back.
func (m *mux) finishGranted(batch []*muxReq, h *holder, granted map[*muxReq]bool, failed map[*muxReq]error, token int64) {
	m.l.sessions.useN(h, len(granted)) // one for each grant handed on
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range batch {
		r.inFlight = false
		res, end := muxResult{}, false
		switch {
		case granted[r]:
			tokens := make([]int64, len(r.keys))
			for i := range tokens {
				tokens[i] = token
			}
			res, end = muxResult{g: grant{h: h, tokens: tokens, keys: r.keys, shared: r.shared}}, true
		case failed[r] != nil:
			res, end = muxResult{err: failed[r]}, true
		case r.cancelled:
			res, end = muxResult{err: context.Canceled}, true
		}
		if !end {
			continue
		}
		// A goroutine that gave up waits for done, and undoes what it was
		// given (see wait).
		m.remove(r)
		r.done <- res
	}
}
