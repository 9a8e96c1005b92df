package pglocks

// session.go: one server session of a Locker, and the opener that takes a
// connection from the application's pool and readies it as one.

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// session is one server session of a Locker: it holds locks, waits in the
// server's queue for one, or is kept ready for either. Which mutex guards
// what:
//
//   - sem (a semaphore of one) is held by whoever uses the connection: a
//     statement, a wait, a watcher. It guards guard.
//   - pipe.mu guards the statements queued for a round trip (batch.go),
//     watch.mu the idle timer (watch.go).
//   - pool.mu guards use (how the pool counts the session: pool.go).
//   - the atomics are read anywhere.
type session struct {
	c    conn
	pid  int32                              // pg_backend_pid() when the session was readied
	orig [numSessionSettings]sql.NullString // what sqlInitSession replaced, for sqlRestoreSession

	sem   chan struct{}
	guard semState // guarded by sem

	// pinned says the session is pinned by a transaction of its own (see
	// sql.go): set when it is readied.
	pinned bool
	// dead is set, before its loss is reported, once the session is closed
	// or given back: a grant on it is then void (see table.grant).
	dead atomic.Bool
	// held is how many locks the table has on it.
	held atomic.Int32

	watch watchSlot // its watcher, if one runs (watch.go)
	pipe  pipeline  // statements waiting for a round trip (batch.go)
	use   useState  // guarded by pool.mu (pool.go)
}

// semState is what session.sem guards.
type semState struct {
	broken error        // why the session was closed
	stuck  <-chan error // a statement abandoned by runStmt that may still run
	bound  *time.Timer  // runBounded's
	// waitSaved says a pinned session's transaction has the savepoint of
	// its last wait (sqlWaitSave), kept after the grant: the next wait
	// releases it in the same round trip as it makes its own.
	waitSaved bool
}

// watchSlot is the watcher of a session, if one runs, and how many
// goroutines are about to take the session (see watch.go); idle arms a
// watcher once the session has been idle for a moment (guarded by mu).
type watchSlot struct {
	w    atomic.Pointer[watcher]
	want atomic.Int32
	mu   sync.Mutex
	idle *time.Timer
	// listening says the session LISTENs (set under sem, read anywhere).
	listening atomic.Bool
	drained   atomic.Int64 // when drain last asked the driver (UnixNano)
}

// pipeline is the statements waiting for a round trip on a session, and
// whether a goroutine is sending them (batch.go); guarded by mu.
// busySince is when the statement or batch running now started
// (UnixNano), or 0, for the heartbeat.
type pipeline struct {
	mu        sync.Mutex
	queue     []*req
	spare     []*req // a queue's array, emptied, for the next queue
	leading   bool
	busySince atomic.Int64
	// later sends what post queued if nothing else does soon.
	later *time.Timer
}

// req is one statement queued on a session (see batch.go).
type req struct {
	row
	// check, if set, judges a statement that ran without error (an unlock
	// that returns false).
	check func() error
	// onErr, if set, sees a server error first; it may run statements on
	// the session, and returns keepConn when the session is intact.
	onErr func(ctx context.Context, c conn, err error) error
	// txn marks a statement whose effect is transactional (a notification,
	// a set_config): in a pipelined batch, which is one transaction, a later
	// statement's error undoes it, so it is run again.
	txn  bool
	err  error
	done sync.WaitGroup // Done once the statement ran (or will not)

	// Buffers, so that a statement on one key allocates only itself (and
	// its argument's box): the key's arguments, the destinations, and the
	// boolean an unlock returns, which mustHold wants true.
	argBuf   [2]any
	destBuf  [2]any
	ok       bool
	mustHold bool

	// unlock is set for a statement queued by batcher.post: the release it
	// carries out, finished once the statement has run.
	unlock *pendingUnlock
}

