package pglocks

// batch.go: the statement pipeline of a session: statements of many
// goroutines share round trips.

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"time"
)

// keepConn marks a statement error after which the session is known to be
// intact and to hold exactly what it held before.
type keepConn struct{ err error }

func (k keepConn) Error() string { return k.err.Error() }
func (k keepConn) Unwrap() error { return k.err }

// maxBatch bounds how many statements one round trip carries.
const maxBatch = 512

// batcher runs statements on the pool's sessions. Statements from many
// goroutines are combined: whoever finds a session idle leads, sending
// everything queued meanwhile in one round trip where the driver pipelines,
// so that goroutines holding many locks on one session do not each wait a
// round trip. If a statement fails (except with keepConn), the session is
// closed and every lock on it is reported lost (pool.fail).
type batcher struct {
	pool *pool
	cfg  *config
	// posted is told of each statement queued by post once it has run (or
	// will not): its err says how.
	posted func(r *req)
}

// postFor bounds how long a statement queued by post waits for company: if
// nothing else is sent on its session meanwhile, it goes alone.
const postFor = 500 * time.Microsecond

// combines reports whether a statement posted on s would share the round
// trip of the next: s pipelines, and sends a batch as one (without fencing
// tokens, each read in a transaction of its own, unless pinned).
func (b *batcher) combines(s *session) bool {
	return s.c.pipelines() && (!b.cfg.fencing || s.pinned)
}

// post queues r on s without waiting for it: it goes in the round trip of
// the next statement sent on s, or alone within postFor, and the batcher's
// posted sees it once it has run. The caller has added r to r.done, and
// counts the use of s until then.
func (b *batcher) post(s *session, r *req) {
	s.pipe.mu.Lock()
	s.pipe.queue = append(s.pipe.queue, r)
	if !s.pipe.leading {
		// Nobody is sending: the next statement will, or the timer.
		if s.pipe.later == nil {
			s.pipe.later = time.AfterFunc(postFor, func() { b.kick(s) })
		} else {
			s.pipe.later.Reset(postFor)
		}
	}
	s.pipe.mu.Unlock()
}

// kick sends what is queued on s now, unless someone is sending already.
func (b *batcher) kick(s *session) {
	s.pipe.mu.Lock()
	lead := !s.pipe.leading && len(s.pipe.queue) > 0
	s.pipe.leading = s.pipe.leading || lead
	s.pipe.mu.Unlock()
	if lead {
		b.flush(s)
	}
}

// do runs r on s and returns its error. ctx bounds nothing once r is
// queued: the statement is short, and a session that stops answering is cut
// off by the heartbeat.
func (b *batcher) do(ctx context.Context, s *session, r *req) error {
	if err := ctx.Err(); err != nil {
		return ctxError(ctx)
	}
	r.done.Add(1)
	b.enqueue(s, r)
	r.done.Wait()
	if k, ok := r.err.(keepConn); ok {
		return k.err
	}
	return r.err
}

// doMany runs rs on s as do runs one, queued together so that they share
// round trips, and sets each one's err.
func (b *batcher) doMany(ctx context.Context, s *session, rs []*req) {
	if err := ctx.Err(); err != nil {
		for _, r := range rs {
			r.err = ctxError(ctx)
		}
		return
	}
	for _, r := range rs {
		r.done.Add(1)
	}
	b.enqueue(s, rs...)
	for _, r := range rs {
		r.done.Wait()
		if k, ok := r.err.(keepConn); ok {
			r.err = k.err
		}
	}
}

// enqueue queues rs on s, and leads if nobody does.
func (b *batcher) enqueue(s *session, rs ...*req) {
	s.pipe.mu.Lock()
	s.pipe.queue = append(s.pipe.queue, rs...)
	lead := !s.pipe.leading
	s.pipe.leading = true
	if lead && s.pipe.later != nil {
		s.pipe.later.Stop() // what post queued goes now
	}
	s.pipe.mu.Unlock()
	if lead {
		b.flush(s)
	}
}

