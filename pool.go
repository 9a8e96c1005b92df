package pglocks

// pool.go: the server sessions of one Locker, at most max of them, counted,
// kept alive and given back.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// pool is the server sessions of one Locker, at most max of them, taken
// from the application's pool:
//
//   - the primary, where locks are tried and most are held (many share it),
//     and which listens for notifications;
//   - sessions that wait in the server's queue for a key held elsewhere
//     (never more than max-1, so that the primary can always be had), and
//     then hold what they waited for;
//   - spares, idle and readied, kept for the next wait while the pool can
//     spare them.
//
// It keeps them alive and checked (the heartbeat, watchers), and reports a
// session that ends or fails through its events. It knows nothing of keys.
// A session is used through a lease, which the pool counts: a session is
// given back only once every lease on it has ended and it holds no lock.
type pool struct {
	open  *opener   // takes connections from the application's pool and readies them
	watch *watchers // reads idle sessions' sockets
	ev    poolEvents
	g     *group // the Locker's background goroutines
	cfg   *config
	max   int
	stop  chan struct{} // closed by close: the heartbeat ends

	mu sync.Mutex
	st poolState // guarded by mu
}

// poolEvents is what the pool tells the layers above. Its methods are never
// called with pool.mu held.
type poolEvents interface {
	// lost: s's session ended or was closed after an error; it returns how
	// many locks were lost with it.
	lost(s *session, cause error) int
	// heard: a notification from another session came on the listening
	// session. It runs on a watcher's goroutine or a batch's: it must not
	// block, nor use the session.
	heard(n *pgconn.Notification)
	// freed: a session may have become free for a wait.
	freed()
	// busy: whether the Locker needs its primary though nothing is held
	// (goroutines wait for keys through it).
	busy() bool
}

// poolState is what pool.mu guards. Its methods run with pool.mu held.
type poolState struct {
	closed    bool
	n         int                   // sessions taken from the pool, being readied included
	waiting   int                   // sessions in a wait in the server's queue
	holders   map[*session]struct{} // every readied session not waiting nor spare
	primary   *session
	making    chan struct{} // closed when the goroutine making the primary is done
	spare     []*session    // idle readied sessions, oldest first
	changed   chan struct{} // closed and replaced when a session is given back
	seen      bool          // someone waits on changed (so signal closes it)
	lastUsed  time.Time     // when a session last became idle
	spreading bool          // a spare for tries is being readied (see primary)
	press     pressure      // armed while sessions are idle: see yield
}

// pressure is when yield next checks the pool (see pressureEvery).
type pressure struct {
	timer    *time.Timer
	every    time.Duration // the timer's interval now
	activity uint64        // the pool's activity at the last check
}

// lease is one use of a session, counted by the pool from the method that
// returned it until end.
type lease struct {
	p *pool
	s *session
}

// end ends the use; the session may go back to the pool.
func (l lease) end() { l.p.unuse(l.s) }

// pressureEvery is how soon a Locker with idle sessions checks whether the
// pool has run short, in which case it gives them back (see yield): first
// pressureEvery after a session becomes idle, and again after each
// interval, which doubles while the application does not use the pool, up
// to the heartbeat's, and starts again at pressureEvery when it does. An
// idle process wakes about once a heartbeat; a busy one is seen within
// about pressureEvery of its pool running short.
const pressureEvery = 10 * time.Millisecond

// primaryLinger is how long an idle primary or spare is kept before it goes
// back to the pool, so that a busy Locker does not ready a session for every
// lock.
const primaryLinger = 5 * time.Second

// maxSpare is how many idle, readied sessions besides the primary the Locker
// keeps for waits.
const maxSpare = 2

// waitSessionTimeout bounds how long waitSession waits for the pool.
const waitSessionTimeout = 200 * time.Millisecond

func newPool(src source, cfg *config, max int, closeCtx context.Context, g *group, ev poolEvents) *pool {
	p := &pool{open: &opener{src: src, cfg: cfg, closeCtx: closeCtx}, ev: ev, g: g, cfg: cfg, max: max,
		stop: make(chan struct{})}
	p.watch = &watchers{g: g, closeCtx: closeCtx, fail: p.fail, heard: ev.heard}
	p.st.holders = make(map[*session]struct{})
	p.st.changed = make(chan struct{})
	return p
}