// setKey sets r's statement q and its arguments, key's, from stmtQ.
func (r *req) setKey(q string, n int, key Key) {
	r.q = q
	if n == 2 {
		a, b := key.pair()
		r.argBuf[0], r.argBuf[1] = a, b
	} else {
		r.argBuf[0] = key.v
	}
	r.args = r.argBuf[:n]
}

// judge says whether a statement that ran without error did what it
// should: an unlock that returned false did not.
func (r *req) judge() error {
	if r.mustHold && !r.ok {
		return errNotHeld
	}
	if r.check != nil {
		return r.check()
	}
	return nil
}

// useState is how the pool counts one session; guarded by pool.mu.
type useState struct {
	users     int       // leases on it
	waiting   bool      // in a wait in the server's queue
	waited    bool      // it waited for the locks it holds (a session of their own)
	marked    bool      // its application_name says since when it leads
	counted   bool      // counted in poolState.n
	idleSince time.Time // when it last became idle
}

// queued reports whether statements are queued or being sent on s.
func (s *session) queued() bool {
	s.pipe.mu.Lock()
	defer s.pipe.mu.Unlock()
	return s.pipe.leading || len(s.pipe.queue) > 0
}

// inFlight reports whether statements of s are on the wire, their answers
// not yet read.
func (s *session) inFlight() bool { return s.pipe.busySince.Load() != 0 }

// stopIdle stops the timer that would start a watcher on s.
func (s *session) stopIdle() {
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	if s.watch.idle != nil {
		s.watch.idle.Stop()
	}
}

// watcher is one watch of a session.
type watcher struct {
	c       conn
	stopped atomic.Bool
	kicked  chan struct{} // closed once the read deadline is set
	done    chan struct{} // closed once the watcher let go of the session
}

// kick stops w: at most once, and returns at once.
func (w *watcher) kick() {
	if w.stopped.CompareAndSwap(false, true) {
		_ = w.c.setReadDeadline(time.Now())
		close(w.kicked)
	}
}

// enter takes the session for a statement, stopping its watcher first.
func (s *session) enter() {
	s.watch.want.Add(1)
	s.stopWatch()
	s.sem <- struct{}{}
	s.watch.want.Add(-1)
}

// tryEnter is enter that does not wait for a statement to end.
func (s *session) tryEnter() bool {
	s.watch.want.Add(1)
	defer s.watch.want.Add(-1)
	s.stopWatch()
	select {
	case s.sem <- struct{}{}:
		return true
	default:
		return false
	}
}

// leave gives the session up after enter.
func (s *session) leave() { <-s.sem }

func (s *session) stopWatch() {
	if w := s.watch.w.Load(); w != nil {
		w.kick()
		<-w.done
	}
}

// abandonAfter is how long past its deadline a statement may run before
// runStmt gives up on it.
const abandonAfter = 100 * time.Millisecond

// runStmt runs f on the session with ctx's deadline. Drivers that are
// interruptible stop a statement at its deadline by closing the socket.
// lib/pq instead sends a cancel request and waits for the server's answer,
// which a silent network never brings: for such drivers f runs in a
// goroutine that is abandoned shortly after the deadline, leaving stuck
// set. The caller holds sem.
func (s *session) runStmt(ctx context.Context, f func(ctx context.Context) error) error {
	if s.c.interruptible() {
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
		s.guard.stuck = res
		return fmt.Errorf("statement did not end at its deadline: %w", context.DeadlineExceeded)
	}
}

// runBounded runs f, a short statement that needs no ctx, on the session
// of a driver that is not interruptible, as runStmt does with a deadline d
// from now, but without a context for the driver to watch (lib/pq starts a
// goroutine for a statement whose ctx can end) and with the session's own
// timer. The caller holds sem.
func (s *session) runBounded(d time.Duration, f func() error) error {
	res := make(chan error, 1)
	go func() { res <- f() }()
	if s.guard.bound == nil {
		s.guard.bound = time.NewTimer(d)
	} else {
		s.guard.bound.Reset(d)
	}
	select {
	case err := <-res:
		s.guard.bound.Stop()
		return err
	case <-s.guard.bound.C:
		s.guard.stuck = res
		return fmt.Errorf("statement did not end within %v: %w", d, context.DeadlineExceeded)
	}
}