// flush runs s's queued statements until none is left, then arms the
// session's idle watcher.
func (b *batcher) flush(s *session) {
	for {
		s.pipe.mu.Lock()
		n := min(len(s.pipe.queue), maxBatch)
		batch := s.pipe.queue[:n:n]
		s.pipe.queue = s.pipe.queue[n:]
		if len(s.pipe.queue) == 0 && s.pipe.spare != nil {
			// Queue the next statements in the array of the batch before
			// last, instead of a new one.
			s.pipe.queue, s.pipe.spare = s.pipe.spare, nil
		}
		s.pipe.leading = n > 0
		s.pipe.mu.Unlock()
		if n == 0 {
			break
		}
		s.enter() // not beside a heartbeat probe or a watcher
		redo := b.run(s, batch)
		b.pool.watch.drain(s)
		s.leave()
		if len(redo) > 0 {
			s.pipe.mu.Lock()
			s.pipe.queue = append(redo, s.pipe.queue...)
			s.pipe.mu.Unlock()
		}
		for _, r := range batch {
			if !slices.Contains(redo, r) {
				b.finish(r)
			}
		}
		clear(batch)
		s.pipe.mu.Lock()
		if s.pipe.spare == nil {
			s.pipe.spare = batch[:0]
		}
		s.pipe.mu.Unlock()
		if n > 1 {
			// The goroutines just woken will likely send their next
			// statements at once: let them queue before looking, so that
			// they go in one round trip, not one alone and the rest after.
			runtime.Gosched()
		}
	}
	b.pool.watch.idle(s)
}

// finish ends r, which ran or will not: its waiter goes on, or posted
// hears of it.
func (b *batcher) finish(r *req) {
	if r.unlock != nil {
		if k, ok := r.err.(keepConn); ok {
			r.err = k.err
		}
		b.posted(r)
	}
	r.done.Done()
}

// run runs batch on s, holding s.sem, and returns the statements that did
// not run (those after a server error in a pipelined batch, which the
// server skipped), to be sent again.
func (b *batcher) run(s *session, batch []*req) (redo []*req) {
	switch {
	case s.guard.broken != nil:
		for _, r := range batch {
			r.err = s.guard.broken
		}
		return nil
	case s.c.pipelines() && s.pinned:
		// Between a savepoint and its release, in one round trip.
		return b.runPipelined(s, batch)
	case len(batch) > 1 && s.c.pipelines() && !b.cfg.fencing:
		return b.runPipelined(s, batch)
	}
	// One at a time: fencing tokens must each come from a transaction of
	// their own, and a pipelined batch is one transaction (a pinned
	// session's tokens are read elsewhere).
	for i, r := range batch {
		r.err = b.runOne(s, r)
		if _, keep := r.err.(keepConn); r.err != nil && !keep {
			b.pool.fail(s, r.err)
			for _, rest := range batch[i+1:] {
				rest.err = s.guard.broken
			}
			return nil
		}
	}
	return nil
}

