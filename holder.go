package pglocks

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// holder is a server session that holds (or is about to hold) locks.
type holder struct {
	c    conn
	pid  int32                              // pg_backend_pid() when the session was readied
	orig [numSessionSettings]sql.NullString // what sqlInitSession replaced, for sqlRestoreSession
	sem  chan struct{}
	// broken is why the session was closed; stuck yields when a statement
	// abandoned by runStmt ends. Both are guarded by sem.
	broken error
	stuck  <-chan error
	// busySince is when the statement running under do started (UnixNano),
	// or 0.
	busySince atomic.Int64
	// The session's watcher, if one runs, and how many goroutines are
	// about to take the session (see watch.go).
	watcher atomic.Pointer[watcher]
	want    atomic.Int32

	// Statements waiting for a round trip, and whether a goroutine is
	// sending them (see do).
	qmu     sync.Mutex
	queue   []*req
	leading bool

	// guarded by Locker.mu
	entries   map[*entry]struct{}
	users     int       // goroutines about to run statements on it
	dead      bool      // closed, or given back to the pool
	marked    bool      // its application_name says since when it leads
	idleSince time.Time // when the primary last became idle
}

// primaryLinger is how long an idle primary holder is kept before it goes
// back to the pool, so that a busy Locker does not ready a session for
// every lock.
const primaryLinger = 5 * time.Second

// take gets a connection from the pool and readies it for holding locks
// (sqlInitSession). It refuses a standby, and a session that a
// transaction-pooling proxy shares with other clients.
func (l *Locker) take(ctx context.Context) (*holder, error) {
	for {
		l.mu.Lock()
		n := len(l.spare)
		if n == 0 {
			l.mu.Unlock()
			break
		}
		// Handed out as a fresh one: registered again once it is used.
		h := l.spare[n-1]
		l.spare = l.spare[:n-1]
		delete(l.holders, h)
		l.mu.Unlock()
		h.enter() // a heartbeat may have left a watcher on it
		broken := h.broken
		h.leave()
		if broken == nil {
			return h, nil
		}
		// Its watcher saw the session end, and closed it.
	}
	for try := 1; ; try++ {
		h, err := l.take1(ctx)
		var stale staleConn
		if errors.As(err, &stale) && try < 3 && ctx.Err() == nil {
			// A pooled connection whose session had ended (a restarted
			// server, an idle timeout): pools hand those out. Take another.
			continue
		}
		return h, err
	}
}

// staleConn is a pooled connection that failed its first statement without
// an error from the server.
type staleConn struct{ error }

func (s staleConn) Unwrap() error { return s.error }

func (l *Locker) take1(ctx context.Context) (*holder, error) {
	// A wait for a pooled connection ends when the Locker closes.
	actx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(l.closeCtx, cancel)
	c, err := l.src.acquire(actx)
	stop()
	cancel()
	if err != nil {
		switch {
		case ctx.Err() != nil:
			return nil, ctxError(ctx)
		case l.closeCtx.Err() != nil:
			return nil, ErrClosed
		}
		return nil, fmt.Errorf("connect: %w", err)
	}
	h := &holder{c: c, sem: make(chan struct{}, 1), entries: make(map[*entry]struct{})}

	sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), l.cfg.stmtTime)
	defer scancel()
	var recovery bool
	var set string
	dest := []any{&h.pid, &recovery}
	for i := range h.orig {
		dest = append(dest, &h.orig[i])
	}
	err = c.query(sctx, sqlInitSession, l.sessionValues(), append(dest, &set)...)
	if err != nil {
		c.destroy()
		err = fmt.Errorf("ready connection: %w", err)
		if sqlState(err) == "" {
			err = staleConn{err}
		}
		return nil, err
	}
	if recovery {
		l.giveBack(h)
		return nil, ErrStandby
	}
	pg := c.pgConn()
	if tc := tcpConn(pg); tc != nil {
		_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{
			Enable: true, Idle: l.cfg.kaIdle, Interval: l.cfg.kaInterval, Count: l.cfg.kaCount,
		})
		_ = setUserTimeout(tc, l.cfg.serverBound())
	}
	if (pg == nil || pg.PID() != uint32(h.pid)) && !l.poolingOK.Load() {
		// The BackendKeyData is not the backend's, so a proxy is in between;
		// or the driver does not show it (lib/pq).
		ok, err := l.checkPooling(sctx, h)
		if err != nil {
			l.giveBack(h)
			return nil, err
		}
		_ = ok // owned, or could not tell: either way, do not ask again
		l.poolingOK.Store(true)
	}
	return h, nil
}