// closeConn closes the session's connection, now or, if a statement
// abandoned by runStmt still runs on it, when that statement ends. The
// caller holds sem, or nothing else uses the session any more.
func (s *session) closeConn() {
	if s.guard.stuck == nil {
		s.c.destroy()
		return
	}
	stuck := s.guard.stuck
	go func() {
		<-stuck
		s.c.destroy()
	}()
}

// discard closes the connection after a failed wait. It first unlocks
// everything on it, so that a lock granted just as the wait was cancelled is
// free before the caller hears of the failure.
func (s *session) discard(stmtTime time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), stmtTime)
	defer cancel()
	s.enter()
	if s.guard.broken == nil {
		_ = s.runStmt(ctx, func(ctx context.Context) error {
			if s.pinned {
				// The wait's failure aborted the transaction: back to before
				// the wait, where unlocking works.
				_ = s.c.exec(ctx, sqlWaitUndo)
			}
			return s.c.exec(ctx, sqlUnlockAll)
		})
		s.closeConn()
	}
	s.leave()
}

// giveBack returns a connection that holds no lock to the pool, with the
// settings that ready changed put back (and UNLISTEN, if it listened).
func (s *session) giveBack(stmtTime time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), stmtTime)
	defer cancel()
	o := make([]any, len(s.orig))
	for i, v := range s.orig {
		o[i] = v
	}
	s.enter()
	defer s.leave()
	if s.guard.broken != nil {
		return // closed already, by a watcher that saw the session end
	}
	err := s.runStmt(ctx, func(ctx context.Context) error {
		if s.pinned {
			// Locks released first: COMMIT hands the server session back to
			// the pooler, and the settings end with the transaction.
			if err := s.c.exec(ctx, sqlUnlockAll); err != nil {
				return err
			}
			return s.c.exec(ctx, sqlUnpin)
		}
		if s.watch.listening.Load() {
			if err := s.c.exec(ctx, sqlUnlisten); err != nil {
				return err
			}
		}
		if err := s.c.forget(ctx); err != nil {
			return err
		}
		return s.c.exec(ctx, sqlRestoreSession, o...)
	})
	if err != nil {
		s.closeConn()
		return
	}
	s.c.release()
}

// unlockAll releases every lock on the session, for Close; a session it
// cannot clear is closed instead, and the error says why.
func (s *session) unlockAll(stmtTime time.Duration) (cleared bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), stmtTime)
	defer cancel()
	s.enter()
	defer s.leave()
	if s.guard.broken != nil {
		return false, nil // closed already: the server freed its locks
	}
	if err := s.runStmt(ctx, func(ctx context.Context) error { return s.c.exec(ctx, sqlUnlockAll) }); err != nil {
		s.closeConn()
		return false, fmt.Errorf("pglocks: close: unlock all: %w", err)
	}
	return true, nil
}

// opener takes connections from the application's pool and readies them as
// sessions (sqlInitSession).
type opener struct {
	src      source
	cfg      *config
	closeCtx context.Context // a wait for a pooled connection ends when the Locker closes
	// mode is how the pool's sessions are had: modeUnknown until the first
	// is readied, then modeOwn or modePinned.
	mode atomic.Int32
	// short caches src.exhausted (see exhausted): when it was asked
	// (UnixNano) shifted left once, and the answer in the low bit.
	short atomic.Int64
}

// exhaustedFor is how long an answer of src.exhausted is reused: asking
// pgxpool takes its mutex and allocates, and a Locker asks each time a
// session goes idle. It is the pressure checks' own interval (see
// pressureEvery), within which a pool running short is noticed anyway.
const exhaustedFor = pressureEvery

