package pglocks

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// sessions are the server sessions of one Locker, at most max of them,
// taken from its pool:
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
// session that ends or fails, with the locks the table has on it, through
// lost. It knows nothing of keys.
type sessions struct {
	src      source
	cfg      *config
	max      int
	closeCtx context.Context // cancelled by Close
	bg       *sync.WaitGroup // the Locker's background goroutines

	// Callbacks into the Locker, never called with s.mu held.
	//   lost: h's session ended or was closed after an error; it returns
	//     how many locks were lost with it.
	//   heard: a notification from another session came on the listening
	//     session. It runs on the watcher's goroutine or the batch's: it
	//     must not block, nor use the session.
	//   freed: a session may have become free for a wait.
	//   busy: whether the Locker needs its primary though nothing is
	//     held (goroutines wait for keys through it).
	lost  func(h *holder, cause error) int
	heard func(n *pgconn.Notification)
	freed func()
	busy  func() bool

	poolingOK atomic.Bool // a session of the pool was seen to be its own

	mu      sync.Mutex
	closed  bool
	n       int                  // sessions taken from the pool, being readied included
	holders map[*holder]struct{} // every readied session not waiting nor spare
	primary *holder
	making  chan struct{} // closed when the goroutine making the primary is done
	spare   []*holder     // idle readied sessions, oldest first
	waiting int           // sessions in a wait in the server's queue
	stop    chan struct{} // closed by close: the heartbeat ends
	changed chan struct{} // closed and replaced when a session is given back
	// changedSeen says someone waits on changed (so signal closes it).
	changedSeen bool
	lastUsed    time.Time   // when a session last became idle
	press       *time.Timer // armed while sessions are idle: see yield
}

// pressureEvery is how often a Locker with idle sessions checks whether the
// pool has run short, in which case it gives them back (see yield).
const pressureEvery = 10 * time.Millisecond

// primaryLinger is how long an idle primary or spare is kept before it goes
// back to the pool, so that a busy Locker does not ready a session for every
// lock.
const primaryLinger = 5 * time.Second

// idleWatchAfter is how long a session that holds locks, or listens, must
// be idle before a watcher reads its socket. A busy session is not watched
// between its statements, where stopping the watcher would cost more than
// it brings.
const idleWatchAfter = 3 * time.Millisecond

func newSessions(src source, cfg *config, max int, closeCtx context.Context, bg *sync.WaitGroup) *sessions {
	return &sessions{src: src, cfg: cfg, max: max, closeCtx: closeCtx, bg: bg,
		holders: make(map[*holder]struct{}), changed: make(chan struct{}), stop: make(chan struct{})}
}

// primaryHolder returns the session where locks are tried, with users
// incremented: the primary, a spare or a session that holds locks made
// primary when the Locker has max sessions, or a new one. One goroutine at
// a time readies a new one; the others wait for it.
func (s *sessions) primaryHolder(ctx context.Context) (*holder, error) {
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return nil, ErrClosed
		}
		if h := s.primary; h != nil && !h.dead.Load() {
			h.users++
			s.mu.Unlock()
			return h, nil
		} else if h != nil {
			s.primary = nil // closed after an error; lose is forgetting it
		}
		if wait := s.making; wait != nil {
			s.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, ctxError(ctx)
			}
		}
		if h := s.promote(); h != nil {
			h.users++
			s.primary = h
			s.mu.Unlock()
			_ = s.listen(h) // if it fails, the session is closed and h's users see why
			return h, nil
		}
		if s.n >= s.max {
			// Every session is being readied or given back: wait for one.
			changed := s.changed
			s.changedSeen = true
			s.mu.Unlock()
			select {
			case <-changed:
				continue
			case <-ctx.Done():
				return nil, ctxError(ctx)
			}
		}
		made := make(chan struct{})
		s.making = made
		s.n++
		s.mu.Unlock()

		h, err := s.ready(ctx)
		if err == nil {
			if err = s.listen(h); err != nil {
				s.closeConn(h) // listen reported it failed: nothing holds it
			}
		}
		s.mu.Lock()
		s.making = nil
		close(made)
		if err != nil {
			s.n--
			s.signal()
			s.mu.Unlock()
			return nil, err
		}
		h.counted, h.users = true, 1
		s.primary = h
		s.holders[h] = struct{}{}
		s.mu.Unlock()
		return h, nil
	}
}

