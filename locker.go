package pglocks

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgxpool"
)

// A Locker takes and holds session-level advisory locks for one process. It
// is a lock manager, not a wrapper around one connection:
//
//   - Locks are taken with pg_try_advisory_lock on a shared holder
//     connection. Held locks share the few holder connections, so holding a
//     thousand uncontended locks costs one server connection, not a thousand.
//   - Only a wait for a key that another session holds takes a connection of
//     its own, and waits inside the server's lock queue on it; once granted,
//     that connection holds the lock until it is released.
//   - PostgreSQL lets a session take a lock it already holds, so the Locker
//     arbitrates between its own goroutines: they exclude each other exactly
//     as separate sessions would, in first-come order.
//   - A connection goes back to the pool only when it holds no lock. If a
//     statement on a holder connection fails, the connection is closed (the
//     server then frees its locks) and every lock it held is reported lost.
//
// A Locker is safe for concurrent use. Create one per pool with [New] or
// [NewDB] and share it; [Locker.Close] releases everything it holds.
type Locker struct {
	src      source
	pgx      *pgxpool.Pool // set by New
	db       *sql.DB       // set by NewDB
	cfg      config
	closing  <-chan struct{} // closed by Close: closeCtx.Done()
	closeCtx context.Context // cancelled by Close
	closeNow context.CancelFunc
	calls    sync.WaitGroup // acquisitions and releases in flight
	bg       sync.WaitGroup // the heartbeat and its probes

	mu      sync.Mutex
	closed  bool
	keys    map[Key]*entry
	primary *holder       // where new locks are tried first
	making  chan struct{} // closed when the goroutine making primary is done
	holders map[*holder]struct{}
	spare   []*holder // idle readied sessions, oldest first; also in holders
	nserver int       // keys held, or being taken or released, on the server

	poolingOK atomic.Bool // a session of the pool was seen to be its own
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
type entry struct {
	key     Key
	state   entryState
	shared  bool    // the mode held or being acquired
	counted bool    // counted in Locker.nserver
	token   int64   // the fencing token of the server's hold, or 0
	h       *holder // the session holding it, in stateHeld and stateReleasing
	locks   []*Lock // the handles sharing the server's hold: one, or several shared
	queue   []*waiter
}

// waiter is a goroutine waiting in this process for a key.
type waiter struct {
	shared bool
	// ready receives nil when the waiter is to take the key on the server
	// itself, or the handle it was given by joining a shared hold.
	ready chan *Lock
}

// New returns a Locker that takes its connections from pool. The pool stays
// the caller's: the Locker never closes it, and Close leaves it usable.
func New(pool *pgxpool.Pool, opts ...Option) (*Locker, error) {
	if pool == nil {
		return nil, errors.New("pglocks: New: nil pool")
	}
	return newLocker(&Locker{src: pgxSource{pool}, pgx: pool}, opts)
}

// NewDB returns a Locker that takes its connections from db, which must be a
// PostgreSQL database (pgx's stdlib driver and lib/pq are tested). The Locker
// never closes db, and Close leaves it usable. With drivers other than pgx's
// stdlib, which cannot send a cancel request, a cancelled wait is stopped with
// pg_cancel_backend from a session the Locker holds.
func NewDB(db *sql.DB, opts ...Option) (*Locker, error) {
	if db == nil {
		return nil, errors.New("pglocks: NewDB: nil db")
	}
	return newLocker(&Locker{src: sqlSource{db}, db: db}, opts)
}

func newLocker(l *Locker, opts []Option) (*Locker, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("pglocks: nil Option")
		}
		o(&cfg)
	}
	if cfg.err != nil {
		return nil, cfg.err
	}
	if bound := cfg.serverBound(); cfg.hbInterval >= bound || cfg.hbTimeout >= bound-cfg.hbInterval {
		return nil, fmt.Errorf("pglocks: heartbeat interval+timeout (%v) must be shorter than the server keepalive bound (%v), or the server could give a lock away before its holder hears of the loss",
			cfg.hbInterval+cfg.hbTimeout, cfg.serverBound())
	}
	l.cfg = cfg
	l.closeCtx, l.closeNow = context.WithCancel(context.Background())
	l.closing = l.closeCtx.Done()
	l.keys = make(map[Key]*entry)
	l.holders = make(map[*holder]struct{})
	l.bg.Add(1)
	go l.heartbeat()
	return l, nil
}

