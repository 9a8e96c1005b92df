package pglocks

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// A session that holds locks is idle most of the time. While it is, a
// watcher goroutine reads its socket, so that a session ended by the server
// (a terminated backend, a restart or crash: the server says FATAL and
// closes the socket) is reported lost as soon as the server says so,
// instead of at the next heartbeat; and on the listening session,
// notifications from other Lockers are heard as they come. A silent network
// says nothing; the heartbeat still covers that.
//
// Whoever uses the session holds h.sem; a watcher holds it too. A goroutine
// that needs the session calls enter, which stops the watcher (by putting a
// read deadline in the past, which pgx survives: a read that times out
// leaves the connection usable) and waits for it to let go. Watchers are
// started by the heartbeat after a probe, after a wait was granted, and once
// a session that holds locks or listens has been idle for idleWatchAfter,
// so a busy session pays for none between its statements.

// watcher is one watch of a holder's session.
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

// enter takes h's session for a statement, stopping its watcher first.
func (h *holder) enter() {
	h.want.Add(1)
	h.stopWatch()
	h.sem <- struct{}{}
	h.want.Add(-1)
}

// tryEnter is enter that does not wait for a statement to end.
func (h *holder) tryEnter() bool {
	h.want.Add(1)
	defer h.want.Add(-1)
	h.stopWatch()
	select {
	case h.sem <- struct{}{}:
		return true
	default:
		return false
	}
}

// leave gives h's session up after enter.
func (h *holder) leave() { <-h.sem }

func (h *holder) stopWatch() {
	if w := h.watcher.Load(); w != nil {
		w.kick()
		<-w.done
	}
}

// idleWatch arms h's idle timer after a batch: if h holds locks or listens
// and stays idle for idleWatchAfter, a watcher reads its socket.
func (s *sessions) idleWatch(h *holder) {
	if !h.c.watchable() || (h.held.Load() == 0 && !h.listening.Load()) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || h.dead.Load() {
		return
	}
	if h.idle == nil {
		h.idle = time.AfterFunc(idleWatchAfter, func() { s.watchIdle(h) })
		return
	}
	h.idle.Reset(idleWatchAfter)
}

// watchIdle starts a watcher on h if nobody uses it.
func (s *sessions) watchIdle(h *holder) {
	s.mu.Lock()
	if s.closed || h.dead.Load() || h.watcher.Load() != nil {
		s.mu.Unlock()
		return
	}
	s.bg.Add(1) // s.closed is false: Close has not begun to wait
	s.mu.Unlock()
	defer s.bg.Done()
	h.qmu.Lock()
	busy := h.leading || len(h.queue) > 0
	h.qmu.Unlock()
	if busy || !h.tryEnter() {
		return
	}
	// dead is set before a session is given back, and giving back enters
	// the session: holding it now, we see it if it happened.
	if h.dead.Load() {
		h.leave()
		return
	}
	s.drain(h)
	s.watch(h)
}

// watch hands h's session, which the caller holds (h.sem), to a watcher, or
// gives it up if it cannot be watched.
func (s *sessions) watch(h *holder) {
	if !h.c.watchable() || h.broken != nil || h.dead.Load() {
		h.leave()
		return
	}
	w := &watcher{c: h.c, kicked: make(chan struct{}), done: make(chan struct{})}
	h.watcher.Store(w)
	if h.want.Load() > 0 {
		// Someone is waiting for the session. They may have seen w and
		// kicked it already: then undo the kick's deadline, and let them
		// see w done.
		h.watcher.Store(nil)
		if !w.stopped.CompareAndSwap(false, true) {
			<-w.kicked
			_ = h.c.setReadDeadline(time.Time{})
		}
		h.leave()
		close(w.done)
		return
	}
	s.bg.Add(1)
	go s.watchLoop(h, w)
}

func (s *sessions) watchLoop(h *holder, w *watcher) {
	defer s.bg.Done()
	stop := context.AfterFunc(s.closeCtx, w.kick)
	var err error
	for !w.stopped.Load() {
		// Only a notification ends this wait without an error; any other
		// message is handled by pgx.
		var n *pgconn.Notification
		n, err = h.c.waitIdle(context.Background())
		if n != nil && h.listening.Load() && n.PID != uint32(h.pid) {
			s.heard(n) // not our own
		}
		if err != nil && !pgconn.Timeout(err) {
			break
		}
		err = nil
	}
	stop()
	if err != nil {
		s.fail(h, fmt.Errorf("the server ended the session: %w", err))
	}
	if w.stopped.Load() {
		<-w.kicked
		_ = h.c.setReadDeadline(time.Time{})
	}
	h.watcher.CompareAndSwap(w, nil)
	h.leave()
	close(w.done)
}

// drained is a context that is already done: waitIdle with it returns the
// notifications that arrived during earlier statements, and then at once.
var drained = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// drain hands on the notifications that arrived on h, the listening
// session, while it ran statements. The caller holds h.sem.
func (s *sessions) drain(h *holder) {
	if !h.listening.Load() || h.broken != nil {
		return
	}
	for {
		n, _ := h.c.waitIdle(drained)
		if n == nil {
			return
		}
		if n.PID != uint32(h.pid) {
			s.heard(n) // not our own
		}
	}
}
