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
// (a terminated backend, a restart or crash: the server
// says FATAL and closes the socket) is reported lost as soon as the server
// says so, instead of at the next heartbeat. A silent network says nothing;
// the heartbeat still covers that.
//
// Whoever uses the session holds h.sem; a watcher holds it too. A goroutine
// that needs the session calls enter, which stops the watcher (by putting a
// read deadline in the past, which pgx survives: a read that times out
// leaves the connection usable) and waits for it to let go. Watchers are
// started only by the heartbeat after a probe and after a wait was granted,
// so a busy session pays for at most one stop per heartbeat.

// watcher is one watch of a holder's session.
type watcher struct {
	pg      *pgconn.PgConn
	stopped atomic.Bool
	kicked  chan struct{} // closed once the read deadline is set
	done    chan struct{} // closed once the watcher let go of the session
}

// kick stops w: at most once, and returns at once.
func (w *watcher) kick() {
	if w.stopped.CompareAndSwap(false, true) {
		_ = w.pg.Conn().SetReadDeadline(time.Now())
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

// watch hands h's session, which the caller holds (h.sem), to a watcher, or
// gives it up if it cannot be watched.
func (l *Locker) watch(h *holder) {
	pg := h.c.pgConn()
	if pg == nil || h.broken != nil {
		h.leave()
		return
	}
	w := &watcher{pg: pg, kicked: make(chan struct{}), done: make(chan struct{})}
	h.watcher.Store(w)
	if h.want.Load() > 0 {
		// Someone is waiting for the session. They may have seen w and
		// kicked it already: then undo the kick's deadline, and let them
		// see w done.
		h.watcher.Store(nil)
		if !w.stopped.CompareAndSwap(false, true) {
			<-w.kicked
			_ = pg.Conn().SetReadDeadline(time.Time{})
		}
		h.leave()
		close(w.done)
		return
	}
	l.bg.Add(1)
	go l.watchLoop(h, w)
}

func (l *Locker) watchLoop(h *holder, w *watcher) {
	defer l.bg.Done()
	stop := context.AfterFunc(l.closeCtx, w.kick)
	var err error
	for !w.stopped.Load() {
		// Nothing but a notification ends this wait without an error, and
		// the Locker never listens: any other message is handled by pgx.
		err = w.pg.WaitForNotification(context.Background())
		if err != nil && !pgconn.Timeout(err) {
			break
		}
		err = nil
	}
	stop()
	if err != nil {
		l.fail(h, fmt.Errorf("the server ended the session: %w", err))
	}
	if w.stopped.Load() {
		<-w.kicked
		_ = w.pg.Conn().SetReadDeadline(time.Time{})
	}
	h.watcher.CompareAndSwap(w, nil)
	h.leave()
	close(w.done)
}