// sessionValues are the values that sqlInitSession sets, in the order of
// sessionSettings (nil: leave the setting as it is).
func (l *Locker) sessionValues() []any {
	v := make([]any, numSessionSettings)
	v[setKeepalivesIdle] = seconds(l.cfg.kaIdle)
	v[setKeepalivesInterval] = seconds(l.cfg.kaInterval)
	v[setKeepalivesCount] = strconv.Itoa(l.cfg.kaCount)
	v[setTCPUserTimeout] = strconv.FormatInt(l.cfg.serverBound().Milliseconds(), 10)
	for _, i := range []int{setStatementTimeout, setLockTimeout, setTransactionTimeout, setIdleSession, setIdleInTransaction} {
		v[i] = "0"
	}
	v[setConnectionCheck] = connectionCheck
	if l.cfg.appName != "" {
		v[setAppName] = l.cfg.appName
	}
	return v
}

// checkPooling tells session pooling from transaction pooling behind a
// proxy. Under transaction pooling h's server session goes back to the
// proxy's pool between statements, and the proxy hands its most recently
// used session (PgBouncer's default) to the next client: so a second client
// that lands on h's pid proves that h does not own its session. It reports
// whether h owns its session; if no second connection can be had, it cannot
// tell (false, nil), and the heartbeat still notices when h's statements run
// on another session.
func (l *Locker) checkPooling(ctx context.Context, h *holder) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	c2, err := l.src.acquire(ctx)
	if err != nil {
		return false, nil
	}
	var pid int32
	err = c2.query(ctx, sqlBackendPID, nil, &pid)
	c2.release()
	switch {
	case err != nil:
		return false, nil
	case pid == h.pid:
		return false, ErrTransactionPooling
	}
	return true, nil
}

func seconds(d time.Duration) string { return strconv.FormatInt(int64(d/time.Second), 10) }

// giveBack returns a connection that holds no lock to the pool, with the
// settings that take changed put back.
func (l *Locker) giveBack(h *holder) {
	ctx, cancel := context.WithTimeout(context.Background(), l.cfg.stmtTime)
	defer cancel()
	o := make([]any, len(h.orig))
	for i, v := range h.orig {
		o[i] = v
	}
	h.enter()
	if h.broken != nil {
		h.leave() // closed already, by a watcher that saw the session end
		return
	}
	err := l.runStmt(ctx, h, func(ctx context.Context) error {
		return h.c.exec(ctx, sqlRestoreSession, o...)
	})
	h.leave()
	if err != nil {
		l.closeConn(h)
		return
	}
	h.c.release()
}

// closeConn closes h's session, now or, if a statement abandoned by runStmt
// still runs on it, when that statement ends.
func (l *Locker) closeConn(h *holder) {
	if h.stuck == nil {
		h.c.destroy()
		return
	}
	go func() {
		<-h.stuck
		h.c.destroy()
	}()
}