// Lock takes key, waiting as long as ctx allows while another session or
// another goroutine of this Locker holds it in a conflicting mode. The wait
// happens in the server's lock queue, so the lock is had as soon as it is
// free. ctx's deadline is enforced by the server; when ctx ends first, Lock
// returns an error matching ctx.Err() and nothing of it stays held or queued
// on the server. (If the server does not answer the cancellation within the
// statement timeout, Lock closes the connection and returns; the server then
// drops the wait when it notices.)
//
// The wait runs on a session of its own while the Locker's other locks stay
// on theirs, so PostgreSQL's deadlock detector cannot see a cycle that runs
// through a Locker: take several locks with [Locker.LockAll], or in one
// global order with a deadline.
//
// ctx bounds the acquisition only: the lock is held until [Lock.Release], until
// [Locker.Close], or until it is lost ([Lock.Done]).
func (l *Locker) Lock(ctx context.Context, key Key, opts ...LockOption) (*Lock, error) {
	return l.acquire(ctx, key, lockOptions(opts), true)
}

// TryLock takes key if it can be had at once, and otherwise returns an error
// matching [ErrLocked]. It never waits for the lock, though it does wait (as
// ctx allows) for a connection and one round trip.
func (l *Locker) TryLock(ctx context.Context, key Key, opts ...LockOption) (*Lock, error) {
	return l.acquire(ctx, key, lockOptions(opts), false)
}

// Do runs fn while holding key, taken as [Locker.Lock] does, and releases it
// when fn returns or panics. fn's ctx is cancelled, with the loss error as its
// cause, if the lock is lost while fn runs; Do then returns an error matching
// [ErrLockLost] (joined with fn's own error).
func (l *Locker) Do(ctx context.Context, key Key, fn func(ctx context.Context) error, opts ...LockOption) error {
	if fn == nil {
		return lockError(key, errNilFunc)
	}
	lk, err := l.Lock(ctx, key, opts...)
	if err != nil {
		return err
	}
	return lk.run(ctx, fn)
}

// TryDo is [Locker.Do] with [Locker.TryLock]: if key cannot be had at once it
// returns an error matching [ErrLocked] and does not run fn.
func (l *Locker) TryDo(ctx context.Context, key Key, fn func(ctx context.Context) error, opts ...LockOption) error {
	if fn == nil {
		return lockError(key, errNilFunc)
	}
	lk, err := l.TryLock(ctx, key, opts...)
	if err != nil {
		return err
	}
	return lk.run(ctx, fn)
}

// Close releases every lock the Locker holds, makes Lock calls still waiting
// return [ErrClosed], waits for its goroutines to stop and gives its
// connections back to the pool (a connection whose locks cannot be released is
// closed instead). One exception: with a driver that cannot interrupt a
// statement on a silent network (lib/pq), a connection whose statement was
// abandoned is closed by a goroutine when the driver returns, which may be
// after Close. Handles of released locks report [ErrClosed] from Err.
// Every call after Close, Close included, returns an error matching ErrClosed.
func (l *Locker) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return fmt.Errorf("pglocks: %w", ErrClosed)
	}
	l.closed = true
	l.closeNow()
	l.mu.Unlock()

	l.calls.Wait()
	l.bg.Wait() // nothing else touches holders after this

	l.mu.Lock()
	holders := l.holders
	keys := l.keys
	l.holders, l.keys, l.primary, l.spare = nil, nil, nil, nil
	l.mu.Unlock()

	var errs []error
	for h := range holders {
		if h.dead {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), l.cfg.stmtTime)
		h.enter()
		err := l.runStmt(ctx, h, func(ctx context.Context) error { return h.c.exec(ctx, sqlUnlockAll) })
		h.leave()
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("pglocks: close: unlock all: %w", err))
			l.closeConn(h)
			continue
		}
		l.giveBack(h)
	}
	l.mu.Lock()
	for _, e := range keys {
		for _, lk := range e.locks {
			lk.done = true
			lk.cancel(ErrClosed)
		}
	}
	l.mu.Unlock()
	return errors.Join(errs...)
}

