package pglocks

// watch.go: watchers, which read the socket of an idle session so that its
// end, and notifications, are heard at once.

import (
	"context"
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
// Whoever uses the session holds its sem; a watcher holds it too. A
// goroutine that needs the session calls enter, which stops the watcher (by
// putting a read deadline in the past, which pgx survives: a read that times
// out leaves the connection usable) and waits for it to let go. Watchers are
// started by the heartbeat after a probe, after a wait was granted, and once
// a session that holds locks or listens has been idle for idleWatchAfter,
// so a busy session pays for none between its statements.

// idleWatchAfter is how long a session that holds locks, or listens, must
// be idle before a watcher reads its socket. A busy session is not watched
// between its statements, where stopping the watcher would cost more than
// it brings.
const idleWatchAfter = 3 * time.Millisecond

// drainEvery is how often a busy listening session hands on the
// notifications that came during its statements (see drain).
const drainEvery = time.Millisecond

// watchers start and run the watchers of a Locker's sessions. They are
// given, when the pool makes them, what to do with what they hear.
type watchers struct {
	g        *group
	closeCtx context.Context // kicks every watcher when the Locker closes
	// fail closes a session that ended, reporting its locks lost.
	fail func(s *session, err error)
	// heard is told of a notification from another session. It must not
	// block, nor use the session.
	heard func(n *pgconn.Notification)
}

// idle arms s's idle timer after a batch: if s holds locks or listens and
// stays idle for idleWatchAfter, a watcher reads its socket.
func (ws *watchers) idle(s *session) {
	if !s.c.watchable() || (s.held.Load() == 0 && !s.watch.listening.Load()) || s.dead.Load() || ws.g.isClosed() {
		return
	}
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	if s.watch.idle == nil {
		s.watch.idle = time.AfterFunc(idleWatchAfter, func() { ws.watchIdle(s) })
		return
	}
	s.watch.idle.Reset(idleWatchAfter)
}

// watchIdle starts a watcher on s if nobody uses it.
func (ws *watchers) watchIdle(s *session) {
	if s.dead.Load() || s.watch.w.Load() != nil || !ws.g.start() {
		return
	}
	defer ws.g.done()
	if s.queued() || !s.tryEnter() {
		return
	}
	// dead is set before a session is given back, and giving back enters
	// the session: holding it now, we see it if it happened.
	if s.dead.Load() {
		s.leave()
		return
	}
	ws.drain(s)
	ws.hand(s)
}

// hand hands s, which the caller holds (sem), to a watcher, or gives it up
// if it cannot be watched. The caller is counted in ws.g.
func (ws *watchers) hand(s *session) {
	if !s.c.watchable() || s.guard.broken != nil || s.dead.Load() {
		s.leave()
		return
	}
	w := &watcher{c: s.c, kicked: make(chan struct{}), done: make(chan struct{})}
	s.watch.w.Store(w)
	if s.watch.want.Load() > 0 {
		// Someone is waiting for the session. They may have seen w and
		// kicked it already: then undo the kick's deadline, and let them
		// see w done.
		s.watch.w.Store(nil)
		if !w.stopped.CompareAndSwap(false, true) {
			<-w.kicked
			_ = s.c.setReadDeadline(time.Time{})
		}
		s.leave()
		close(w.done)
		return
	}
	ws.g.add()
	go ws.loop(s, w)
}

func (ws *watchers) loop(s *session, w *watcher) {
	defer ws.g.done()
	stop := context.AfterFunc(ws.closeCtx, w.kick)
	var err error
	for !w.stopped.Load() {
		// Only a notification ends this wait without an error; any other
		// message is handled by pgx.
		var n *pgconn.Notification
		n, err = s.c.waitIdle(context.Background())
		if n != nil && s.watch.listening.Load() && n.PID != uint32(s.pid) {
			ws.heard(n) // not our own
		}
		if err != nil && !pgconn.Timeout(err) {
			break
		}
		err = nil
	}
	stop()
	if err != nil {
		ws.fail(s, endedError{err}) // a FATAL, or the socket closed
	}
	if w.stopped.Load() {
		<-w.kicked
		_ = s.c.setReadDeadline(time.Time{})
	}
	s.watch.w.CompareAndSwap(w, nil)
	s.leave()
	close(w.done)
}

// drained is a context that is already done: waitIdle with it returns the
// notifications that arrived during earlier statements, and then at once.
var drained = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// drain hands on the notifications that arrived on s, the listening
// session, while it ran statements. The caller holds sem.
func (ws *watchers) drain(s *session) {
	if !s.watch.listening.Load() || s.guard.broken != nil {
		return
	}
	// At most once per drainEvery: asking pgx costs allocations when
	// nothing came, which is the common case. What comes between is
	// handed on by the next drain, or by the watcher once the session is
	// idle for idleWatchAfter.
	now := time.Now().UnixNano()
	if last := s.watch.drained.Load(); now-last < int64(drainEvery) && now >= last {
		return
	}
	s.watch.drained.Store(now)
	for {
		n, _ := s.c.waitIdle(drained)
		if n == nil {
			return
		}
		if n.PID != uint32(s.pid) {
			ws.heard(n) // not our own
		}
	}
}