// primary returns a lease on the session where locks are tried: the
// primary, a spare or a session that holds locks made primary when the
// Locker has max sessions, or a new one. One goroutine at a time readies a
// new one; the others wait for it.
//
// With spread (tries, which take nothing from the statement's session
// but its answer), a primary with a batch in flight is passed over for
// another session that holds locks or is spare and has none in flight, so
// that many goroutines are not paced by one session's round trips; if
// there is none, one more is readied in the background while the Locker
// has room for it besides a wait's (see spreadTo).
func (p *pool) primary(ctx context.Context, spread bool) (lease, error) {
	for {
		p.mu.Lock()
		if p.st.closed {
			p.mu.Unlock()
			return lease{}, ErrClosed
		}
		if s := p.st.primary; s != nil && !s.dead.Load() {
			if spread && s.inFlight() && !s.pinned {
				if o := p.st.spreadTo(s); o != nil {
					s = o
				} else if !p.st.spreading && p.st.n+1 < p.max && !p.open.exhausted() && p.g.start() {
					p.st.spreading = true
					p.st.n++
					go func() {
						defer p.g.done()
						_, _ = p.ready(p.open.closeCtx, false)
					}()
				}
			}
			s.use.users++
			p.mu.Unlock()
			return lease{p, s}, nil
		} else if s != nil {
			p.st.primary = nil // closed after an error; lose is forgetting it
		}
		wait := p.st.making
		if wait == nil {
			if s := p.st.promote(p.max); s != nil {
				s.use.users++
				p.st.primary = s
				p.mu.Unlock()
				_ = p.listen(s) // if it fails, the session is closed and its users see why
				return lease{p, s}, nil
			}
			if p.st.n >= p.max {
				// Every session is being readied or given back: wait for one.
				wait, p.st.seen = p.st.changed, true
			}
		}
		if wait != nil {
			p.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return lease{}, ctxError(ctx)
			}
		}
		p.st.making = make(chan struct{})
		p.st.n++
		p.mu.Unlock()
		return p.ready(ctx, true)
	}
}

// spreadTo returns a session to try on instead of pr, whose batch is in
// flight: one that holds locks (not a leader's) or a spare, with nothing in
// flight; nil if there is none.
func (st *poolState) spreadTo(pr *session) *session {
	for s := range st.holders {
		if s != pr && !s.dead.Load() && !s.use.marked && !s.inFlight() {
			return s
		}
	}
	if n := len(st.spare); n > 0 {
		s := st.spare[n-1]
		st.spare = st.spare[:n-1]
		st.holders[s] = struct{}{}
		return s
	}
	return nil
}

// isPrimary reports whether s is the primary now.
func (p *pool) isPrimary(s *session) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return s == p.st.primary
}

// ready readies a new session, counted in n by the caller: the primary,
// for primary, or (not primary) a spare for tries while the primary is
// busy, for primary's spread. The latter does not make the application
// wait for its pool: if none is to be had soon, there is no spare.
func (p *pool) ready(ctx context.Context, primary bool) (lease, error) {
	cancel := context.CancelFunc(func() {})
	if !primary {
		ctx, cancel = context.WithTimeout(ctx, waitSessionTimeout)
	}
	s, err := p.open.open(ctx)
	cancel()
	if err == nil && primary {
		if err = p.listen(s); err != nil {
			s.closeConn() // listen reported it failed: nothing holds it
		}
	}
	p.mu.Lock()
	if primary {
		close(p.st.making)
		p.st.making = nil
	} else {
		p.st.spreading = false
	}
	if err != nil {
		p.st.n--
		p.st.signal()
		p.mu.Unlock()
		return lease{}, err
	}
	s.use.counted = true
	if !primary {
		// Kept as spares are (given back by the heartbeat after
		// primaryLinger, or by yield), or by clear if Close has begun.
		s.use.idleSince = time.Now()
		p.st.spare = append(p.st.spare, s)
		p.armYield()
		p.st.signal()
		p.mu.Unlock()
		p.ev.freed()
		return lease{}, nil
	}
	defer p.mu.Unlock()
	s.use.users = 1
	p.st.primary = s
	p.st.holders[s] = struct{}{}
	return lease{p, s}, nil
}

// promote finds a session to make primary without taking one from the pool:
// a spare, or, once the Locker has max sessions, one that holds locks (not
// waiting, and not a leader's if another will do).
func (st *poolState) promote(max int) *session {
	if n := len(st.spare); n > 0 {
		s := st.spare[n-1]
		st.spare = st.spare[:n-1]
		st.holders[s] = struct{}{}
		return s
	}
	if st.n < max {
		return nil
	}
	var best *session
	for s := range st.holders {
		if !s.dead.Load() && (best == nil || best.use.marked && !s.use.marked) {
			best = s
		}
	}
	return best
}