// discard closes a connection after a failed wait. It first unlocks
// everything on it, so that a lock granted just as the wait was cancelled is
// free before the caller hears of the failure.
func (l *Locker) discard(h *holder) {
	ctx, cancel := context.WithTimeout(context.Background(), l.cfg.stmtTime)
	defer cancel()
	h.enter()
	broken := h.broken
	if broken == nil {
		_ = l.runStmt(ctx, h, func(ctx context.Context) error { return h.c.exec(ctx, sqlUnlockAll) })
	}
	h.leave()
	if broken == nil { // else closed already
		l.closeConn(h)
	}
}

// primaryHolder returns the holder where locks are tried first, taking a
// connection from the pool if there is none, with users incremented. One
// goroutine at a time takes that connection; the others wait for it.
func (l *Locker) primaryHolder(ctx context.Context) (*holder, error) {
	for {
		l.mu.Lock()
		if h := l.primary; h != nil {
			h.users++
			l.mu.Unlock()
			return h, nil
		}
		if wait := l.making; wait != nil {
			l.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, ctxError(ctx)
			}
		}
		made := make(chan struct{})
		l.making = made
		l.mu.Unlock()

		h, err := l.take(ctx)
		l.mu.Lock()
		l.making = nil
		close(made)
		if err != nil {
			l.mu.Unlock()
			return nil, err
		}
		h.users = 1
		l.primary = h
		l.holders[h] = struct{}{}
		l.mu.Unlock()
		return h, nil
	}
}

// keepConn marks a statement error after which the session is known to be
// intact and to hold exactly what it held before.
type keepConn struct{ err error }

func (k keepConn) Error() string { return k.err.Error() }
func (k keepConn) Unwrap() error { return k.err }

// fail closes h's session after err, reporting its locks lost first: the
// holder must hear of the loss before the server can free the locks. The
// caller holds h.sem.
func (l *Locker) fail(h *holder, err error) {
	h.broken = fmt.Errorf("connection closed after an error: %w", err)
	l.lose(h, err)
	l.closeConn(h)
}

// abandonAfter is how long past its deadline a statement may run before
// runStmt gives up on it.
const abandonAfter = 100 * time.Millisecond

// runStmt runs f on h's session with ctx's deadline. Drivers built on pgx
// stop a statement at its deadline by closing the socket. lib/pq instead
// sends a cancel request and waits for the server's answer, which a silent
// network never brings: for such drivers f runs in a goroutine that is
// abandoned shortly after the deadline, leaving h.stuck set. The caller holds
// h.sem.
func (l *Locker) runStmt(ctx context.Context, h *holder, f func(ctx context.Context) error) error {
	if h.c.pgConn() != nil {
		return f(ctx)
	}
	res := make(chan error, 1)
	go func() { res <- f(ctx) }()
	dl, _ := ctx.Deadline()
	t := time.NewTimer(time.Until(dl) + abandonAfter)
	defer t.Stop()
	select {
	case err := <-res:
		return err
	case <-t.C:
		h.stuck = res
		return fmt.Errorf("statement did not end at its deadline: %w", context.DeadlineExceeded)
	}
}

// lose marks h dead and reports every lock held on it lost.
func (l *Locker) lose(h *holder, cause error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if h.dead {
		return
	}
	h.dead = true
	delete(l.holders, h)
	if l.primary == h {
		l.primary = nil
	}
	l.spare = slices.DeleteFunc(l.spare, func(x *holder) bool { return x == h })
	n := 0
	for e := range h.entries {
		if e.state != stateHeld {
			continue // being released: the releasing goroutine finishes it
		}
		for _, lk := range e.locks {
			lk.done = true
			lk.cancel(fmt.Errorf("pglocks: lock %v: %w: %w", e.key, ErrLockLost, cause))
			n++
		}
		e.locks = nil
		l.setIdle(e)
		delete(h.entries, e)
		l.dispatch(e)
		l.gc(e)
	}
	if n == 0 {
		l.cfg.logger.Debug("pglocks: an idle connection ended", "err", cause)
		return
	}
	l.cfg.logger.Warn("pglocks: connection closed; its locks are lost", "locks", n, "err", cause)
}

