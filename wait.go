package pglocks

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
	grace   time.Duration
	closing <-chan struct{} // nil, or closed when the Locker closes
	// closeCtx, if set, is done when the Locker closes (as closing), for
	// waitInline.
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
// be confirmed within s.grace, in which case the driver's context is
// cancelled too (and the caller discards the connection).
//
// After an error the lock may still have been granted (a cancel can race with
// the grant): the caller must discard the connection or roll back.
func waitLock(ctx context.Context, s waitSpec) error {
	if s.cut != nil && s.cancel != nil {
		return waitInline(ctx, s)
	}
	deadline, hasDeadline := ctx.Deadline()
	limit := ""
	qctx, qcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer qcancel()
	if hasDeadline {
		left := time.Until(deadline)
		if left <= 0 {
			return context.DeadlineExceeded
		}
		ms := (left + time.Millisecond - 1) / time.Millisecond // lock_timeout 0 would mean "no limit"
		if ms > math.MaxInt32 {
			// Beyond lock_timeout's range (24.8 days): the client cancels
			// the wait when the deadline comes, as for a cancelled ctx.
			hasDeadline = false
		} else {
			limit = strconv.FormatInt(int64(ms), 10)
			var dcancel context.CancelFunc
			qctx, dcancel = context.WithDeadline(qctx, deadline.Add(s.grace))
			defer dcancel()
		}
	}
	q, args := s.stmt(limit)
	done := make(chan error, 1)
	go func() { done <- s.run(qctx, q, args) }()

	var stop error
	select {
	case err := <-done:
		switch {
		case err == nil:
			return nil
		case ctx.Err() != nil:
			// A driver's own cancel request, sent when ctx ended during an
			// earlier statement, may land on this one.
			return fmt.Errorf("%w: %w", ctxError(ctx), err)
		case hasDeadline && (sqlState(err) == stateLockNotAvailable || qctx.Err() != nil):
			return fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
		}
		return serverEnded(err)
	case <-ctx.Done():
		stop = ctxError(ctx)
	case <-s.closing:
		stop = ErrClosed
	}

	// Stop the wait on the server before returning, so that nothing of ours
	// stays queued there.
	give := time.NewTimer(s.grace)
	defer give.Stop()
	if hasDeadline && ctx.Err() == context.DeadlineExceeded {
		// The server's lock_timeout fires at the same moment.
		var err error
		select {
		case err = <-done:
		case <-give.C:
			if !s.giveUp(qcancel, done) {
				return stop
			}
		}
		if err != nil {
			return fmt.Errorf("%w: %w", stop, err)
		}
		return stop
	}
	if s.cancel == nil {
		s.giveUp(qcancel, done)
		return stop
	}
	retry := time.NewTicker(cancelRetry)
	defer retry.Stop()
	for {
		cctx, ccancel := context.WithTimeout(context.Background(), cancelTimeout)
		err := s.cancel(cctx)
		ccancel()
		if err != nil {
			// The cancel could not be sent: leave it to the driver.
			s.giveUp(qcancel, done)
			return stop
		}
		select {
		case <-done:
			return stop
		case <-retry.C:
		case <-give.C:
			s.giveUp(qcancel, done)
			return stop
		}
	}
}

// giveUp cancels the statement's context, which makes the driver stop it, and
// waits for it to end: at most s.grace if s.abandon is set. It reports
// whether the statement ended.
func (s waitSpec) giveUp(qcancel context.CancelFunc, done <-chan error) bool {
	qcancel()
	if s.abandon == nil {
		<-done
		return true
	}
	t := time.NewTimer(s.grace)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		s.abandon(done)
		return false
	}
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

// waitInline is waitLock for a session whose socket can be cut (s.cut): the
// statement runs here, without a context for the driver to watch, and no
// goroutine watches it unless it must be stopped: callbacks on ctx and on
// the Locker's closing start one, which sends cancel requests and cuts the
// socket if the server does not stop the statement within s.grace; a timer
// cuts it if the server does not answer by the deadline plus s.grace. If
// the wait was stopped, it fails even if the server granted the lock
// meanwhile: the caller discards the session.
func waitInline(ctx context.Context, s waitSpec) error {
	limit, deadline, expired := lockTimeout(ctx)
	if expired {
		return context.DeadlineExceeded
	}
	hasDeadline := limit != ""
	q, args := s.stmt(limit)

	var (
		mu       sync.Mutex
		ended    bool  // the statement returned: nothing may cancel it now
		stop     error // why the statement was stopped, or nil
		stopping sync.WaitGroup
	)
	finished := make(chan struct{})
	// act records why the statement is being stopped, unless it has ended;
	// it reports whether the caller is the one to stop it.
	act := func(why error) bool {
		mu.Lock()
		defer mu.Unlock()
		if ended || stop != nil {
			return false
		}
		stop = why
		stopping.Add(1)
		return true
	}
	stopper := func(why error) {
		if !act(why) {
			return
		}
		go func() {
			defer stopping.Done()
			if hasDeadline && errors.Is(why, context.DeadlineExceeded) {
				return // the server's lock_timeout ends it at the same moment
			}
			grace := time.NewTimer(s.grace)
			defer grace.Stop()
			retry := time.NewTicker(cancelRetry)
			defer retry.Stop()
			for {
				cctx, ccancel := context.WithTimeout(context.Background(), cancelTimeout)
				err := s.cancel(cctx)
				ccancel()
				if err != nil {
					s.cut() // the cancel could not be sent
					return
				}
				select {
				case <-finished:
					return
				case <-retry.C:
				case <-grace.C:
					s.cut()
					return
				}
			}
		}()
	}
	unCtx := context.AfterFunc(ctx, func() { stopper(ctxError(ctx)) })
	unClose := func() bool { return true }
	if s.closeCtx != nil {
		unClose = context.AfterFunc(s.closeCtx, func() { stopper(ErrClosed) })
	}
	var giveUp *time.Timer
	if hasDeadline {
		// The server answers at its lock_timeout; if it does not (a silent
		// network), cut the socket.
		giveUp = time.AfterFunc(time.Until(deadline)+s.grace, func() {
			mu.Lock()
			over := ended
			mu.Unlock()
			if !over {
				s.cut()
			}
		})
	}

	err := s.run(context.Background(), q, args)
	mu.Lock()
	ended = true
	why := stop
	mu.Unlock()
	close(finished)
	unCtx()
	unClose()
	if giveUp != nil {
		giveUp.Stop()
	}
	if why != nil {
		// A cancel request being sent must reach the server before the
		// caller's next statement on the session (its clearing), or it could
		// cancel that one instead.
		stopping.Wait()
	}
	switch {
	case why != nil && hasDeadline && errors.Is(why, context.DeadlineExceeded):
		if err != nil {
			return fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
		}
		return context.DeadlineExceeded
	case why != nil:
		// The wait was stopped: it fails, whatever the server said last.
		if err != nil {
			return fmt.Errorf("%w: %w", why, err)
		}
		return why
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("%w: %w", ctxError(ctx), err)
	case hasDeadline && (sqlState(err) == stateLockNotAvailable || time.Now().After(deadline)):
		return fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
	}
	return serverEnded(err)
}