// exhausted is src.exhausted, asked at most once per exhaustedFor.
func (o *opener) exhausted() bool {
	now := time.Now().UnixNano()
	if c := o.short.Load(); now-c>>1 < int64(exhaustedFor) {
		return c&1 == 1
	}
	ex := o.src.exhausted()
	o.short.Store(now<<1 | int64(b2i(ex)))
	return ex
}

// How an opener's sessions are had.
const (
	modeUnknown = iota
	modeOwn     // a session is the client's own (no proxy, or session pooling)
	modePinned  // transaction pooling: a session is pinned by a transaction
	// statement pooling: no transaction can pin a session
	// (ErrTransactionPooling)
	modeStatement
)

// staleConn is a pooled connection that failed its first statement without
// an error from the server.
type staleConn struct{ error }

func (s staleConn) Unwrap() error { return s.error }

// open takes a connection from the pool and readies it for holding and
// waiting. It refuses a standby, and a session that a transaction-pooling
// proxy shares with other clients; it retries a pooled connection whose
// session had ended.
func (o *opener) open(ctx context.Context) (*session, error) {
	for try := 1; ; try++ {
		s, err := o.open1(ctx)
		var stale staleConn
		if errors.As(err, &stale) && try < 3 && ctx.Err() == nil {
			// A pooled connection whose session had ended (a restarted
			// server, an idle timeout): pools hand those out. Take another.
			continue
		}
		return s, err
	}
}

func (o *opener) open1(ctx context.Context) (*session, error) {
	c, err := o.acquire(ctx)
	if err != nil {
		return nil, err
	}
	s := &session{c: c, sem: make(chan struct{}, 1)}
	sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), o.cfg.stmtTime)
	defer scancel()
	s.pinned, err = o.pin(sctx, c)
	var recovery bool
	if err == nil {
		init := sqlInitSession
		if s.pinned {
			init = sqlInitPinned
		}
		var set string
		dest := []any{&s.pid, &recovery}
		for i := range s.orig {
			dest = append(dest, &s.orig[i])
		}
		err = c.query(sctx, init, sessionValues(o.cfg), append(dest, &set)...)
	}
	if err != nil {
		c.destroy()
		if errors.Is(err, ErrStandby) || errors.Is(err, ErrTransactionPooling) {
			return nil, err
		}
		err = fmt.Errorf("ready connection: %w", err)
		if sqlState(err) == "" {
			err = staleConn{err}
		}
		return nil, err
	}
	if recovery {
		s.giveBack(o.cfg.stmtTime)
		return nil, ErrStandby
	}
	if tc := c.tcp(); tc != nil {
		_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{
			Enable: true, Idle: o.cfg.kaIdle, Interval: o.cfg.kaInterval, Count: o.cfg.kaCount,
		})
		_ = setUserTimeout(tc, o.cfg.serverBound())
	}
	return s, nil
}

// pin pins c by a transaction of its own if the pool's sessions must be
// (see pinning), and reports whether it did.
func (o *opener) pin(ctx context.Context, c conn) (bool, error) {
	probed := o.mode.Load() == modeUnknown
	pinned, err := o.pinning(ctx, c)
	if err != nil || !pinned {
		return false, err
	}
	c.simple()
	err = c.exec(ctx, sqlPin)
	// lib/pq hides a FATAL behind driver.ErrBadConn: on a connection that
	// answered the probe a moment ago, that is the refusal too.
	if err != nil && (strings.Contains(err.Error(), "statement pooling") || probed && errors.Is(err, driver.ErrBadConn)) {
		// A statement pooler refuses transactions (PgBouncer: "transaction
		// blocks not allowed in statement pooling mode"): nothing can pin a
		// session there.
		o.mode.Store(modeStatement)
		return false, fmt.Errorf("%w: %w", ErrTransactionPooling, err)
	}
	if err != nil {
		return false, fmt.Errorf("begin: %w", err)
	}
	return true, nil
}