// unuse ends a use of h begun by primaryHolder, serverLock or the heartbeat,
// and gives h's connection back to the pool if it is done with.
func (l *Locker) unuse(h *holder) {
	l.mu.Lock()
	idle := l.unuseLocked(h)
	l.mu.Unlock()
	if idle {
		l.giveBack(h)
	}
}

// unuseLocked is unuse with l.mu held; it reports whether the caller must
// give h's connection back. The primary stays (the heartbeat retires it
// after primaryLinger); other holders go back once they hold nothing.
func (l *Locker) unuseLocked(h *holder) bool {
	h.users--
	if h.users > 0 || len(h.entries) > 0 || h.dead || l.closed {
		return false
	}
	if h == l.primary {
		h.idleSince = time.Now()
		return false
	}
	if len(l.spare) < maxSpare && !h.marked {
		// Kept ready for the next wait; the heartbeat retires it after
		// primaryLinger.
		h.idleSince = time.Now()
		l.spare = append(l.spare, h)
		return false
	}
	h.dead = true
	delete(l.holders, h)
	return true
}

// maxSpare is how many idle, readied sessions besides the primary the Locker
// keeps for waits.
const maxSpare = 2

// heartbeat checks every holder that holds locks once per interval, and
// retires an idle primary. It runs until Close.
func (l *Locker) heartbeat() {
	defer l.bg.Done()
	t := time.NewTicker(l.cfg.hbInterval)
	defer t.Stop()
	for {
		select {
		case <-l.closing:
			return
		case <-t.C:
		}
		var probe, retire []*holder
		l.mu.Lock()
		for h := range l.holders {
			if !h.dead && (len(h.entries) > 0 || h.users > 0) {
				h.users++
				probe = append(probe, h)
			}
		}
		if p := l.primary; p != nil && p.users == 0 && len(p.entries) == 0 && time.Since(p.idleSince) >= primaryLinger {
			p.dead = true
			delete(l.holders, p)
			l.primary = nil
			retire = append(retire, p)
		}
		for len(l.spare) > 0 && time.Since(l.spare[0].idleSince) >= primaryLinger {
			p := l.spare[0]
			l.spare = l.spare[1:]
			p.dead = true
			delete(l.holders, p)
			retire = append(retire, p)
		}
		l.mu.Unlock()
		for _, h := range retire {
			// Not here: a silent network must not hold up the probes.
			l.bg.Add(1)
			go func() {
				defer l.bg.Done()
				l.giveBack(h)
			}()
		}
		for _, h := range probe {
			l.bg.Add(1)
			go func() {
				defer l.bg.Done()
				l.probe(h)
				l.unuse(h)
			}()
		}
	}
}

// probe checks that h's session is alive and is still the one its locks
// were taken on. A statement already running on h is as good a check: it is
// bounded by the same timeout.
func (l *Locker) probe(h *holder) {
	if !h.tryEnter() {
		// A statement is running: it is the check, unless it has run too
		// long, in which case closing the socket under it makes it fail.
		if since := h.busySince.Load(); since != 0 && time.Since(time.Unix(0, since)) > l.cfg.hbTimeout {
			if pg := h.c.pgConn(); pg != nil {
				_ = pg.Conn().Close()
			}
		}
		return
	}
	if h.broken != nil {
		h.leave()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.cfg.hbTimeout)
	var pid int32
	err := l.runStmt(ctx, h, func(ctx context.Context) error { return h.c.query(ctx, sqlBackendPID, nil, &pid) })
	cancel()
	if err == nil && pid != h.pid {
		err = fmt.Errorf("%w: the locks were taken on server session %d, the connection now reaches session %d", ErrTransactionPooling, h.pid, pid)
	}
	if err != nil {
		l.fail(h, fmt.Errorf("heartbeat: %w", err))
		h.leave()
		return
	}
	l.watch(h) // until the next statement or probe
}