// acquire is Lock (wait) and TryLock (!wait).
func (l *Locker) acquire(ctx context.Context, key Key, o lockConfig, wait bool) (*Lock, error) {
	switch {
	case ctx == nil:
		return nil, lockError(key, errNilContext)
	case !key.valid():
		return nil, lockError(key, ErrInvalidKey)
	case ctx.Err() != nil:
		return nil, lockError(key, ctxError(ctx))
	}
	if !l.beginCall() {
		return nil, lockError(key, ErrClosed)
	}
	defer l.calls.Done()
	lk, e, err := l.claim(ctx, key, o, wait)
	if lk != nil || err != nil {
		return lk, err
	}
	return l.acquireServer(ctx, e, o, wait)
}

// isClosed reports whether Close was called.
func (l *Locker) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// beginCall counts an acquisition in l.calls, unless l is closed.
func (l *Locker) beginCall() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.calls.Add(1)
	return true
}

// claim arbitrates key between the goroutines of this Locker. It returns a
// handle if the caller joined a shared hold that the Locker already has, or
// else key's entry, put in stateAcquiring for the caller to take it on the
// server (or to give it back with unclaim).
func (l *Locker) claim(ctx context.Context, key Key, o lockConfig, wait bool) (*Lock, *entry, error) {
	l.mu.Lock()
	e := l.keys[key]
	if e == nil {
		e = &entry{key: key}
		l.keys[key] = e
	}
	if len(e.queue) == 0 {
		switch {
		case e.state == stateIdle:
			e.state, e.shared = stateAcquiring, o.shared
			l.mu.Unlock()
			return nil, e, nil
		case e.state == stateHeld && e.shared && o.shared:
			lk := l.newLockLocked(e)
			l.mu.Unlock()
			return lk, nil, nil
		}
	}
	if !wait {
		l.gc(e)
		l.mu.Unlock()
		return nil, nil, lockError(key, ErrLocked)
	}
	w := &waiter{shared: o.shared, ready: make(chan *Lock, 1)}
	e.queue = append(e.queue, w)
	l.mu.Unlock()

	var err error
	select {
	case lk := <-w.ready:
		if lk != nil {
			return lk, nil, nil
		}
		return nil, e, nil
	case <-ctx.Done():
		err = ctxError(ctx)
	case <-l.closing:
		err = ErrClosed
	}
	l.mu.Lock()
	if i := slices.Index(e.queue, w); i >= 0 {
		e.queue = slices.Delete(e.queue, i, i+1)
		l.dispatch(e) // those behind us may be free to go now
		l.gc(e)
		l.mu.Unlock()
		return nil, nil, lockError(key, err)
	}
	l.mu.Unlock()
	// We were granted our turn as we gave up: hand it on.
	if lk := <-w.ready; lk != nil {
		_ = lk.Release(context.WithoutCancel(ctx))
	} else {
		l.unclaim(e)
	}
	return nil, nil, lockError(key, err)
}

// unclaim gives back an entry that claim put in stateAcquiring.
func (l *Locker) unclaim(e *entry) {
	l.mu.Lock()
	l.setIdle(e)
	l.dispatch(e)
	l.gc(e)
	l.mu.Unlock()
}

