package pglocks

// mux.go: the multiplexer, which waits for keys without a session of their
// own, trying them together on the primary.

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
	pool  *pool
	batch *batcher
	// want is told that a waiter elsewhere asks for a key; it reports that
	// the key was released lately (see table.want).
	want     func(Key) bool
	closeCtx context.Context // done when the Locker closes
	cfg      *config
	kick     chan struct{} // poll (and move waits) now
	nwatch   atomic.Int32  // len(st.watches), read without mu

	mu sync.Mutex
	st muxState // guarded by mu
}

// muxState is what mux.mu guards.
type muxState struct {
	minPoll, maxPoll time.Duration // muxMinPoll and muxMaxPoll, but for tests
	reqs             []*muxReq     // oldest first
	watches          []*muxWatch   // waits that try for themselves (Slots)
	awaited          map[Key]int   // the keys of reqs, and how many reqs want each
	free             []Key         // keys to tell freed: wanted by another Locker just after this one let them go
}

// Backoff bounds of the poller. A key freed by a client that does not
// notify reaches its multiplexed waiter within muxMaxPoll plus a round trip.
const (
	muxMinPoll = 5 * time.Millisecond
	muxMaxPoll = 250 * time.Millisecond
)

// muxReq is one multiplexed wait: keys taken all or nothing. Its fields
// but keys, shared and done are guarded by mux.mu.
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
// freed. announced is guarded by mux.mu.
type muxWatch struct {
	keys      []Key
	local     bool // see watch
	announced bool
	wake      chan struct{} // cap 1
}

// grantSet is what the server gave: a lease on the session the keys are held
// on, and their fencing tokens; own says that the session waited for them,
// and holds nothing else.
type grantSet struct {
	l      lease
	tokens []int64
	own    bool
	// keys and shared, for a multiplexed grant: what to let go if its
	// waiter gave up meanwhile.
	keys   []Key
	shared bool
}

// muxResult ends a multiplexed wait: the keys were granted (got), or a
// session is free for it to wait on in the server's queue (moveTo), or it
// failed.
type muxResult struct {
	got    grantSet
	moveTo lease
	err    error
}

func newMux(p *pool, b *batcher, want func(Key) bool, closeCtx context.Context, cfg *config) *mux {
	return &mux{pool: p, batch: b, want: want, closeCtx: closeCtx, cfg: cfg, kick: make(chan struct{}, 1),
		st: muxState{minPoll: muxMinPoll, maxPoll: muxMaxPoll, awaited: make(map[Key]int)}}
}