// waitSession returns a lease on a session to wait on in the server's
// queue: a spare, or a new one from the pool. Unless block is set, it
// returns no session (a zero lease), and no error, when the Locker may not
// have one now: max-1 sessions wait already, or it has max sessions, or the
// pool has none to spare (taking one would wait for the application to give
// one back). The caller waits through the primary instead (multiplexed).
func (p *pool) waitSession(ctx context.Context, block bool) (lease, error) {
	p.mu.Lock()
	if p.st.closed {
		p.mu.Unlock()
		return lease{}, ErrClosed
	}
	if p.st.waiting >= p.max-1 && !block {
		p.mu.Unlock()
		return lease{}, nil
	}
	for len(p.st.spare) > 0 {
		s := p.st.spare[len(p.st.spare)-1]
		p.st.spare = p.st.spare[:len(p.st.spare)-1]
		p.st.waiting++ // reserved: the limit holds while the lock is let go
		s.use.waiting, s.use.users = true, 1
		p.mu.Unlock()
		s.enter() // a heartbeat may have left a watcher on it
		broken := s.guard.broken
		s.leave()
		if broken == nil && !s.dead.Load() {
			return lease{p, s}, nil
		}
		// Its watcher saw the session end, and closed it.
		p.mu.Lock()
		p.st.waiting--
		s.use.waiting = false
		if p.st.closed {
			p.mu.Unlock()
			return lease{}, ErrClosed
		}
	}
	if (p.st.n >= p.max || p.open.exhausted()) && !block {
		p.mu.Unlock()
		return lease{}, nil
	}
	p.st.n++
	p.st.waiting++
	p.mu.Unlock()
	return p.openWait(ctx, block)
}

// openWait readies a new session for waitSession, which counted it.
func (p *pool) openWait(ctx context.Context, block bool) (lease, error) {
	// Not for long: if the pool cannot give one soon, wait multiplexed.
	rctx, cancel := ctx, context.CancelFunc(func() {})
	if !block {
		rctx, cancel = context.WithTimeout(ctx, waitSessionTimeout)
	}
	s, err := p.open.open(rctx)
	cancel()
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		p.st.n--
		p.st.waiting--
		p.st.signal()
		if ctx.Err() == nil && rctx.Err() != nil {
			return lease{}, nil // the pool had none to spare after all
		}
		return lease{}, err
	}
	s.use.counted, s.use.waiting, s.use.users = true, true, 1
	return lease{p, s}, nil
}

// waited ends s's wait in the server's queue: it now holds what it waited
// for, and is one of the holders.
func (p *pool) waited(s *session) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s.use.waiting {
		s.use.waiting = false
		p.st.waiting--
	}
	s.use.waited = true
	if !s.dead.Load() {
		p.st.holders[s] = struct{}{}
		p.st.signal() // it may be made primary now
	}
}

// dropWait ends the lease on a wait session whose wait failed and closes it
// (see session.discard), and only then stops counting it against max; or,
// if the driver is still in the wait's statement, once stuck yields (it no
// longer counts meanwhile).
func (p *pool) dropWait(l lease, stuck <-chan error) {
	s := l.s
	p.mu.Lock()
	if s.use.waiting {
		s.use.waiting = false
		p.st.waiting--
	}
	s.dead.Store(true)
	if stuck != nil {
		// The driver may stay in the statement for long (lib/pq on a silent
		// network): it stops counting now, and is closed when it returns.
		p.st.uncount(s)
	}
	p.mu.Unlock()
	if stuck != nil {
		go func() {
			<-stuck
			s.discard(p.cfg.stmtTime)
		}()
	} else {
		s.discard(p.cfg.stmtTime)
		p.mu.Lock()
		p.st.uncount(s) // only now: it is closed
		p.mu.Unlock()
	}
	p.ev.freed()
}

// unwait ends the lease on a wait session that was not used for a wait.
func (p *pool) unwait(l lease) {
	p.mu.Lock()
	if l.s.use.waiting {
		l.s.use.waiting = false
		p.st.waiting--
	}
	p.mu.Unlock()
	l.end()
}

