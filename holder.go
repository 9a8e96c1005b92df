package pglocks

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// holder is one server session of a Locker: it holds locks, waits in the
// server's queue for one, or is kept ready for either.
type holder struct {
	c    conn
	pid  int32                              // pg_backend_pid() when the session was readied
	orig [numSessionSettings]sql.NullString // what sqlInitSession replaced, for sqlRestoreSession

	// sem is held by whoever uses the session: a statement, a wait, a
	// watcher (see watch.go).
	sem chan struct{}
	// Guarded by sem: why the session was closed; a statement abandoned by
	// runStmt that may still run.
	broken error
	stuck  <-chan error
	// listening says the session LISTENs (set under sem, read anywhere).
	listening atomic.Bool
	// busySince is when the statement running under do started (UnixNano),
	// or 0.
	busySince atomic.Int64
	// The session's watcher, if one runs, and how many goroutines are
	// about to take the session (see watch.go); idle arms a watcher once
	// the session has been idle for a moment.
	watcher atomic.Pointer[watcher]
	want    atomic.Int32
	idle    *time.Timer

	// dead is set, before its loss is reported, once the session is closed
	// or given back: a grant on it is then void (see table.grant). held is
	// how many locks the table has on it.
	dead atomic.Bool
	held atomic.Int32

	// Statements waiting for a round trip, and whether a goroutine is
	// sending them (see batch.go).
	qmu     sync.Mutex
	queue   []*req
	leading bool

	// guarded by sessions.mu
	users     int       // goroutines using it, or about to
	waiting   bool      // in a wait in the server's queue
	waited    bool      // it waited for the locks it holds (a session of their own)
	marked    bool      // its application_name says since when it leads
	counted   bool      // counted in sessions.n
	idleSince time.Time // when it last became idle
}

// staleConn is a pooled connection that failed its first statement without
// an error from the server.
type staleConn struct{ error }

func (s staleConn) Unwrap() error { return s.error }

// ready takes a connection from the pool and readies it for holding and
// waiting (sqlInitSession). It refuses a standby, and a session that a
// transaction-pooling proxy shares with other clients; it retries a pooled
// connection whose session had ended.
func (s *sessions) ready(ctx context.Context) (*holder, error) {
	for try := 1; ; try++ {
		h, err := s.ready1(ctx)
		var stale staleConn
		if errors.As(err, &stale) && try < 3 && ctx.Err() == nil {
			// A pooled connection whose session had ended (a restarted
			// server, an idle timeout): pools hand those out. Take another.
			continue
		}
		return h, err
	}
}

func (s *sessions) ready1(ctx context.Context) (*holder, error) {
	// A wait for a pooled connection ends when the Locker closes.
	actx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(s.closeCtx, cancel)
	c, err := s.src.acquire(actx)
	stop()
	cancel()
	if err != nil {
		switch {
		case ctx.Err() != nil:
			return nil, ctxError(ctx)
		case s.closeCtx.Err() != nil:
			return nil, ErrClosed
		}
		return nil, fmt.Errorf("connect: %w", err)
	}
	h := &holder{c: c, sem: make(chan struct{}, 1)}

	sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.stmtTime)
	defer scancel()
	var recovery bool
	var set string
	dest := []any{&h.pid, &recovery}
	for i := range h.orig {
		dest = append(dest, &h.orig[i])
	}
	err = c.query(sctx, sqlInitSession, s.cfg.sessionValues(), append(dest, &set)...)
	if err != nil {
		c.destroy()
		err = fmt.Errorf("ready connection: %w", err)
		if sqlState(err) == "" {
			err = staleConn{err}
		}
		return nil, err
	}
	if recovery {
		s.giveBack(h)
		return nil, ErrStandby
	}
	if tc := c.tcp(); tc != nil {
		_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{
			Enable: true, Idle: s.cfg.kaIdle, Interval: s.cfg.kaInterval, Count: s.cfg.kaCount,
		})
		_ = setUserTimeout(tc, s.cfg.serverBound())
	}
	if pid, ok := c.backendPID(); (!ok || pid != uint32(h.pid)) && !s.poolingOK.Load() {
		// The BackendKeyData is not the backend's, so a proxy is in between;
		// or the driver does not show it (lib/pq).
		if err := s.checkPooling(sctx, h); err != nil {
			s.giveBack(h)
			return nil, err
		}
		s.poolingOK.Store(true) // owned, or could not tell: either way, do not ask again
	}
	return h, nil
}

