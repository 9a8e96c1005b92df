package pglocks

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// req is one statement on a holder session.
type req struct {
	q    string
	args []any
	dest []any
	// check, if set, judges a statement that ran without error (an unlock
	// that returns false).
	check func() error
	// onErr, if set, sees a server error first; it may run statements on
	// the session, and returns keepConn when the session is intact.
	onErr func(ctx context.Context, err error) error
	err   error
	done  chan struct{}
}

// maxBatch bounds how many statements one round trip carries.
const maxBatch = 512

// do runs r on h and returns its error. Statements from many goroutines are
// combined: whoever finds h idle leads, sending everything queued meanwhile
// in one round trip (a pgx batch), so that goroutines holding many locks on
// one session do not each wait a round trip. ctx bounds nothing once r is
// queued: the statement is short, and a session that stops answering is cut
// off by the heartbeat. If r fails (except with keepConn), the session is
// closed and every lock on it is reported lost.
func (l *Locker) do(ctx context.Context, h *holder, r *req) error {
	if err := ctx.Err(); err != nil {
		return ctxError(ctx)
	}
	r.done = make(chan struct{})
	h.qmu.Lock()
	h.queue = append(h.queue, r)
	lead := !h.leading
	h.leading = true
	h.qmu.Unlock()
	if lead {
		l.lead(h)
	}
	<-r.done
	if k, ok := r.err.(keepConn); ok {
		return k.err
	}
	return r.err
}

// doMany runs rs on h as do runs one, queued together so that they share
// round trips, and sets each one's err.
func (l *Locker) doMany(ctx context.Context, h *holder, rs []*req) {
	if err := ctx.Err(); err != nil {
		for _, r := range rs {
			r.err = ctxError(ctx)
		}
		return
	}
	for _, r := range rs {
		r.done = make(chan struct{})
	}
	h.qmu.Lock()
	h.queue = append(h.queue, rs...)
	lead := !h.leading
	h.leading = true
	h.qmu.Unlock()
	if lead {
		l.lead(h)
	}
	for _, r := range rs {
		<-r.done
		if k, ok := r.err.(keepConn); ok {
			r.err = k.err
		}
	}
}

// lead runs h's queued statements until none is left.
func (l *Locker) lead(h *holder) {
	for {
		h.qmu.Lock()
		n := min(len(h.queue), maxBatch)
		if n == 0 {
			h.leading = false
			h.qmu.Unlock()
			return
		}
		batch := h.queue[:n:n]
		h.queue = h.queue[n:]
		h.qmu.Unlock()

		h.enter() // not beside a heartbeat probe or a watcher
		redo := l.runBatch(h, batch)
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
// did not run (those after a server error in a pgx batch, which the server
// skipped), to be sent again.
func (l *Locker) runBatch(h *holder, batch []*req) (redo []*req) {
	if h.broken != nil {
		for _, r := range batch {
			r.err = h.broken
		}
		return nil
	}
	pg, isPgx := h.c.(*pgxConn)
	if len(batch) == 1 || !isPgx || l.cfg.fencing {
		// One at a time: fencing tokens must each come from a transaction
		// of their own.
		for i, r := range batch {
			r.err = l.runOne(h, r)
			if _, keep := r.err.(keepConn); r.err != nil && !keep {
				l.fail(h, r.err)
				for _, rest := range batch[i+1:] {
					rest.err = h.broken
				}
				return nil
			}
		}
		return nil
	}

	b := &pgx.Batch{}
	for _, r := range batch {
		b.Queue(r.q, r.args...)
	}
	h.busySince.Store(time.Now().UnixNano())
	br := pg.c.SendBatch(context.Background(), b)
	failed := -1
	for i, r := range batch {
		if err := br.QueryRow().Scan(r.dest...); err != nil {
			r.err, failed = err, i
			break
		}
	}
	cerr := br.Close()
	h.busySince.Store(0)
	var bad error // why the session must go
	switch {
	case failed < 0 && cerr != nil:
		bad = cerr
	case failed >= 0:
		r := batch[failed]
		if sqlState(r.err) != "" && r.onErr != nil {
			r.err = r.onErr(context.Background(), r.err)
		}
		if _, keep := r.err.(keepConn); !keep {
			bad = r.err
		} else {
			redo = batch[failed+1:]
		}
	}
	for i, r := range batch {
		if failed >= 0 && i >= failed {
			break
		}
		if r.check != nil {
			if err := r.check(); err != nil && r.err == nil {
				r.err = err
				if bad == nil {
					bad = err
				}
			}
		}
	}
	if bad != nil {
		l.fail(h, bad)
		for _, r := range batch {
			if r.err == nil && contains(batch[max(failed, 0):], r) && failed >= 0 {
				r.err = h.broken
			}
		}
		return nil
	}
	return redo
}

// runOne runs r alone on h, holding h.sem.
func (l *Locker) runOne(h *holder, r *req) error {
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
	if h.c.pgConn() != nil {
		// No deadline on the hot path: a cancellable context costs pgx a
		// goroutine per statement. The heartbeat closes the socket under a
		// statement that runs longer than the heartbeat timeout instead.
		h.busySince.Store(time.Now().UnixNano())
		defer h.busySince.Store(0)
		return f(context.Background())
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.cfg.hbTimeout)
	defer cancel()
	return l.runStmt(ctx, h, f)
}