// acquireServer takes e's key on the server for a goroutine that has e in
// stateAcquiring.
func (l *Locker) acquireServer(ctx context.Context, e *entry, o lockConfig, wait bool) (*Lock, error) {
	l.mu.Lock()
	if l.nserver >= l.cfg.maxLocks {
		l.setIdle(e)
		l.dispatch(e)
		l.gc(e)
		l.mu.Unlock()
		return nil, lockError(e.key, fmt.Errorf("%w (%d)", ErrTooManyLocks, l.cfg.maxLocks))
	}
	l.nserver++
	e.counted = true
	l.mu.Unlock()
	for attempt := 1; ; attempt++ {
		h, token, err := l.serverLock(ctx, e.key, o, wait)
		l.mu.Lock()
		if err == nil && h.dead {
			// Another goroutine's statement on h failed between our grant
			// and now, and h's session was closed: the server freed the
			// lock with it. Nobody has seen it held, so take it again.
			h.users--
			err = fmt.Errorf("%w: its session was closed as it was granted", ErrLockLost)
			if attempt < 3 && ctx.Err() == nil && !l.closed {
				l.mu.Unlock()
				continue
			}
		}
		if err != nil {
			l.setIdle(e)
			l.dispatch(e)
			l.gc(e)
			l.mu.Unlock()
			return nil, lockError(e.key, err)
		}
		h.users--
		e.state, e.h, e.token = stateHeld, h, token
		h.entries[e] = struct{}{}
		if l.closed {
			// Close is waiting for us; it releases everything its holders hold.
			l.mu.Unlock()
			return nil, lockError(e.key, ErrClosed)
		}
		lk := l.newLockLocked(e)
		l.dispatch(e)
		watch := h != l.primary
		l.mu.Unlock()
		if watch && h.tryEnter() {
			// A session of its own that waited: watch it from the start.
			l.watch(h)
		}
		l.cfg.logger.Debug("pglocks: acquired", "key", e.key, "shared", o.shared)
		return lk, nil
	}
}

// cancelBackend runs pg_cancel_backend(pid) on the primary holder.
func (l *Locker) cancelBackend(ctx context.Context, pid int32) error {
	h, err := l.primaryHolder(ctx)
	if err != nil {
		return err
	}
	defer l.unuse(h)
	var ok bool
	return l.do(ctx, h, &req{q: sqlCancel, args: []any{pid}, dest: []any{&ok}})
}

// setIdle puts e back in stateIdle, no longer counted against WithMaxLocks.
// It runs with l.mu held.
func (l *Locker) setIdle(e *entry) {
	if e.counted {
		l.nserver--
		e.counted = false
	}
	e.state, e.h, e.token = stateIdle, nil, 0
}

// serverLock takes key on the server: first with a try on the primary
// holder, then, if it is held elsewhere and wait is set, by waiting on a
// connection of its own. It returns the holder with users incremented, and
// the fencing token.
func (l *Locker) serverLock(ctx context.Context, key Key, o lockConfig, wait bool) (*holder, int64, error) {
	q, args := stmt(stmtTry, key, o.shared, l.cfg.fencing)
	for retried := false; !o.own; retried = true { // o.own: straight to the wait
		h, err := l.primaryHolder(ctx)
		if err != nil {
			return nil, 0, err
		}
		var ok bool
		var token int64
		err = l.do(ctx, h, &req{q: q, args: args, dest: []any{&ok, &token},
			onErr: func(sctx context.Context, err error) error {
				if sqlState(err) != stateOutOfMemory {
					return err
				}
				// The lock table is full. Without fencing nothing was
				// granted. With it the lock may have taken the last slot
				// and the token's transaction id found none: the session
				// lock outlives the failed statement, so let it go (the
				// Locker never holds a key twice on the server, so this
				// unlock is exact).
				if l.cfg.fencing {
					uq, uargs := stmt(stmtUnlock, key, o.shared, false)
					var unlocked bool
					if uerr := h.c.query(sctx, uq, uargs, &unlocked); uerr != nil {
						return uerr
					}
				}
				return keepConn{classify(err)}
			}})
		if err == nil && ok {
			return h, token, nil
		}
		l.mu.Lock()
		broke := h.dead && err != nil
		l.mu.Unlock()
		l.unuse(h)
		if broke && !retried && ctx.Err() == nil {
			// The primary's session had ended (a server restart, say); the
			// try took nothing with it. Try once more on a fresh session.
			continue
		}
		if err != nil {
			return nil, 0, err
		}
		break
	}
	if !wait {
		return nil, 0, ErrLocked
	}

	for retried := false; ; retried = true {
		w, token, err := l.waitOn(ctx, key, o)
		if err != nil && !retried && ctx.Err() == nil && sqlState(err) == "" && !errors.Is(err, ErrClosed) {
			// A session kept ready (or taken from the pool) may have ended
			// meanwhile (a server restart): try once more on another.
			continue
		}
		return w, token, err
	}
}