// promote finds a session to make primary without taking one from the pool:
// a spare, or, once the Locker has max sessions, one that holds locks (not
// waiting, and not a leader's if another will do). It runs with s.mu held.
func (s *sessions) promote() *holder {
	if n := len(s.spare); n > 0 {
		h := s.spare[n-1]
		s.spare = s.spare[:n-1]
		s.holders[h] = struct{}{}
		return h
	}
	if s.n < s.max {
		return nil
	}
	var best *holder
	for h := range s.holders {
		if !h.dead.Load() && (best == nil || best.marked && !h.marked) {
			best = h
		}
	}
	return best
}

// waitSession returns a session to wait on in the server's queue, with
// users set to 1: a spare, or a new one from the pool. Unless block is set,
// it returns nil, and no error, when the Locker may not have one now: max-1
// sessions wait already, or it has max sessions, or the pool has none to
// spare (taking one would wait for the application to give one back). The
// caller waits through the primary instead (multiplexed).
func (s *sessions) waitSession(ctx context.Context, block bool) (*holder, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	if s.waiting >= s.max-1 && !block {
		s.mu.Unlock()
		return nil, nil
	}
	for len(s.spare) > 0 {
		h := s.spare[len(s.spare)-1]
		s.spare = s.spare[:len(s.spare)-1]
		s.waiting++ // reserved: the limit holds while the lock is let go
		h.waiting, h.users = true, 1
		s.mu.Unlock()
		h.enter() // a heartbeat may have left a watcher on it
		broken := h.broken
		h.leave()
		if broken == nil && !h.dead.Load() {
			return h, nil
		}
		// Its watcher saw the session end, and closed it.
		s.mu.Lock()
		s.waiting--
		h.waiting = false
		if s.closed {
			s.mu.Unlock()
			return nil, ErrClosed
		}
	}
	if (s.n >= s.max || s.src.exhausted()) && !block {
		s.mu.Unlock()
		return nil, nil
	}
	s.n++
	s.waiting++
	s.mu.Unlock()
	// Not for long: if the pool cannot give one soon, wait multiplexed.
	rctx, cancel := ctx, context.CancelFunc(func() {})
	if !block {
		rctx, cancel = context.WithTimeout(ctx, waitSessionTimeout)
	}
	h, err := s.ready(rctx)
	cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.n--
		s.waiting--
		s.signal()
		if ctx.Err() == nil && rctx.Err() != nil {
			return nil, nil // the pool had none to spare after all
		}
		return nil, err
	}
	h.counted, h.waiting, h.users = true, true, 1
	return h, nil
}

// maxSpare is how many idle, readied sessions besides the primary the Locker
// keeps for waits.
const maxSpare = 2

// waitSessionTimeout bounds how long waitSession waits for the pool.
const waitSessionTimeout = 200 * time.Millisecond

// waited ends h's wait in the server's queue: it now holds what it waited
// for, and is one of the holders.
func (s *sessions) waited(h *holder) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if h.waiting {
		h.waiting = false
		s.waiting--
	}
	h.waited = true
	if !h.dead.Load() {
		s.holders[h] = struct{}{}
		s.signal() // it may be made primary now
	}
}