// lease counts a use of s, which the caller knows to be registered (it
// holds locks the caller is about to release, or it uses s already).
func (p *pool) lease(s *session) lease {
	p.mu.Lock()
	s.use.users++
	p.mu.Unlock()
	return lease{p, s}
}

// unuse ends a use of s, and gives its connection back to the pool if it
// is done with: the primary stays (the heartbeat retires it after
// primaryLinger), other sessions are kept as spares while there is room and
// the pool is not short, or go back.
func (p *pool) unuse(s *session) {
	p.mu.Lock()
	s.use.users--
	if s.use.users > 0 || s.held.Load() > 0 || s.dead.Load() {
		p.mu.Unlock()
		return
	}
	if !s.watch.listening.Load() {
		// Holding nothing, it needs no watcher: the timer armed after its
		// last statement (watchers.idle) would fire for nothing.
		s.stopIdle()
	}
	s.use.idleSince = time.Now()
	p.st.lastUsed = s.use.idleSince
	if s == p.st.primary {
		p.armYield()
		p.mu.Unlock()
		return
	}
	_, registered := p.st.holders[s]
	delete(p.st.holders, s)
	if p.st.closed {
		// A session Close does not know of yet (a wait session handed back
		// by the poller): clear gives it back.
		if !registered {
			p.st.spare = append(p.st.spare, s)
		} else {
			p.st.holders[s] = struct{}{}
		}
		p.mu.Unlock()
		return
	}
	if len(p.st.spare) < min(maxSpare, p.max-1) && !s.use.marked && !p.open.exhausted() {
		// Kept ready for the next wait; the heartbeat retires it after
		// primaryLinger.
		s.use.waited = false
		p.st.spare = append(p.st.spare, s)
		p.armYield()
		p.st.signal() // it may be made primary now
		p.mu.Unlock()
		p.ev.freed()
		return
	}
	s.dead.Store(true)
	p.mu.Unlock()
	p.retire(s)
}

// retire gives sessions, marked dead and forgotten by the caller, back to
// the pool, and only then stops counting them: the Locker never has more
// than max.
func (p *pool) retire(ss ...*session) {
	for _, s := range ss {
		s.giveBack(p.cfg.stmtTime)
	}
	p.mu.Lock()
	for _, s := range ss {
		p.st.uncount(s)
	}
	p.mu.Unlock()
	p.ev.freed()
}

// armYield makes sure yield runs soon. It runs with p.mu held.
func (p *pool) armYield() {
	if p.st.closed {
		return
	}
	p.st.press.every = pressureEvery
	if p.st.press.timer == nil {
		p.st.press.activity = p.open.src.activity()
		p.st.press.timer = time.AfterFunc(pressureEvery, p.yield)
		return
	}
	p.st.press.timer.Reset(pressureEvery)
}

// pressAgain arms yield's next check: soon while the application uses the
// pool, later and later while it does not. It runs with p.mu held.
func (p *pool) pressAgain() {
	pr := &p.st.press
	if a := p.open.src.activity(); a != pr.activity {
		pr.activity, pr.every = a, pressureEvery
	} else {
		pr.every = min(2*pr.every, max(p.cfg.hbInterval, pressureEvery))
	}
	pr.timer.Reset(pr.every)
}

// yield gives idle sessions (spares, an idle primary) back to the pool at
// once when the pool has no other to give, so that sessions kept ready for
// the Locker never make the application wait for its own pool for long. It
// runs while there are idle sessions, as pressureEvery says.
func (p *pool) yield() {
	busy := p.ev.busy()
	p.mu.Lock()
	if p.st.closed {
		p.mu.Unlock()
		return
	}
	idle := func(s *session) bool { return s != nil && s.use.users == 0 && s.held.Load() == 0 }
	if len(p.st.spare) == 0 && !idle(p.st.primary) {
		p.mu.Unlock()
		return // nothing idle: armed again when something is
	}
	if !p.open.src.exhausted() { // fresh: this is the pressure check
		p.pressAgain()
		p.mu.Unlock()
		return
	}
	retire := p.st.spare
	p.st.spare = nil
	if s := p.st.primary; idle(s) && !p.st.holding() && !busy {
		p.st.primary = nil
		delete(p.st.holders, s)
		retire = append(retire, s)
	}
	for _, s := range retire {
		s.dead.Store(true)
	}
	p.g.start() // not closed: close closes g under p.mu
	p.mu.Unlock()
	defer p.g.done()
	p.retire(retire...)
}