// waitOn waits for key on a session of its own.
func (l *Locker) waitOn(ctx context.Context, key Key, o lockConfig) (*holder, int64, error) {
	w, tokens, _, err := l.waitOnAll(ctx, []Key{key}, o)
	if err != nil {
		return nil, 0, err
	}
	return w, tokens[0], nil
}

// waitOnAll waits for keys on a session of its own, one after the other in
// the order given, so that the server sees a cycle through this session
// (ErrDeadlock). If any wait fails, the session is cleared and closed:
// nothing is held. It returns the session with users set to 1, and the
// keys' fencing tokens; or the index of the key whose wait failed, and why.
func (l *Locker) waitOnAll(ctx context.Context, keys []Key, o lockConfig) (*holder, []int64, int, error) {
	w, err := l.take(ctx)
	if err != nil {
		return nil, nil, 0, err
	}
	cancel := w.c.cancel
	if w.c.pgConn() == nil {
		// database/sql without pgx: no cancel request, so cancel from a
		// session we own. (Leaving it to the driver would close the
		// connection before we can clear it of a lock granted as the wait
		// was cancelled.)
		cancel = func(ctx context.Context) error { return l.cancelBackend(ctx, w.pid) }
	}
	tokens := make([]int64, len(keys))
	var stuck <-chan error
	at := 0 // the key being waited for
	for i, key := range keys {
		at = i
		err = waitLock(ctx, waitSpec{
			stmt: sessionWait(key, o.shared, l.cfg.fencing),
			run: func(ctx context.Context, q string, args []any) error {
				var s1, s2 string
				return w.c.query(ctx, q, args, &s1, &s2, &tokens[i])
			},
			cancel: cancel, grace: l.cfg.stmtTime, closing: l.closing,
			abandon: func(done <-chan error) { stuck = done },
		})
		if err != nil {
			break
		}
	}
	if err != nil {
		if stuck != nil {
			// The driver is still in the statement: discard the connection
			// when it comes back.
			go func() {
				<-stuck
				l.discard(w)
			}()
		} else {
			l.discard(w)
		}
		return nil, nil, at, classify(err)
	}
	w.users = 1
	l.mu.Lock()
	l.holders[w] = struct{}{}
	l.mu.Unlock()
	return w, tokens, 0, nil
}

// dispatch lets the waiters at the front of e's queue go, as far as the
// key's state allows. It runs with l.mu held.
func (l *Locker) dispatch(e *entry) {
	for len(e.queue) > 0 {
		w := e.queue[0]
		switch {
		case e.state == stateIdle:
			e.queue = e.queue[1:]
			e.state, e.shared = stateAcquiring, w.shared
			w.ready <- nil
			return
		case e.state == stateHeld && e.shared && w.shared:
			e.queue = e.queue[1:]
			w.ready <- l.newLockLocked(e)
		default:
			return
		}
	}
}

// gc forgets e when nothing refers to it any more. It runs with l.mu held.
func (l *Locker) gc(e *entry) {
	if e.state == stateIdle && len(e.queue) == 0 && l.keys[e.key] == e {
		delete(l.keys, e.key)
	}
}
