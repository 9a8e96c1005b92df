package pglocks

import (
	"context"
	"time"
)

// req is one statement on a holder session.
type req struct {
	row
	// check, if set, judges a statement that ran without error (an unlock
	// that returns false).
	check func() error
	// onErr, if set, sees a server error first; it may run statements on
	// the session, and returns keepConn when the session is intact.
	onErr func(ctx context.Context, err error) error
	// txn marks a statement whose effect is transactional (a notification,
	// a set_config): in a pipelined batch, which is one transaction, a later
	// statement's error undoes it, so it is run again.
	txn  bool
	err  error
	done chan struct{}
}

// keepConn marks a statement error after which the session is known to be
// intact and to hold exactly what it held before.
type keepConn struct{ err error }

func (k keepConn) Error() string { return k.err.Error() }
func (k keepConn) Unwrap() error { return k.err }

// maxBatch bounds how many statements one round trip carries.
const maxBatch = 512

// do runs r on h and returns its error. Statements from many goroutines are
// combined: whoever finds h idle leads, sending everything queued meanwhile
// in one round trip where the driver pipelines, so that goroutines holding
// many locks on one session do not each wait a round trip. ctx bounds
// nothing once r is queued: the statement is short, and a session that
// stops answering is cut off by the heartbeat. If r fails (except with
// keepConn), the session is closed and every lock on it is reported lost.
func (s *sessions) do(ctx context.Context, h *holder, r *req) error {
	if err := ctx.Err(); err != nil {
		return ctxError(ctx)
	}
	r.done = make(chan struct{})
	s.enqueue(h, r)
	<-r.done
	if k, ok := r.err.(keepConn); ok {
		return k.err
	}
	return r.err
}

// doMany runs rs on h as do runs one, queued together so that they share
// round trips, and sets each one's err.
func (s *sessions) doMany(ctx context.Context, h *holder, rs []*req) {
	if err := ctx.Err(); err != nil {
		for _, r := range rs {
			r.err = ctxError(ctx)
		}
		return
	}
	for _, r := range rs {
		r.done = make(chan struct{})
	}
	s.enqueue(h, rs...)
	for _, r := range rs {
		<-r.done
		if k, ok := r.err.(keepConn); ok {
			r.err = k.err
		}
	}
}

// enqueue queues rs on h, and leads if nobody does.
func (s *sessions) enqueue(h *holder, rs ...*req) {
	h.qmu.Lock()
	h.queue = append(h.queue, rs...)
	lead := !h.leading
	h.leading = true
	h.qmu.Unlock()
	if lead {
		s.lead(h)
	}
}

// lead runs h's queued statements until none is left, then arms the
// session's idle watcher.
func (s *sessions) lead(h *holder) {
	for {
		h.qmu.Lock()
		n := min(len(h.queue), maxBatch)
		if n == 0 {
			h.leading = false
			h.qmu.Unlock()
			s.idleWatch(h)
			return
		}
		batch := h.queue[:n:n]
		h.queue = h.queue[n:]
		h.qmu.Unlock()

		h.enter() // not beside a heartbeat probe or a watcher
		redo := s.runBatch(h, batch)
		s.drain(h)
		h.leave()
		if len(redo) > 0 {
			h.qmu.Lock()
			h.queue = append(redo, h.queue...)
			h.qmu.Unlock()
		}
		for _, r := range batch {
			if !contains(redo, r) {
				close(r.done)
			}
		}
	}
}

func contains(rs []*req, r *req) bool {
	for _, x := range rs {
		if x == r {
			return true
		}
	}
	return false
}

// runBatch runs batch on h, holding h.sem, and returns the statements that
// did not run (those after a server error in a pipelined batch, which the
// server skipped), to be sent again.
func (s *sessions) runBatch(h *holder, batch []*req) (redo []*req) {
	if h.broken != nil {
		for _, r := range batch {
			r.err = h.broken
		}
		return nil
	}
	if len(batch) == 1 || !h.c.pipelines() || s.cfg.fencing {
		// One at a time: fencing tokens must each come from a transaction
		// of their own, and a pipelined batch is one transaction.
		for i, r := range batch {
			r.err = s.runOne(h, r)
			if _, keep := r.err.(keepConn); r.err != nil && !keep {
				s.fail(h, r.err)
				for _, rest := range batch[i+1:] {
					rest.err = h.broken
				}
				return nil
			}
		}
		return nil
	}

	rows := make([]row, len(batch))
	for i, r := range batch {
		rows[i] = r.row
	}
	h.busySince.Store(time.Now().UnixNano())
	failed, err, cerr := h.c.batch(context.Background(), rows)
	h.busySince.Store(0)
	var bad error // why the session must go
	switch {
	case failed < 0 && cerr != nil:
		bad = cerr
	case failed >= 0:
		r := batch[failed]
		r.err = err
		if sqlState(err) != "" && r.onErr != nil {
			r.err = r.onErr(context.Background(), err)
		}
		if _, keep := r.err.(keepConn); !keep {
			bad = r.err
		} else {
			// The batch's transaction aborted: what ran before the error
			// and was transactional is undone; run it again with the rest.
			for _, before := range batch[:failed] {
				if before.txn {
					redo = append(redo, before)
				}
			}
			redo = append(redo, batch[failed+1:]...)
		}
	}
	ran := batch
	if failed >= 0 {
		ran = batch[:failed]
	}
	for _, r := range ran {
		if r.check != nil && !contains(redo, r) {
			if err := r.check(); err != nil {
				r.err = err
				if bad == nil {
					bad = err
				}
			}
		}
	}
	if bad != nil {
		s.fail(h, bad)
		if failed >= 0 {
			for _, r := range batch[failed:] {
				if r.err == nil {
					r.err = h.broken
				}
			}
		}
		return nil
	}
	return redo
}

// runOne runs r alone on h, holding h.sem.
func (s *sessions) runOne(h *holder, r *req) error {
	f := func(ctx context.Context) error {
		err := h.c.query(ctx, r.q, r.args, r.dest...)
		if err != nil && sqlState(err) != "" && r.onErr != nil {
			return r.onErr(ctx, err)
		}
		if err == nil && r.check != nil {
			err = r.check()
		}
		return err
	}
	if h.c.interruptible() {
		// No deadline on the hot path: a cancellable context costs pgx a
		// goroutine per statement. The heartbeat closes the socket under a
		// statement that runs longer than the heartbeat timeout instead.
		h.busySince.Store(time.Now().UnixNano())
		defer h.busySince.Store(0)
		return f(context.Background())
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.hbTimeout)
	defer cancel()
	return s.runStmt(ctx, h, f)
}
