package pglocks

// wait.go: one statement that waits inside the server for a lock, and the
// ways to stop it: the server's lock_timeout, cancel requests, a cut socket.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"sync"
	"time"
)

// waitSpec describes one statement that may wait inside the server for a
// lock: a session lock on a connection of its own, or a transaction lock.
type waitSpec struct {
	// stmt returns the wait statement: with lock_timeout set to ms for its
	// own wait, or, if ms is "", with no limit but the session's.
	stmt func(ms string) (q string, args []any)
	// run runs the statement, scanning what it returns.
	run func(ctx context.Context, q string, args []any) error
	// cancel asks the server to stop the statement; nil leaves it to the
	// driver, which is told through the statement's context.
	cancel func(ctx context.Context) error
	// grace bounds how long we wait for the server to confirm that a
	// cancelled statement has stopped, and how far past ctx's deadline the
	// client waits for the server's lock_timeout before giving up on it.
	grace time.Duration
	// closeCtx, if set, is done when the Locker closes: the wait stops then
	// with ErrClosed.
	closeCtx context.Context
	// abandon, if set, is called when waitLock returns although the
	// statement is still running, because the driver did not stop it within
	// grace of being told to (lib/pq on a silent network). The caller must
	// not touch the connection until done yields. If abandon is nil,
	// waitLock waits for the statement however long it takes.
	abandon func(done <-chan error)
	// cut, if set, closes the session's socket from another goroutine so
	// that the statement fails at once (pgx). waitLock then runs the
	// statement on the caller's goroutine, without a context for the driver
	// to watch, and a goroutine of its own cancels it or cuts it off: the
	// grant reaches the caller without a goroutine hand-off.
	cut func()
}

// cancelRetry is how often a cancel request is repeated: one that reaches
// the backend before the statement starts is ignored by the server.
const cancelRetry = 50 * time.Millisecond

// cancelTimeout bounds one attempt to send a cancel request.
const cancelTimeout = time.Second

// waitLock runs the wait statement of s. The wait happens inside the server,
// in its lock queue. ctx's deadline is enforced by the server (lock_timeout
// set for this statement only); if ctx is cancelled, or the Locker closes,
// the server is asked to cancel the statement. In every case waitLock returns
// only once the statement has stopped running on the server, or it could not
// be confirmed within s.grace, in which case the driver is made to stop it
// (the caller then discards the connection).
//
// After an error the lock may still have been granted (a cancel can race with
// the grant): the caller must discard the connection or roll back. If the
// wait was stopped, it fails even if the server granted the lock meanwhile.
//
// Where the socket can be cut (s.cut, with s.cancel), the statement runs on
// the caller's goroutine (waitInline); otherwise on a goroutine of its own,
// with a context the driver watches (waitAside).
func waitLock(ctx context.Context, s waitSpec) error {
	limit, deadline, expired := lockTimeout(ctx)
	if expired {
		return context.DeadlineExceeded
	}
	q, args := s.stmt(limit)
	if s.cut != nil && s.cancel != nil {
		return waitInline(ctx, s, q, args, limit != "", deadline)
	}
	return waitAside(ctx, s, q, args, limit != "", deadline)
}

// lockTimeout returns lock_timeout for a wait that ctx bounds, in
// milliseconds as text, or "" when ctx has no deadline or one beyond
// lock_timeout's range (the client then ends the wait itself); expired
// reports a deadline already past.
func lockTimeout(ctx context.Context) (limit string, deadline time.Time, expired bool) {
	deadline, ok := ctx.Deadline()
	if !ok {
		return "", deadline, false
	}
	left := time.Until(deadline)
	if left <= 0 {
		return "", deadline, true
	}
	ms := (left + time.Millisecond - 1) / time.Millisecond // lock_timeout 0 would mean "no limit"
	if ms > math.MaxInt32 {
		return "", deadline, false // beyond lock_timeout's range (24.8 days)
	}
	return strconv.FormatInt(int64(ms), 10), deadline, false
}

// closing returns what is done when the Locker closes, or nil.
func (s waitSpec) closing() <-chan struct{} {
	if s.closeCtx == nil {
		return nil
	}
	return s.closeCtx.Done()
}

// cancelUntil sends cancel requests for the statement every cancelRetry
// until ended yields (a value, or closed), and reports whether it did within
// s.grace; false also when a cancel request could not be sent.
func (s waitSpec) cancelUntil(ended <-chan error) bool {
	grace := time.NewTimer(s.grace)
	defer grace.Stop()
	retry := time.NewTicker(cancelRetry)
	defer retry.Stop()
	for {
		cctx, ccancel := context.WithTimeout(context.Background(), cancelTimeout)
		err := s.cancel(cctx)
		ccancel()
		if err != nil {
			return false
		}
		select {
		case <-ended:
			return true
		case <-retry.C:
		case <-grace.C:
			return false
		}
	}
}