// runPipelined runs batch, of several statements, in one round trip.
//
// On a pinned session the batch runs between a savepoint and its release,
// in the same round trip, and a statement's server error is undone back to
// the savepoint before its onErr runs: the error aborted the transaction,
// in which nothing else would run.
func (b *batcher) runPipelined(s *session, batch []*req) (redo []*req) {
	// Always on a pinned session: the trailing RELEASE, a utility statement,
	// also ends the portal of the last statement, which would otherwise
	// keep its snapshot while the session idles (extended protocol).
	saved := s.pinned
	failed, err, cerr := sendRows(s, batch, saved, b.cfg.hbTimeout)
	var bad error // why the session must go
	switch {
	case failed < 0 && cerr != nil:
		// The batch ended without a statement's error (the connection
		// failed, a statement was abandoned, a result went missing): what
		// its statements returned is not to be trusted, and the session
		// goes, freeing whatever they took. Each says so.
		b.pool.fail(s, cerr)
		for _, r := range batch {
			r.err = s.guard.broken
		}
		return nil
	case failed >= 0:
		redo, bad = failedAt(s, batch, failed, err, saved)
	}
	ran := batch
	if failed >= 0 {
		ran = batch[:failed]
	}
	for _, r := range ran {
		if !slices.Contains(redo, r) {
			if err := r.judge(); err != nil {
				r.err = err
				if bad == nil {
					bad = err
				}
			}
		}
	}
	if bad == nil {
		return redo
	}
	b.pool.fail(s, bad)
	if failed >= 0 {
		for _, r := range batch[failed:] {
			if r.err == nil {
				r.err = s.guard.broken
			}
		}
	}
	return nil
}

// failedAt handles the server's error err for batch[failed], for
// runPipelined: its onErr runs; if the session is intact (keepConn), the
// batch's transaction aborted, so what ran before and was transactional is
// undone and the server skipped the rest: both are returned to run again.
// Otherwise bad is why the session must go.
func failedAt(s *session, batch []*req, failed int, err error, saved bool) (redo []*req, bad error) {
	r := batch[failed]
	r.err = err
	if sqlState(err) != "" && r.onErr != nil {
		r.err = undoThen(context.Background(), s.c, saved, err, r.onErr)
	}
	if _, keep := r.err.(keepConn); !keep {
		return nil, r.err
	}
	for _, before := range batch[:failed] {
		if before.txn {
			redo = append(redo, before)
		}
	}
	return append(redo, batch[failed+1:]...), nil
}

// runOne runs r alone on s, holding s.sem.
func (b *batcher) runOne(s *session, r *req) error {
	if s.c.interruptible() {
		// No deadline on the hot path: a cancellable context costs pgx a
		// goroutine per statement. The heartbeat closes the socket under a
		// statement that runs longer than the heartbeat timeout instead.
		s.pipe.busySince.Store(time.Now().UnixNano())
		defer s.pipe.busySince.Store(0)
		return stmtOn(context.Background(), s, r)
	}
	return s.runBounded(b.cfg.hbTimeout, func() error { return stmtOn(context.Background(), s, r) })
}

// stmtOn runs r on s, with its error handling, for runOne.
func stmtOn(ctx context.Context, s *session, r *req) error {
	if s.pinned && r.onErr != nil {
		return runSaved(ctx, s.c, r)
	}
	err := s.c.query(ctx, r.q, r.args, r.dest...)
	if err != nil && sqlState(err) != "" && r.onErr != nil {
		return r.onErr(ctx, s.c, err)
	}
	if err == nil {
		err = r.judge()
	}
	return err
}

// unlockReq is the unlock of k, held in one mode on the session; the server
// saying it was not held fails the session.
func unlockReq(k Key, shared bool) *req {
	r := &req{mustHold: true}
	q, n := stmtQ(stmtUnlock, k, shared, false)
	r.setKey(q, n, k)
	r.destBuf[0] = &r.ok
	r.dest = r.destBuf[:1]
	return r
}

// unlockReqs are the unlocks of keys, held in one mode on one session.
func unlockReqs(keys []Key, shared bool) []*req {
	rs := make([]*req, len(keys))
	for i, k := range keys {
		rs[i] = unlockReq(k, shared)
	}
	return rs
}

// pingReq asks s's backend for its pid: answered, it shows that s's server
// session is alive (and is still the one the locks were taken on, which a
// transaction pooler could change); otherwise the session fails.
func pingReq(s *session) *req {
	r := &req{}
	var pid int32
	r.q, r.dest = sqlBackendPID, []any{&pid}
	r.check = func() error {
		if pid != s.pid {
			return fmt.Errorf("%w: the locks were taken on server session %d, the connection now reaches session %d", ErrTransactionPooling, s.pid, pid)
		}
		return nil
	}
	return r
}