// pinning reports whether sessions of the pool must be pinned by a
// transaction of their own, finding out on the first session. With pgx
// drivers, a BackendKeyData that is not the backend's says a proxy is in
// between: its sessions are pinned, which is safe under any pooling mode (a
// session pooler's included) and needed under transaction pooling. lib/pq
// does not show the BackendKeyData: there a second client that lands on the
// first's server session proves transaction pooling (see checkPooling). It
// runs nothing on c that a pooler's next client could see.
func (o *opener) pinning(ctx context.Context, c conn) (bool, error) {
	switch o.mode.Load() {
	case modeOwn:
		return false, nil
	case modePinned:
		return true, nil
	case modeStatement:
		return false, fmt.Errorf("%w: the pooler refuses transactions (statement pooling)", ErrTransactionPooling)
	}
	var pid int32
	var recovery bool
	if err := c.query(ctx, sqlProbe, nil, &pid, &recovery); err != nil {
		return false, err
	}
	if recovery {
		return false, ErrStandby
	}
	mode := int32(modeOwn)
	if bpid, ok := c.backendPID(); ok && bpid != uint32(pid) || !ok && o.checkPooling(ctx, pid) {
		mode = modePinned
	}
	o.mode.CompareAndSwap(modeUnknown, mode)
	return o.mode.Load() == modePinned, nil
}

// acquire takes a connection from the pool; the wait ends when the Locker
// closes.
func (o *opener) acquire(ctx context.Context) (conn, error) {
	actx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(o.closeCtx, cancel)
	c, err := o.src.acquire(actx)
	stop()
	cancel()
	if err != nil {
		switch {
		case ctx.Err() != nil:
			return nil, ctxError(ctx)
		case o.closeCtx.Err() != nil:
			return nil, ErrClosed
		case pastDeadline(ctx):
			// The dial ran into ctx's deadline, which the net package
			// enforces itself, a moment before ctx's own timer says so.
			return nil, context.DeadlineExceeded
		}
		return nil, fmt.Errorf("connect: %w", err)
	}
	return c, nil
}

// pastDeadline reports whether ctx's deadline has passed.
func pastDeadline(ctx context.Context) bool {
	d, ok := ctx.Deadline()
	return ok && !time.Now().Before(d)
}

// checkPooling tells session pooling from transaction pooling behind a
// proxy, for a driver that does not show the BackendKeyData (lib/pq). Under
// transaction pooling a client's server session goes back to the proxy's
// pool after each transaction, and the proxy hands its most recently used
// session (PgBouncer's default) to the next client: so a second client that
// lands on pid, the server session the first client's statement just ran
// on, proves transaction pooling. Other clients of the pooler may take that
// session first, so it asks a few times; if none lands there, it cannot
// tell (false), and the heartbeat still notices when a session's
// statements reach another server session (the locks on it are then
// reported lost, with ErrTransactionPooling).
func (o *opener) checkPooling(ctx context.Context, pid int32) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	for range 3 {
		c2, err := o.src.acquire(ctx)
		if err != nil {
			return false
		}
		var pid2 int32
		err = c2.query(ctx, sqlBackendPID, nil, &pid2)
		c2.release()
		if err == nil && pid2 == pid {
			return true
		}
	}
	return false
}

// token reads a fencing token on a connection of the pool other than the
// Locker's sessions, in a transaction of its own, for a pinned session,
// whose transaction must not get a transaction id.
func (o *opener) token(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.cfg.stmtTime)
	defer cancel()
	c, err := o.acquire(ctx)
	if err != nil {
		return 0, fmt.Errorf("fencing token: %w", err)
	}
	var t int64
	if err := c.query(ctx, sqlToken, nil, &t); err != nil {
		c.destroy()
		return 0, fmt.Errorf("fencing token: %w", err)
	}
	c.release()
	return t, nil
}

// tokens sets every one of tokens to one fencing token read by token.
func (o *opener) tokens(ctx context.Context, tokens []int64) error {
	t, err := o.token(ctx)
	for i := range tokens {
		tokens[i] = t
	}
	return err
}