// holding reports whether any session holds locks.
func (st *poolState) holding() bool {
	for s := range st.holders {
		if s.held.Load() > 0 {
			return true
		}
	}
	return false
}

// uncount takes s out of n, once.
func (st *poolState) uncount(s *session) {
	if s.use.counted {
		s.use.counted = false
		st.n--
		st.signal()
	}
}

// signal wakes those waiting for a change in n.
func (st *poolState) signal() {
	if st.seen {
		close(st.changed)
		st.changed = make(chan struct{})
		st.seen = false
	}
}

// mark returns a lease on s for naming it a leader's, if it holds only what
// it waited for (see Lead); it is then not kept as a spare, since its name
// must be put back.
func (p *pool) mark(s *session) (lease, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !s.use.waited || p.st.primary == s || s.held.Load() != 1 || s.dead.Load() {
		return lease{}, false
	}
	s.use.users++
	s.use.marked = true
	return lease{p, s}, true
}

// brokenError is why a session was closed after an error (guard.broken),
// which every later statement on it gets.
type brokenError struct{ err error }

func (e brokenError) Error() string { return "connection closed after an error: " + e.err.Error() }
func (e brokenError) Unwrap() error { return e.err }

// fail closes s's session after err, reporting its locks lost first: the
// holder must hear of the loss before the server can free the locks. The
// caller holds s.sem.
func (p *pool) fail(s *session, err error) {
	s.guard.broken = brokenError{err}
	p.lose(s, sessionEnded(err))
	s.closeConn()
}

// lose marks s dead, forgets it, and reports the locks on it lost.
func (p *pool) lose(s *session, cause error) {
	p.mu.Lock()
	if s.dead.Load() {
		p.mu.Unlock()
		return
	}
	s.dead.Store(true)
	delete(p.st.holders, s)
	if p.st.primary == s {
		p.st.primary = nil
	}
	p.st.spare = slices.DeleteFunc(p.st.spare, func(x *session) bool { return x == s })
	p.st.uncount(s)
	p.mu.Unlock()
	n := p.ev.lost(s, cause)
	if n == 0 {
		p.cfg.logger.Debug("pglocks: an idle connection ended", "err", cause)
	} else {
		p.cfg.logger.Warn("pglocks: connection closed; its locks are lost", "locks", n, "err", cause)
	}
	p.ev.freed()
}

// listen makes s, the new primary, listen for the Locker's notifications,
// if its driver lets them be read.
//
// A pinned session does not listen: LISTEN does not work through
// transaction pooling, and notifications are not delivered inside a
// transaction. Multiplexed waits there are tried every muxMaxPoll at most.
func (p *pool) listen(s *session) error {
	if !s.c.watchable() || s.pinned {
		return nil
	}
	s.enter()
	defer s.leave()
	if s.watch.listening.Load() || s.guard.broken != nil {
		return s.guard.broken
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.stmtTime)
	defer cancel()
	if err := s.c.exec(ctx, sqlListen); err != nil {
		if s.use.counted {
			p.fail(s, fmt.Errorf("listen: %w", err))
		}
		return fmt.Errorf("listen: %w", err)
	}
	s.watch.listening.Store(true)
	return nil
}

// heartbeat checks every session that holds locks once per interval, starts
// watchers, retires idle sessions, and gives sessions back early when the
// pool runs short. It runs until close.
func (p *pool) heartbeat() {
	t := time.NewTicker(p.cfg.hbInterval)
	defer t.Stop()
	for {
		// Until close, not until Close begins: statements Close waits for
		// must still be cut off if their session goes silent.
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		probe, retire := p.beat(p.open.src.exhausted(), p.ev.busy())
		for _, s := range retire {
			// Not here: a silent network must not hold up the probes.
			p.g.add()
			go func() {
				defer p.g.done()
				p.retire(s)
			}()
		}
		for _, l := range probe {
			p.g.add()
			go func() {
				defer p.g.done()
				p.probe(l.s)
				l.end()
			}()
		}
	}
}