// sessionValues are the values that sqlInitSession sets, in the order of
// sessionSettings (nil: leave the setting as it is).
func (c *config) sessionValues() []any {
	v := make([]any, numSessionSettings)
	v[setKeepalivesIdle] = seconds(c.kaIdle)
	v[setKeepalivesInterval] = seconds(c.kaInterval)
	v[setKeepalivesCount] = strconv.Itoa(c.kaCount)
	v[setTCPUserTimeout] = strconv.FormatInt(c.serverBound().Milliseconds(), 10)
	for _, i := range []int{setStatementTimeout, setLockTimeout, setTransactionTimeout, setIdleSession, setIdleInTransaction} {
		v[i] = "0"
	}
	v[setConnectionCheck] = connectionCheck
	if c.appName != "" {
		v[setAppName] = c.appName
	}
	return v
}

func seconds(d time.Duration) string { return strconv.FormatInt(int64(d/time.Second), 10) }

// checkPooling tells session pooling from transaction pooling behind a
// proxy. Under transaction pooling h's server session goes back to the
// proxy's pool between statements, and the proxy hands its most recently
// used session (PgBouncer's default) to the next client: so a second client
// that lands on h's pid proves that h does not own its session
// (ErrTransactionPooling). If no second connection can be had, it cannot
// tell (nil), and the heartbeat still notices when h's statements run on
// another session.
func (s *sessions) checkPooling(ctx context.Context, h *holder) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	c2, err := s.src.acquire(ctx)
	if err != nil {
		return nil
	}
	var pid int32
	err = c2.query(ctx, sqlBackendPID, nil, &pid)
	c2.release()
	if err == nil && pid == h.pid {
		return ErrTransactionPooling
	}
	return nil
}

// giveBack returns a connection that holds no lock to the pool, with the
// settings that ready changed put back (and UNLISTEN, if it listened).
func (s *sessions) giveBack(h *holder) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.stmtTime)
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
	err := s.runStmt(ctx, h, func(ctx context.Context) error {
		if h.listening.Load() {
			if err := h.c.exec(ctx, sqlUnlisten); err != nil {
				return err
			}
		}
		return h.c.exec(ctx, sqlRestoreSession, o...)
	})
	h.leave()
	if err != nil {
		s.closeConn(h)
		return
	}
	h.c.release()
}

// closeConn closes h's session, now or, if a statement abandoned by runStmt
// still runs on it, when that statement ends. The caller holds h.sem, or
// nothing else uses h any more.
func (s *sessions) closeConn(h *holder) {
	if h.stuck == nil {
		h.c.destroy()
		return
	}
	stuck := h.stuck
	go func() {
		<-stuck
		h.c.destroy()
	}()
}

// discard closes a connection after a failed wait. It first unlocks
// everything on it, so that a lock granted just as the wait was cancelled is
// free before the caller hears of the failure.
func (s *sessions) discard(h *holder) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.stmtTime)
	defer cancel()
	h.enter()
	broken := h.broken
	if broken == nil {
		_ = s.runStmt(ctx, h, func(ctx context.Context) error { return h.c.exec(ctx, sqlUnlockAll) })
		s.closeConn(h)
	}
	h.leave()
}

// abandonAfter is how long past its deadline a statement may run before
// runStmt gives up on it.
const abandonAfter = 100 * time.Millisecond

// runStmt runs f on h's session with ctx's deadline. Drivers that are
// interruptible stop a statement at its deadline by closing the socket.
// lib/pq instead sends a cancel request and waits for the server's answer,
// which a silent network never brings: for such drivers f runs in a
// goroutine that is abandoned shortly after the deadline, leaving h.stuck
// set. The caller holds h.sem.
func (s *sessions) runStmt(ctx context.Context, h *holder, f func(ctx context.Context) error) error {
	if h.c.interruptible() {
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