// waitAside is waitLock for a driver whose statement stops when its
// context ends: the statement runs on a goroutine of its own.
func waitAside(ctx context.Context, s waitSpec, q string, args []any, hasDeadline bool, deadline time.Time) error {
	qctx, qcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer qcancel()
	if hasDeadline {
		var dcancel context.CancelFunc
		qctx, dcancel = context.WithDeadline(qctx, deadline.Add(s.grace))
		defer dcancel()
	}
	done := make(chan error, 1)
	go func() { done <- s.run(qctx, q, args) }()

	var stop error
	select {
	case err := <-done:
		return waitResult(ctx, nil, err, hasDeadline && (sqlState(err) == stateLockNotAvailable || qctx.Err() != nil))
	case <-ctx.Done():
		stop = ctxError(ctx)
	case <-s.closing():
		stop = ErrClosed
	}

	// Stop the wait on the server before returning, so that nothing of ours
	// stays queued there.
	if hasDeadline && ctx.Err() == context.DeadlineExceeded {
		// The server's lock_timeout fires at the same moment.
		give := time.NewTimer(s.grace)
		defer give.Stop()
		select {
		case err := <-done:
			return waitResult(ctx, stop, err, true)
		case <-give.C:
			s.giveUp(qcancel, done)
			return stop
		}
	}
	if s.cancel == nil || !s.cancelUntil(done) {
		s.giveUp(qcancel, done)
	}
	return stop
}

// giveUp cancels the statement's context, which makes the driver stop it, and
// waits for it to end: at most s.grace if s.abandon is set.
func (s waitSpec) giveUp(qcancel context.CancelFunc, done <-chan error) {
	qcancel()
	if s.abandon == nil {
		<-done
		return
	}
	t := time.NewTimer(s.grace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		s.abandon(done)
	}
}

// waitInline is waitLock for a session whose socket can be cut (s.cut): the
// statement runs here, without a context for the driver to watch, and no
// goroutine watches it unless it must be stopped: callbacks on ctx and on
// the Locker's closing start one (stopper), which sends cancel requests and
// cuts the socket if the server does not stop the statement within s.grace;
// a timer cuts it if the server does not answer by the deadline plus
// s.grace.
func waitInline(ctx context.Context, s waitSpec, q string, args []any, hasDeadline bool, deadline time.Time) error {
	st := &stopper{s: s, hasDeadline: hasDeadline, finished: make(chan error)}
	unCtx := func() bool { return true }
	if ctx.Done() != nil { // a ctx that cannot end needs no watching
		unCtx = context.AfterFunc(ctx, func() { st.stop(ctxError(ctx)) })
	}
	unClose := func() bool { return true }
	if s.closeCtx != nil {
		unClose = context.AfterFunc(s.closeCtx, func() { st.stop(ErrClosed) })
	}
	var giveUp *time.Timer
	if hasDeadline {
		// The server answers at its lock_timeout; if it does not (a silent
		// network), cut the socket.
		giveUp = time.AfterFunc(time.Until(deadline)+s.grace, st.cutUnlessEnded)
	}

	err := s.run(context.Background(), q, args)
	why := st.end()
	unCtx()
	unClose()
	if giveUp != nil {
		giveUp.Stop()
	}
	return waitResult(ctx, why, err, hasDeadline && (sqlState(err) == stateLockNotAvailable || time.Now().After(deadline)))
}

// stopper stops a wait that waitInline runs, once.
type stopper struct {
	s           waitSpec
	hasDeadline bool
	finished    chan error // closed when the statement returned

	mu       sync.Mutex
	ended    bool  // the statement returned: nothing may cancel it now (guarded by mu)
	why      error // why the statement was stopped, or nil (guarded by mu)
	stopping sync.WaitGroup
}

// stop stops the statement for why, unless it has ended or is being
// stopped already: the server's lock_timeout ends a wait at its deadline;
// otherwise cancel requests are sent, and the socket cut if they do not
// stop it.
func (st *stopper) stop(why error) {
	st.mu.Lock()
	if st.ended || st.why != nil {
		st.mu.Unlock()
		return
	}
	st.why = why
	st.stopping.Add(1)
	st.mu.Unlock()
	go func() {
		defer st.stopping.Done()
		if st.hasDeadline && errors.Is(why, context.DeadlineExceeded) {
			return // the server's lock_timeout ends it at the same moment
		}
		if !st.s.cancelUntil(st.finished) {
			st.s.cut()
		}
	}()
}