// beat takes, for one heartbeat, a lease on each session to probe and the
// idle sessions to retire (marked dead and forgotten).
func (p *pool) beat(short, busy bool) (probe []lease, retire []*session) {
	p.mu.Lock()
	defer p.mu.Unlock()
	holding := false
	for s := range p.st.holders {
		if !s.dead.Load() && (s.held.Load() > 0 || s.use.users > 0) {
			s.use.users++
			probe = append(probe, lease{p, s})
		}
		holding = holding || s.held.Load() > 0
	}
	// The primary goes once the whole Locker has been idle for a while (or
	// the pool is short), not whenever it happens to be idle: a Locker
	// whose locks live on other sessions still tries on it.
	if s := p.st.primary; s != nil && s.use.users == 0 && s.held.Load() == 0 && !holding && !busy &&
		(short || time.Since(s.use.idleSince) >= primaryLinger && time.Since(p.st.lastUsed) >= primaryLinger) {
		p.st.primary = nil
		delete(p.st.holders, s)
		s.dead.Store(true)
		retire = append(retire, s)
	}
	for len(p.st.spare) > 0 && (short || time.Since(p.st.spare[0].use.idleSince) >= primaryLinger) {
		s := p.st.spare[0]
		p.st.spare = p.st.spare[1:]
		s.dead.Store(true)
		retire = append(retire, s)
	}
	return probe, retire
}

// probe checks that s's session is alive and is still the one its locks
// were taken on. A statement already running on s is as good a check: it is
// bounded by the same timeout.
func (p *pool) probe(s *session) {
	if !s.tryEnter() {
		// A statement is running: it is the check, unless it has run too
		// long, in which case closing the socket under it makes it fail.
		if since := s.pipe.busySince.Load(); since != 0 && time.Since(time.Unix(0, since)) > p.cfg.hbTimeout {
			s.c.closeSocket()
		}
		return
	}
	if s.guard.broken != nil {
		s.leave()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.hbTimeout)
	var pid int32
	err := s.runStmt(ctx, func(ctx context.Context) error { return s.c.query(ctx, sqlBackendPID, nil, &pid) })
	cancel()
	if err == nil && pid != s.pid {
		err = fmt.Errorf("%w: the locks were taken on server session %d, the connection now reaches session %d", ErrTransactionPooling, s.pid, pid)
	}
	if err != nil {
		p.fail(s, fmt.Errorf("heartbeat: %w", err))
		s.leave()
		return
	}
	p.watch.drain(s)
	p.watch.hand(s) // until the next statement or probe
}

// cancelBackend runs pg_cancel_backend(pid) on the primary, for a driver
// that cannot send a cancel request (lib/pq): a statement on a session of
// its own is cancelled from the one the Locker tries on.
func (p *pool) cancelBackend(ctx context.Context, pid int32) error {
	l, err := p.primary(ctx, false)
	if err != nil {
		return err
	}
	defer l.end()
	s := l.s
	sctx, cancel := context.WithTimeout(ctx, p.cfg.stmtTime)
	defer cancel()
	s.enter()
	err = s.guard.broken
	if err == nil {
		var ok bool
		err = s.runStmt(sctx, func(ctx context.Context) error { return s.c.query(ctx, sqlCancel, []any{pid}, &ok) })
		if err != nil {
			p.fail(s, fmt.Errorf("cancel a wait: %w", err))
		}
		p.watch.drain(s)
	}
	s.leave()
	p.watch.idle(s) // the statement stopped its watcher
	return err
}

// stat returns how many sessions there are, how many wait in the server's
// queue and how many are spares, and whether there is a primary, for Stat.
func (p *pool) stat() (n, waiting, spare int, primary bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.st.n, p.st.waiting, len(p.st.spare), p.st.primary != nil
}

// close stops handing out sessions; the Locker then waits for its
// goroutines before calling clear.
func (p *pool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.st.closed = true
	p.g.close()
	close(p.stop)
	if p.st.press.timer != nil {
		p.st.press.timer.Stop()
	}
	for s := range p.st.holders {
		s.stopIdle()
	}
}

// clear releases every lock on every session and gives the sessions back
// (or closes those whose unlock fails), for Close, once nothing else uses
// them.
func (p *pool) clear() error {
	p.mu.Lock()
	all := make([]*session, 0, len(p.st.holders)+len(p.st.spare))
	for s := range p.st.holders {
		all = append(all, s)
	}
	all = append(all, p.st.spare...)
	p.st.holders, p.st.primary, p.st.spare = nil, nil, nil
	p.mu.Unlock()
	var errs []error
	for _, s := range all {
		if s.dead.Swap(true) {
			continue
		}
		s.stopIdle()
		cleared, err := s.unlockAll(p.cfg.stmtTime)
		if err != nil {
			errs = append(errs, err)
		}
		if cleared {
			s.giveBack(p.cfg.stmtTime)
		}
	}
	return errors.Join(errs...)
}