// notifyReq sends payload p on notifyChannel. A notification is sent when
// its transaction commits, so if a later statement of the same pipelined
// batch aborts it, it is sent again (txn); one the server refuses (its
// notification queue full) leaves the session as it was.
func notifyReq(p string) *req {
	var s string
	return &req{row: row{q: sqlNotify, args: []any{p}, dest: []any{&s}}, txn: true,
		onErr: func(_ context.Context, _ conn, err error) error { return keepConn{err} }}
}

// onFullKeep is onFullUnlock for a try that holds nothing when it fails.
var onFullKeep = onFullUnlock("", nil)

// onFullUnlock is the onErr of a try when the server's lock table fills up
// during it (ErrLockTableFull): what the statement took before it failed
// stays held, since session locks outlive a failed statement, so q (with
// args), if not "", lets it go; the session then holds what it held before,
// and is kept. Other errors fail the session.
func onFullUnlock(q string, args []any) func(ctx context.Context, c conn, err error) error {
	return func(ctx context.Context, c conn, err error) error {
		if sqlState(err) != stateOutOfMemory {
			return err
		}
		if q != "" {
			if uerr := c.exec(ctx, q, args...); uerr != nil {
				return uerr
			}
		}
		return keepConn{classify(err)}
	}
}

// sendRows sends batch in one round trip (between a savepoint and its release
// if saved), and returns the index in batch of the statement that failed,
// or -1, and the errors as conn.batch does. A driver that is not
// interruptible is given up on after bound (see runBounded).
func sendRows(s *session, batch []*req, saved bool, bound time.Duration) (failed int, err, cerr error) {
	rows := make([]row, 0, len(batch)+2)
	if saved {
		rows = append(rows, row{q: sqlStmtSave})
	}
	for _, r := range batch {
		rows = append(rows, r.row)
	}
	if saved {
		rows = append(rows, row{q: sqlStmtRelease})
	}
	s.pipe.busySince.Store(time.Now().UnixNano())
	if s.c.interruptible() {
		failed, err, cerr = s.c.batch(context.Background(), rows)
	} else {
		var f int
		var ferr, fcerr error
		if cerr = s.runBounded(bound, func() error {
			f, ferr, fcerr = s.c.batch(context.Background(), rows)
			return nil
		}); cerr == nil {
			failed, err, cerr = f, ferr, fcerr
		} else {
			failed = -1
		}
	}
	s.pipe.busySince.Store(0)
	if saved && failed >= 0 {
		failed-- // rows[0] is the savepoint
		if failed < 0 || failed == len(batch) {
			failed, cerr = -1, err // the savepoint failed, or its release
		}
	}
	return failed, err, cerr
}

// undoThen runs onErr for a statement's server error err, first undoing
// the transaction back to the batch's savepoint if saved.
func undoThen(ctx context.Context, c conn, saved bool, err error, onErr func(context.Context, conn, error) error) error {
	if saved {
		if uerr := c.exec(ctx, sqlStmtUndo); uerr != nil {
			return uerr
		}
		if uerr := c.exec(ctx, sqlStmtRelease); uerr != nil {
			return uerr
		}
	}
	return onErr(ctx, c, err)
}

// runSaved runs r on a pinned session inside a savepoint: a server error is
// undone back to it before r's onErr runs.
func runSaved(ctx context.Context, c conn, r *req) error {
	if err := c.exec(ctx, sqlStmtSave); err != nil {
		return err
	}
	err := c.query(ctx, r.q, r.args, r.dest...)
	if err != nil && sqlState(err) != "" {
		return undoThen(ctx, c, true, err, r.onErr)
	}
	if err != nil {
		return err
	}
	if err := c.exec(ctx, sqlStmtRelease); err != nil {
		return err
	}
	return r.judge()
}