// dropWait closes a wait session whose wait failed (see discard): now, or
// once stuck yields if the driver is still in the wait's statement (it no
// longer counts against max meanwhile).
func (s *sessions) dropWait(h *holder, stuck <-chan error) {
	s.mu.Lock()
	if h.waiting {
		h.waiting = false
		s.waiting--
	}
	h.dead.Store(true)
	s.uncount(h)
	s.mu.Unlock()
	if stuck != nil {
		go func() {
			<-stuck
			s.discard(h)
		}()
	} else {
		s.discard(h)
	}
	s.freed()
}

// unwait gives back a wait session that was not used for a wait.
func (s *sessions) unwait(h *holder) {
	s.mu.Lock()
	if h.waiting {
		h.waiting = false
		s.waiting--
	}
	s.mu.Unlock()
	s.unuse(h)
}

// use counts a use of h, which the caller knows to be registered (it holds
// locks the caller is about to release, or it uses h already).
func (s *sessions) use(h *holder) { s.useN(h, 1) }

// useN counts n uses of h.
func (s *sessions) useN(h *holder, n int) {
	s.mu.Lock()
	h.users += n
	s.mu.Unlock()
}

// unuse ends a use of h, and gives its connection back to the pool if it
// is done with: the primary stays (the heartbeat retires it after
// primaryLinger), other sessions are kept as spares while there is room and
// the pool is not short, or go back.
func (s *sessions) unuse(h *holder) {
	s.mu.Lock()
	h.users--
	if h.users > 0 || h.held.Load() > 0 || h.dead.Load() {
		s.mu.Unlock()
		return
	}
	h.idleSince = time.Now()
	s.lastUsed = h.idleSince
	if h == s.primary {
		s.armYield()
		s.mu.Unlock()
		return
	}
	_, registered := s.holders[h]
	delete(s.holders, h)
	if s.closed {
		// A session Close does not know of yet (a wait session handed back
		// by the poller): clear gives it back.
		if !registered {
			s.spare = append(s.spare, h)
		} else {
			s.holders[h] = struct{}{}
		}
		s.mu.Unlock()
		return
	}
	if len(s.spare) < min(maxSpare, s.max-1) && !h.marked && !s.src.exhausted() {
		// Kept ready for the next wait; the heartbeat retires it after
		// primaryLinger.
		h.waited = false
		s.spare = append(s.spare, h)
		s.armYield()
		s.signal() // it may be made primary now
		s.mu.Unlock()
		s.freed()
		return
	}
	h.dead.Store(true)
	s.mu.Unlock()
	s.retire(h)
}

// retire gives sessions, marked dead and forgotten by the caller, back to
// the pool, and only then stops counting them: the Locker never has more
// than max.
func (s *sessions) retire(hs ...*holder) {
	for _, h := range hs {
		s.giveBack(h)
	}
	s.mu.Lock()
	for _, h := range hs {
		s.uncount(h)
	}
	s.mu.Unlock()
	s.freed()
}

// armYield makes sure yield runs soon. It runs with s.mu held.
func (s *sessions) armYield() {
	if s.closed {
		return
	}
	if s.press == nil {
		s.press = time.AfterFunc(pressureEvery, s.yield)
		return
	}
	s.press.Reset(pressureEvery)
}

// yield gives idle sessions (spares, an idle primary) back to the pool at
// once when the pool has no other to give, so that sessions kept ready for
// the Locker never make the application wait for its own pool for long. It
// runs every pressureEvery while there are idle sessions.
func (s *sessions) yield() {
	busy := s.busy()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	idle := func(h *holder) bool { return h != nil && h.users == 0 && h.held.Load() == 0 }
	if len(s.spare) == 0 && !idle(s.primary) {
		s.mu.Unlock()
		return // nothing idle: armed again when something is
	}
	if !s.src.exhausted() {
		s.press.Reset(pressureEvery)
		s.mu.Unlock()
		return
	}
	retire := s.spare
	s.spare = nil
	if p := s.primary; idle(p) && !s.holding() && !busy {
		s.primary = nil
		delete(s.holders, p)
		retire = append(retire, p)
	}
	for _, h := range retire {
		h.dead.Store(true)
	}
	s.bg.Add(1) // s.closed is false: Close has not begun to wait
	s.mu.Unlock()
	defer s.bg.Done()
	s.retire(retire...)
}