// watch registers a wait for any of keys.
//
// A local watch (TryLock's) is woken only by this Locker's releases and
// tries, and does not tell other Lockers that the keys are wanted.
func (m *mux) watch(keys []Key, local bool) *muxWatch {
	w := &muxWatch{keys: keys, local: local, announced: local, wake: make(chan struct{}, 1)}
	m.mu.Lock()
	m.st.watches = append(m.st.watches, w)
	m.nwatch.Add(1)
	if !local {
		for _, k := range keys {
			m.st.awaited[k]++
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
	if i := slices.Index(m.st.watches, w); i >= 0 {
		m.st.watches = slices.Delete(m.st.watches, i, i+1)
		m.nwatch.Add(-1)
		if !w.local { // a local watch is not counted in awaited
			m.st.forget(w.keys)
		}
	}
}

// wakeWatches wakes the watches that want any of keys, which may be free:
// told by another Locker (told), or let go by this one. It runs with m.mu
// held.
func (m *mux) wakeWatches(keys map[Key]bool, told bool) {
	for _, w := range m.st.watches {
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
	if m.nwatch.Load() == 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.wakeWatches(keySet(keys), false)
}

func keySet(keys []Key) map[Key]bool {
	set := make(map[Key]bool, len(keys))
	for _, k := range keys {
		set[k] = true
	}
	return set
}

// add queues r.
func (st *muxState) add(r *muxReq) {
	st.reqs = append(st.reqs, r)
	for _, k := range r.keys {
		st.awaited[k]++
	}
}

// remove takes r out of the queue, if it is there.
func (st *muxState) remove(r *muxReq) bool {
	i := slices.Index(st.reqs, r)
	if i < 0 {
		return false
	}
	st.reqs = slices.Delete(st.reqs, i, i+1)
	st.forget(r.keys)
	return true
}

// forget uncounts keys from awaited.
func (st *muxState) forget(keys []Key) {
	for _, k := range keys {
		if st.awaited[k]--; st.awaited[k] == 0 {
			delete(st.awaited, k)
		}
	}
}

// unannounced reports whether a watch's keys are still to be said wanted.
func (st *muxState) unannounced() bool {
	for _, w := range st.watches {
		if !w.announced {
			return true
		}
	}
	return false
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
	n := len(m.st.watches)
	for _, r := range m.st.reqs {
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
	return len(m.st.reqs) > 0 || len(m.st.watches) > 0
}

// wait waits multiplexed for keys, as long as ctx allows. It returns what
// was taken, or a lease on a session that became free for the wait: the
// caller then waits there, in the server's queue.
func (m *mux) wait(ctx context.Context, keys []Key, shared bool) (grantSet, lease, error) {
	r := &muxReq{keys: keys, shared: shared, done: make(chan muxResult, 1)}
	m.mu.Lock()
	m.st.add(r)
	m.mu.Unlock()
	m.poke()
	var err error
	select {
	case res := <-r.done:
		return res.got, res.moveTo, res.err
	case <-ctx.Done():
		err = ctxError(ctx)
	case <-m.closeCtx.Done():
		err = ErrClosed
	}
	m.mu.Lock()
	if !r.inFlight && m.st.remove(r) {
		m.mu.Unlock()
		return grantSet{}, lease{}, err
	}
	r.cancelled = true
	m.mu.Unlock()
	// A try is in flight, or its result came as we gave up: hand back what
	// it got.
	m.undo(<-r.done)
	return grantSet{}, lease{}, err
}

// undo hands back what a wait was given after it gave up.
func (m *mux) undo(res muxResult) {
	switch {
	case res.moveTo.s != nil:
		m.pool.unwait(res.moveTo)
	case res.got.l.s != nil:
		// keys are not in the table: unlock them as the try took them.
		m.batch.doMany(context.Background(), res.got.l.s, unlockReqs(res.got.keys, res.got.shared))
		res.got.l.end()
	}
}

// tellFreed has the poller tell other Lockers that keys are free.
func (m *mux) tellFreed(keys []Key) {
	m.mu.Lock()
	m.st.free = append(m.st.free, keys...)
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
			if m.want(k) {
				tell = append(tell, k) // released just before the want came
			}
		}
		if len(tell) > 0 {
			m.tellFreed(tell)
		}
	case freedMark:
		if m.heardFreed(keys) {
			m.poke()
		}
	}
}

// heardFreed is told that another Locker freed keys; it reports whether
// this one waits for any of them.
func (m *mux) heardFreed(keys []Key) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	wanted := false
	for _, k := range keys {
		wanted = wanted || m.st.awaited[k] > 0
	}
	if !wanted {
		return false
	}
	// If another process takes the key first, its holder must hear that we
	// want it: say so again with the next try.
	freed := keySet(keys)
	for _, r := range m.st.reqs {
		for _, k := range r.keys {
			if freed[k] {
				r.announced = false
			}
		}
	}
	m.wakeWatches(freed, true)
	return true
}

// run is the poller. It runs until the Locker closes.
func (m *mux) run() {
	t := time.NewTimer(time.Hour)
	t.Stop()
	delay := muxMinPoll
	for {
		m.mu.Lock()
		idle := len(m.st.reqs) == 0 && len(m.st.free) == 0 && !m.st.unannounced()
		minPoll, maxPoll := m.st.minPoll, m.st.maxPoll
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
		case <-m.closeCtx.Done():
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
	for m.closeCtx.Err() == nil {
		m.mu.Lock()
		var r *muxReq
		for _, x := range m.st.reqs {
			if !x.inFlight && !x.cancelled {
				r = x
				break
			}
		}
		m.mu.Unlock()
		if r == nil {
			return
		}
		w, err := m.pool.waitSession(m.closeCtx, false)
		if w.s == nil || err != nil {
			return
		}
		m.mu.Lock()
		if r.inFlight || r.cancelled || !m.st.remove(r) {
			m.mu.Unlock()
			m.pool.unwait(w)
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
	for _, r := range slices.Clone(m.st.reqs) {
		if !r.inFlight {
			m.st.remove(r)
			r.done <- muxResult{err: err}
		}
	}
}

// muxRound is what one round of the poller sends: the keys newly wanted,
// the keys to tell freed, and the waits to try.
type muxRound struct {
	batch    []*muxReq
	announce []Key
	free     []Key
}

// muxTry is one try of a round: one per mode for the waits of one key, one
// per wait of several (all or nothing).
type muxTry struct {
	reqs []*muxReq
	got  string
	r    *req
}

// poll sends what is pending in one round trip on the primary: the keys
// newly wanted, the keys to tell freed, and a try of every awaited key. It
// reports whether anything was granted.
func (m *mux) poll() bool {
	if !m.pending() {
		return false
	}
	// The session first: waits that give up while it is being had (the
	// pool may be short) are not in flight, and go at once.
	l, err := m.pool.primary(m.closeCtx, false)
	if err != nil {
		// Nothing was sent. Waits go on (their ctx bounds them), unless
		// trying again cannot help.
		if errors.Is(err, ErrStandby) || errors.Is(err, ErrTransactionPooling) || errors.Is(err, ErrClosed) {
			m.failAll(err)
		} else {
			m.cfg.logger.Debug("pglocks: multiplexed waits: no session", "err", err)
		}
		return false
	}
	defer l.end()
	round := m.collect()
	if l.s.pinned {
		// A notification is sent when its transaction commits: a pinned
		// session's would not be sent before it is given back.
		round.announce, round.free = nil, nil
	}
	if len(round.batch) == 0 && len(round.free) == 0 && len(round.announce) == 0 {
		return false
	}
	rs, tries := planRound(round)
	m.batch.doMany(m.closeCtx, l.s, rs)
	granted, partial, failed := readRound(tries)
	for shared, keys := range partial {
		m.batch.doMany(context.Background(), l.s, unlockReqs(keys, shared))
	}
	var token int64
	if len(granted) > 0 && m.cfg.fencing {
		var ok bool
		if token, ok = m.roundToken(l.s, granted); !ok {
			clear(granted) // nothing of them is held: they wait on
		}
	}
	m.finish(round.batch, l.s, granted, failed, token)
	return len(granted) > 0
}

// roundToken reads the fencing token of a round's grants on s, after every
// grant of the round and in a transaction of its own: higher than the token
// of any earlier holder of these keys. A pinned session's is read on
// another connection. If it cannot be read, ok is false and nothing granted
// is held: s failed and was closed, or the keys were let go.
func (m *mux) roundToken(s *session, granted map[*muxReq]bool) (token int64, ok bool) {
	if !s.pinned {
		err := m.batch.do(context.Background(), s, &req{row: row{q: sqlToken, dest: []any{&token}}})
		return token, err == nil
	}
	token, err := m.pool.open.token(m.closeCtx)
	if err == nil {
		return token, true
	}
	back := map[bool][]Key{}
	for r := range granted {
		back[r.shared] = append(back[r.shared], r.keys...)
	}
	for shared, keys := range back {
		m.batch.doMany(context.Background(), s, unlockReqs(keys, shared))
	}
	return 0, false
}

// pending reports whether a round has anything to send.
func (m *mux) pending() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.st.free) > 0 || m.st.unannounced() {
		return true
	}
	for _, r := range m.st.reqs {
		if !r.inFlight && !r.cancelled {
			return true
		}
	}
	return false
}

// collect takes what a round sends: the waits not in flight (now in
// flight), the keys to say wanted and those to tell freed.
func (m *mux) collect() muxRound {
	m.mu.Lock()
	defer m.mu.Unlock()
	var round muxRound
	for _, r := range m.st.reqs {
		if r.inFlight || r.cancelled {
			continue
		}
		r.inFlight = true
		round.batch = append(round.batch, r)
		if !r.announced {
			r.announced = true
			round.announce = append(round.announce, r.keys...)
		}
	}
	for _, w := range m.st.watches {
		if !w.announced {
			w.announced = true
			round.announce = append(round.announce, w.keys...)
		}
	}
	round.free, m.st.free = m.st.free, nil
	return round
}

// planRound builds a round's statements: its notifications, then its tries.
func planRound(round muxRound) ([]*req, []*muxTry) {
	var rs []*req
	for _, p := range append(payloads(wantedMark, round.announce), payloads(freedMark, round.free)...) {
		rs = append(rs, notifyReq(p))
	}
	var tries []*muxTry
	singles := map[bool]*muxTry{}
	for _, r := range round.batch {
		if len(r.keys) == 1 {
			t := singles[r.shared]
			if t == nil {
				t = &muxTry{}
				singles[r.shared] = t
				tries = append(tries, t)
			}
			t.reqs = append(t.reqs, r)
			continue
		}
		tries = append(tries, &muxTry{reqs: []*muxReq{r}})
	}
	for _, t := range tries {
		var keys []Key
		for _, r := range t.reqs {
			keys = append(keys, r.keys...)
		}
		shared := t.reqs[0].shared
		q, args := keysStmt(stmtMuxTry, keys, shared)
		// The keys the statement tried before the lock table filled up stay
		// held (session locks outlive a failed statement): let them all go.
		uq, uargs := keysStmt(stmtMuxUnlock, keys, shared)
		t.r = &req{row: row{q: q, args: args, dest: []any{&t.got}}, onErr: onFullUnlock(uq, uargs)}
		rs = append(rs, t.r)
	}
	return rs, tries
}

// readRound reads what a round's tries got: the waits granted, the keys
// that waits of several got in part (to let go, by mode), and the waits
// that failed for good.
func readRound(tries []*muxTry) (granted map[*muxReq]bool, partial map[bool][]Key, failed map[*muxReq]error) {
	granted, partial, failed = map[*muxReq]bool{}, map[bool][]Key{}, map[*muxReq]error{}
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
				continue
			}
			for _, k := range r.keys {
				if got[k] {
					partial[r.shared] = append(partial[r.shared], k)
				}
			}
		}
	}
	return granted, partial, failed
}

// finish ends the in-flight state of batch after a round on s: the waits
// granted get their keys (a lease on s each), those that failed their
// error, those that gave up meanwhile what they got handed back.
func (m *mux) finish(batch []*muxReq, s *session, granted map[*muxReq]bool, failed map[*muxReq]error, token int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range batch {
		r.inFlight = false
		var res muxResult
		switch {
		case granted[r]:
			tokens := make([]int64, len(r.keys))
			for i := range tokens {
				tokens[i] = token
			}
			// A lease on s for each grant handed on.
			res = muxResult{got: grantSet{l: m.pool.lease(s), tokens: tokens, keys: r.keys, shared: r.shared}}
		case failed[r] != nil:
			res = muxResult{err: failed[r]}
		case r.cancelled:
			res = muxResult{err: context.Canceled}
		default:
			continue
		}
		// A goroutine that gave up waits for done, and undoes what it was
		// given (see wait).
		m.st.remove(r)
		r.done <- res
	}
}