// cutUnlessEnded cuts the socket under a statement that has not returned.
func (st *stopper) cutUnlessEnded() {
	st.mu.Lock()
	over := st.ended
	st.mu.Unlock()
	if !over {
		st.s.cut()
	}
}

// end records that the statement returned, and returns why it was stopped
// (or nil) once any cancel request being sent is done: it must reach the
// server before the caller's next statement on the session (its clearing),
// or it could cancel that one instead.
func (st *stopper) end() error {
	st.mu.Lock()
	st.ended = true
	why := st.why
	st.mu.Unlock()
	close(st.finished)
	if why != nil {
		st.stopping.Wait()
	}
	return why
}

// waitResult is the error a wait returns: stop is why it was stopped (or
// nil), err what the statement returned, and timedOut whether err is the
// server's lock_timeout (or the client's) for ctx's deadline.
func waitResult(ctx context.Context, stop, err error, timedOut bool) error {
	switch {
	case stop != nil && err != nil:
		// The wait was stopped: it fails, whatever the server said last.
		return fmt.Errorf("%w: %w", stop, err)
	case stop != nil:
		return stop
	case err == nil:
		return nil
	case ctx.Err() != nil:
		// A driver's own cancel request, sent when ctx ended during an
		// earlier statement, may land on this one.
		return fmt.Errorf("%w: %w", ctxError(ctx), err)
	case timedOut:
		return fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
	case sqlState(err) == "":
		// Nobody stopped it, and the server said nothing: the connection
		// closed under it.
		return endedError{err}
	}
	return serverEnded(err)
}

// waitOn waits for keys on w, a session of its own, one after the other in
// the order given, so that the server sees a cycle through this session
// (ErrDeadlock). If any wait fails, the session is cleared and closed:
// nothing is held. It returns the lease and the keys' fencing tokens; or
// the index of the key whose wait failed, and why.
func waitOn(ctx context.Context, w lease, keys []Key, shared bool, cfg *config, closeCtx context.Context) (grantSet, int, error) {
	cancel := func(ctx context.Context) error {
		err := w.s.c.cancel(ctx)
		if errors.Is(err, errNoCancelRequest) {
			// database/sql without pgx: cancel from a session we own.
			// (Leaving it to the driver would close the connection before
			// we can clear it of a lock granted as the wait was cancelled.)
			return w.p.cancelBackend(ctx, w.s.pid)
		}
		return err
	}
	tokens := make([]int64, len(keys))
	var stuck <-chan error
	at := 0 // the key being waited for
	pinned := w.s.pinned
	w.s.enter()
	err := w.s.guard.broken
	if err == nil && pinned {
		// A failed wait aborts the transaction: discard rolls back to here.
		// The savepoint of the session's last wait goes in the same round
		// trip: it is kept after a grant, to save one.
		q := sqlWaitSave
		if w.s.guard.waitSaved {
			q = sqlWaitRelease + "; " + sqlWaitSave
		}
		if err = pinStmt(ctx, w.s, q, cfg.stmtTime); err == nil {
			w.s.guard.waitSaved = true
		}
	}
	for i, key := range keys {
		if err != nil {
			break
		}
		at = i
		err = waitLock(ctx, waitSpec{
			stmt: sessionWait(key, shared, cfg.fencing && !pinned, pinned),
			run: func(ctx context.Context, q string, args []any) error {
				var s1, s2 string
				return w.s.c.query(ctx, q, args, &s1, &s2, &tokens[i])
			},
			cancel: cancel, grace: cfg.stmtTime, closeCtx: closeCtx,
			abandon: func(done <-chan error) { stuck = done },
			cut:     cutter(w.s.c),
		})
	}
	w.s.leave()
	if err == nil && pinned && cfg.fencing {
		err = w.p.open.tokens(ctx, tokens)
	}
	if err != nil {
		// If the driver is still in the statement (stuck), the connection is
		// discarded when it comes back.
		w.p.dropWait(w, stuck)
		return grantSet{}, at, err // waitLock classified it already
	}
	return grantSet{l: w, tokens: tokens, own: true}, 0, nil
}

// pinStmt runs q, a savepoint's statement, on a pinned session s held by
// the caller: short, it runs to the end (at most stmtTime) whatever ctx
// says.
func pinStmt(ctx context.Context, s *session, q string, stmtTime time.Duration) error {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stmtTime)
	defer cancel()
	return s.runStmt(sctx, func(ctx context.Context) error { return s.c.exec(ctx, q) })
}

// cutter returns what cuts c's socket under a running statement, for
// waitSpec.cut, or nil if its driver is not interruptible.
func cutter(c conn) func() {
	if !c.interruptible() {
		return nil
	}
	return c.closeSocket
}