// holding reports whether any session holds locks. It runs with s.mu held.
func (s *sessions) holding() bool {
	for h := range s.holders {
		if h.held.Load() > 0 {
			return true
		}
	}
	return false
}

// uncount takes h out of s.n, once. It runs with s.mu held.
func (s *sessions) uncount(h *holder) {
	if h.counted {
		h.counted = false
		s.n--
		s.signal()
	}
}

// signal wakes those waiting for a change in s.n. It runs with s.mu held.
func (s *sessions) signal() {
	if s.changedSeen {
		close(s.changed)
		s.changed = make(chan struct{})
		s.changedSeen = false
	}
}

// mark counts a use of h for naming it a leader's, if it holds only what
// it waited for (see ownSession); it is then not kept as a spare, since its
// name must be put back.
func (s *sessions) mark(h *holder) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !h.waited || s.primary == h || h.held.Load() != 1 || h.dead.Load() {
		return false
	}
	h.users++
	h.marked = true
	return true
}

// fail closes h's session after err, reporting its locks lost first: the
// holder must hear of the loss before the server can free the locks. The
// caller holds h.sem.
func (s *sessions) fail(h *holder, err error) {
	h.broken = fmt.Errorf("connection closed after an error: %w", err)
	s.lose(h, err)
	s.closeConn(h)
}

// lose marks h dead, forgets it, and reports the locks on it lost.
func (s *sessions) lose(h *holder, cause error) {
	s.mu.Lock()
	if h.dead.Load() {
		s.mu.Unlock()
		return
	}
	h.dead.Store(true)
	delete(s.holders, h)
	if s.primary == h {
		s.primary = nil
	}
	s.spare = slices.DeleteFunc(s.spare, func(x *holder) bool { return x == h })
	s.uncount(h)
	s.mu.Unlock()
	n := s.lost(h, cause)
	if n == 0 {
		s.cfg.logger.Debug("pglocks: an idle connection ended", "err", cause)
	} else {
		s.cfg.logger.Warn("pglocks: connection closed; its locks are lost", "locks", n, "err", cause)
	}
	s.freed()
}

// listen makes h, the new primary, listen for the Locker's notifications,
// if its driver lets them be read.
func (s *sessions) listen(h *holder) error {
	if !h.c.watchable() {
		return nil
	}
	h.enter()
	defer h.leave()
	if h.listening.Load() || h.broken != nil {
		return h.broken
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.stmtTime)
	defer cancel()
	if err := h.c.exec(ctx, sqlListen); err != nil {
		if h.counted {
			s.fail(h, fmt.Errorf("listen: %w", err))
		}
		return fmt.Errorf("listen: %w", err)
	}
	h.listening.Store(true)
	return nil
}

// heartbeat checks every session that holds locks once per interval, starts
// watchers, retires idle sessions, and gives sessions back early when the
// pool runs short. It runs until Close.
func (s *sessions) heartbeat() {
	defer s.bg.Done()
	t := time.NewTicker(s.cfg.hbInterval)
	defer t.Stop()
	for {
		// Until close, not until Close begins: statements Close waits for
		// must still be cut off if their session goes silent.
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		var probe, retire []*holder
		short := s.src.exhausted()
		busy := s.busy()
		s.mu.Lock()
		holding := false
		for h := range s.holders {
			if !h.dead.Load() && (h.held.Load() > 0 || h.users > 0) {
				h.users++
				probe = append(probe, h)
			}
			holding = holding || h.held.Load() > 0
		}
		// The primary goes once the whole Locker has been idle for a while
		// (or the pool is short), not whenever it happens to be idle: a
		// Locker whose locks live on other sessions still tries on it.
		if p := s.primary; p != nil && p.users == 0 && p.held.Load() == 0 && !holding && !busy &&
			(short || time.Since(p.idleSince) >= primaryLinger && time.Since(s.lastUsed) >= primaryLinger) {
			s.primary = nil
			delete(s.holders, p)
			p.dead.Store(true)
			retire = append(retire, p)
		}
		for len(s.spare) > 0 && (short || time.Since(s.spare[0].idleSince) >= primaryLinger) {
			p := s.spare[0]
			s.spare = s.spare[1:]
			p.dead.Store(true)
			retire = append(retire, p)
		}
		s.mu.Unlock()
		for _, h := range retire {
			// Not here: a silent network must not hold up the probes.
			s.bg.Add(1)
			go func() {
				defer s.bg.Done()
				s.retire(h)
			}()
		}
		for _, h := range probe {
			s.bg.Add(1)
			go func() {
				defer s.bg.Done()
				s.probe(h)
				s.unuse(h)
			}()
		}
	}
}

// probe checks that h's session is alive and is still the one its locks
// were taken on. A statement already running on h is as good a check: it is
// bounded by the same timeout.
func (s *sessions) probe(h *holder) {
	if !h.tryEnter() {
		// A statement is running: it is the check, unless it has run too
		// long, in which case closing the socket under it makes it fail.
		if since := h.busySince.Load(); since != 0 && time.Since(time.Unix(0, since)) > s.cfg.hbTimeout {
			h.c.closeSocket()
		}
		return
	}
	if h.broken != nil {
		h.leave()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.hbTimeout)
	var pid int32
	err := s.runStmt(ctx, h, func(ctx context.Context) error { return h.c.query(ctx, sqlBackendPID, nil, &pid) })
	cancel()
	if err == nil && pid != h.pid {
		err = fmt.Errorf("%w: the locks were taken on server session %d, the connection now reaches session %d", ErrTransactionPooling, h.pid, pid)
	}
	if err != nil {
		s.fail(h, fmt.Errorf("heartbeat: %w", err))
		h.leave()
		return
	}
	s.drain(h)
	s.watch(h) // until the next statement or probe
}

// stat returns how many sessions there are, how many wait in the server's
// queue and how many are spares, and whether there is a primary, for Stat.
func (s *sessions) stat() (n, waiting, spare int, primary bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n, s.waiting, len(s.spare), s.primary != nil
}

// close stops handing out sessions; the Locker then waits for its
// goroutines (bg) before calling clear.
func (s *sessions) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	close(s.stop)
	if s.press != nil {
		s.press.Stop()
	}
	for h := range s.holders {
		if h.idle != nil {
			h.idle.Stop()
		}
	}
}

// clear releases every lock on every session and gives the sessions back
// (or closes those whose unlock fails), for Close, once nothing else uses
// them.
func (s *sessions) clear() error {
	s.mu.Lock()
	all := make([]*holder, 0, len(s.holders)+len(s.spare))
	for h := range s.holders {
		all = append(all, h)
	}
	all = append(all, s.spare...)
	s.holders, s.primary, s.spare = nil, nil, nil
	s.mu.Unlock()
	var errs []error
	for _, h := range all {
		if h.dead.Swap(true) {
			continue
		}
		if h.idle != nil {
			h.idle.Stop()
		}
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.stmtTime)
		h.enter()
		err := h.broken
		if err == nil {
			err = s.runStmt(ctx, h, func(ctx context.Context) error { return h.c.exec(ctx, sqlUnlockAll) })
			if err != nil {
				errs = append(errs, fmt.Errorf("pglocks: close: unlock all: %w", err))
				s.closeConn(h)
			}
		}
		h.leave()
		cancel()
		if err == nil {
			s.giveBack(h)
		}
	}
	return errors.Join(errs...)
}
