package pglocks

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// One pipeline takes one key (Lock, TryLock) or several (LockAll,
// TryLockAll), all or nothing:
//
//  1. claim: in this process, in key order, through the table: join a
//     shared hold, or queue behind the Locker's other goroutines (FIFO), or
//     get the key's entry to take on the server;
//  2. reserve the keys against WithMaxLocks;
//  3. take them on the server (serverTake): tried together on the
//     primary; if any is held elsewhere and the caller waits, what was
//     taken is let go and the keys are waited for on a session of their own,
//     in order, in the server's queue;
//  4. grant: record them in the table, on the session that got them.

// grant is what the server gave: the session the keys are held on (users
// incremented for the caller) and their fencing tokens; own says that the
// session waited for them, and holds nothing else.
type grant struct {
	h      *holder
	tokens []int64
	own    bool
	// keys and shared, for a multiplexed grant: what to let go if its
	// waiter gave up meanwhile.
	keys   []Key
	shared bool
}

// acquire takes keys, sorted and without duplicates, all or nothing, and
// returns a handle for each. Errors name a key.
func (l *Locker) acquire(ctx context.Context, keys []Key, o lockConfig, wait bool) ([]*Lock, error) {
	if !l.beginCall() {
		return nil, lockError(keys[0], ErrClosed)
	}
	defer l.endCall()

	// In this process, in key order: a handle where a shared hold is
	// joined, else the entry to take on the server.
	locks := make([]*Lock, len(keys))
	var mine []*entry
	release := func() {
		for _, lk := range locks {
			if lk != nil {
				_ = lk.Release(context.WithoutCancel(ctx))
			}
		}
	}
	undo := func() {
		release()
		l.table.abandon(mine...)
	}
	for i, k := range keys {
		lk, e, err := l.claim(ctx, k, o.shared, wait)
		if err != nil {
			undo()
			return nil, lockError(k, err)
		}
		locks[i] = lk
		if e != nil {
			mine = append(mine, e)
		}
	}
	if len(mine) == 0 {
		l.holdAtLeast(locks, o)
		return locks, nil
	}
	if err := l.table.reserve(mine); err != nil {
		undo()
		if len(keys) == 1 {
			return nil, lockError(keys[0], err)
		}
		return nil, fmt.Errorf("pglocks: %d locks: %w", len(mine), err)
	}
	held, err := l.acquireServer(ctx, mine, o, wait)
	if err != nil {
		release() // acquireServer abandoned mine
		return nil, err
	}
	j := 0
	for i := range locks {
		if locks[i] == nil {
			locks[i] = held[j]
			j++
		}
	}
	l.holdAtLeast(locks, o)
	return locks, nil
}

// holdAtLeast starts the minimum hold of MinHold on locks, just granted.
func (l *Locker) holdAtLeast(locks []*Lock, o lockConfig) {
	if o.minHold <= 0 {
		return
	}
	l.table.granted(locks, Key{}, -1, time.Now().Add(o.minHold))
}

// claim arbitrates key between the goroutines of this Locker (see
// table.claim), waiting for its turn as long as ctx allows. It returns a
// handle if the caller joined a shared hold, or else the key's entry, in
// stateAcquiring, for the caller to take on the server.
func (l *Locker) claim(ctx context.Context, key Key, shared, wait bool) (*Lock, *entry, error) {
	lk, e, w, err := l.table.claim(key, shared, wait)
	if err != nil || w == nil {
		return lk, e, err
	}
	select {
	case lk := <-w.ready:
		if lk != nil {
			return lk, nil, nil
		}
		return nil, e, nil
	case <-ctx.Done():
		err = ctxError(ctx)
	case <-l.closing:
		err = ErrClosed
	}
	if l.table.leave(e, w) {
		// We were given our turn as we gave up: hand it on.
		if lk := <-w.ready; lk != nil {
			_ = lk.Release(context.WithoutCancel(ctx))
		} else {
			l.table.abandon(e)
		}
	}
	return nil, nil, err
}

// acquireServer takes es, which the caller has claimed and reserved, on the
// server, and records them in the table. If it fails, es are abandoned.
func (l *Locker) acquireServer(ctx context.Context, es []*entry, o lockConfig, wait bool) ([]*Lock, error) {
	keys := make([]Key, len(es))
	for i, e := range es {
		keys[i] = e.key
	}
	for attempt := 1; ; attempt++ {
		g, err := l.serverTake(ctx, keys, o, wait) // errors name their key
		if err != nil {
			l.table.abandon(es...)
			return nil, err
		}
		locks, err := l.table.grant(es, g.h, g.tokens)
		if err != nil {
			// errSessionGone: another goroutine's statement on g.h failed
			// between the grant and now, and the session was closed: the
			// server freed the keys with it, and nobody has seen them held,
			// so take them again. ErrClosed: Close has begun, and will not
			// know of them: let them go here.
			l.dropGrant(g, keys, o.shared, errors.Is(err, errSessionGone))
			if errors.Is(err, errSessionGone) && attempt < 3 && ctx.Err() == nil && !l.isClosed() {
				continue
			}
			if errors.Is(err, errSessionGone) {
				l.table.abandon(es...)
			}
			return nil, lockError(keys[0], err)
		}
		if g.own {
			// A session of its own that waited: watched once idle.
			l.sessions.waited(g.h)
			l.sessions.idleWatch(g.h)
		}
		l.sessions.unuse(g.h)
		return locks, nil
	}
}

// contendedWait is how long a wait on a ready session must take for its key
// to count as still contended: an uncontended one takes a round trip.
const contendedWait = time.Millisecond

// dropGrant hands back what the server granted but the table did not take:
// a session of its own is cleared and closed; on a shared one the keys are
// unlocked, unless the session is gone (and they with it).
func (l *Locker) dropGrant(g grant, keys []Key, shared, gone bool) {
	if g.own {
		l.sessions.dropWait(g.h, nil)
		return
	}
	if !gone {
		// If an unlock fails, its session is closed, which frees the rest.
		l.sessions.doMany(context.Background(), g.h, unlockReqs(keys, shared))
	}
	l.sessions.unuse(g.h)
}

// serverTake takes keys on the server, all or nothing: first tried together
// on the primary (unless o.own: straight to a wait on a session of its own);
// then, if some are held elsewhere and wait is set, waited for.
func (l *Locker) serverTake(ctx context.Context, keys []Key, o lockConfig, wait bool) (grant, error) {
	if wait && !o.own && len(keys) == 1 && l.contended.has(keys[0]) && !l.mux.waiting() {
		// The key was held elsewhere lately: a try would most likely fail
		// (a try never jumps the server's queue), so wait at once if a
		// session for it can be had now.
		w, err := l.sessions.waitSession(ctx, false)
		if err != nil {
			return grant{}, lockError(keys[0], err)
		}
		if w != nil {
			began := time.Now()
			g, _, err := l.waitOn(ctx, w, keys, o)
			if err != nil {
				return grant{}, lockError(keys[0], err)
			}
			if time.Since(began) > contendedWait {
				l.contended.add(keys[0]) // it waited: still contended
			}
			return g, nil
		}
	}
	if !o.own {
		g, err := l.tryAll(ctx, keys, o)
		if err == nil || !errors.Is(err, ErrLocked) || !wait {
			return g, err
		}
		l.contended.add(keys...)
	}
	for retried := false; ; retried = true {
		g, at, err := l.waitFor(ctx, keys, o)
		if err != nil && !retried && ctx.Err() == nil && sqlState(err) == "" && !errors.Is(err, ErrClosed) &&
			!errors.Is(err, ErrDeadlock) {
			// A session kept ready (or taken from the pool) may have ended
			// meanwhile (a server restart): try once more on another.
			continue
		}
		if err != nil {
			return grant{}, lockError(keys[at], err)
		}
		return g, nil
	}
}

// waitFor waits for keys: on a session of its own in the server's queue if
// the Locker may have one now and no multiplexed wait is older, else
// multiplexed. It returns the index of the key whose wait failed, and why.
func (l *Locker) waitFor(ctx context.Context, keys []Key, o lockConfig) (grant, int, error) {
	if !l.mux.waiting() {
		w, err := l.sessions.waitSession(ctx, false)
		if err != nil {
			return grant{}, 0, err
		}
		if w != nil {
			return l.waitOn(ctx, w, keys, o)
		}
	}
	return l.mux.wait(ctx, keys, o)
}

// brokenSession is a tryAll that failed because the primary's session had
// ended.
type brokenSession struct{ error }

func (b brokenSession) Unwrap() error { return b.error }

// tryAll tries every key on the primary, in one round trip where the driver
// pipelines, retrying once on a fresh session if the primary's had ended.
// If any is not granted it lets the others go and returns an error matching
// ErrLocked (or the statement's error) that names the key.
func (l *Locker) tryAll(ctx context.Context, keys []Key, o lockConfig) (grant, error) {
	for retried := false; ; retried = true {
		g, err := l.tryAll1(ctx, keys, o)
		var broke brokenSession
		if errors.As(err, &broke) && !retried && ctx.Err() == nil {
			continue // the primary's session had ended: once more, on a fresh one
		}
		return g, err
	}
}

func (l *Locker) tryAll1(ctx context.Context, keys []Key, o lockConfig) (grant, error) {
	h, err := l.sessions.primaryHolder(ctx)
	if err != nil {
		return grant{}, lockError(keys[0], err)
	}
	oks := make([]bool, len(keys))
	tokens := make([]int64, len(keys))
	rs := make([]*req, len(keys))
	for i, k := range keys {
		q, args := stmt(stmtTry, k, o.shared, l.cfg.fencing)
		rs[i] = &req{row: row{q: q, args: args, dest: []any{&oks[i], &tokens[i]}},
			onErr: func(sctx context.Context, err error) error {
				if sqlState(err) != stateOutOfMemory {
					return err
				}
				// The lock table is full. Without fencing nothing was
				// granted. With it the lock may have taken the last slot
				// and the token's transaction id found none: the session
				// lock outlives the failed statement, so let it go (the
				// Locker never holds a key twice on the server, so this
				// unlock is exact).
				if l.cfg.fencing {
					uq, uargs := stmt(stmtUnlock, k, o.shared, false)
					var unlocked bool
					if uerr := h.c.query(sctx, uq, uargs, &unlocked); uerr != nil {
						return uerr
					}
				}
				return keepConn{classify(err)}
			}}
	}
	if len(rs) == 1 {
		rs[0].err = l.sessions.do(ctx, h, rs[0])
	} else {
		l.sessions.doMany(ctx, h, rs)
	}
	var first error // the first failure, in key order
	var got []Key
	for i, r := range rs {
		switch {
		case r.err == nil && oks[i]:
			got = append(got, keys[i])
		case first != nil:
		case r.err != nil:
			first = lockError(keys[i], r.err)
		default:
			first = lockError(keys[i], ErrLocked)
		}
	}
	if first == nil {
		return grant{h: h, tokens: tokens}, nil
	}
	if len(got) > 0 {
		// If an unlock fails, its session is closed, which frees the rest.
		l.sessions.doMany(context.WithoutCancel(ctx), h, unlockReqs(got, o.shared))
	}
	dead := h.dead.Load()
	l.sessions.unuse(h)
	if dead && !errors.Is(first, ErrLocked) {
		first = brokenSession{first}
	}
	return grant{}, first
}

// unlockReqs are the unlocks of keys, held in one mode on one session.
func unlockReqs(keys []Key, shared bool) []*req {
	rs := make([]*req, len(keys))
	for i, k := range keys {
		rs[i] = unlockReq(k, shared)
	}
	return rs
}

// cutter returns what cuts c's socket under a running statement, for
// waitSpec.cut, or nil if its driver is not interruptible.
func cutter(c conn) func() {
	if !c.interruptible() {
		return nil
	}
	return c.closeSocket
}

// notifyReq sends payload p on notifyChannel. A notification is sent when
// its transaction commits, so if a later statement of the same pipelined
// batch aborts it, it is sent again (txn); one the server refuses (its
// notification queue full) leaves the session as it was.
func notifyReq(p string) *req {
	var s string
	return &req{row: row{q: sqlNotify, args: []any{p}, dest: []any{&s}}, txn: true,
		onErr: func(_ context.Context, err error) error { return keepConn{err} }}
}

func unlockReq(k Key, shared bool) *req {
	q, args := stmt(stmtUnlock, k, shared, false)
	ok := new(bool)
	return &req{row: row{q: q, args: args, dest: []any{ok}}, check: func() error {
		if !*ok {
			return errNotHeld
		}
		return nil
	}}
}

// waitOn waits for keys on w, a session of its own, one after the other in
// the order given, so that the server sees a cycle through this session
// (ErrDeadlock). If any wait fails, the session is cleared and closed:
// nothing is held. It returns the session with users set to 1 and the keys'
// fencing tokens; or the index of the key whose wait failed, and why.
func (l *Locker) waitOn(ctx context.Context, w *holder, keys []Key, o lockConfig) (grant, int, error) {
	cancel := func(ctx context.Context) error {
		err := w.c.cancel(ctx)
		if errors.Is(err, errNoCancelRequest) {
			// database/sql without pgx: cancel from a session we own.
			// (Leaving it to the driver would close the connection before
			// we can clear it of a lock granted as the wait was cancelled.)
			return l.cancelBackend(ctx, w.pid)
		}
		return err
	}
	tokens := make([]int64, len(keys))
	var stuck <-chan error
	at := 0 // the key being waited for
	var err error
	w.enter()
	for i, key := range keys {
		at = i
		err = waitLock(ctx, waitSpec{
			stmt: sessionWait(key, o.shared, l.cfg.fencing),
			run: func(ctx context.Context, q string, args []any) error {
				var s1, s2 string
				return w.c.query(ctx, q, args, &s1, &s2, &tokens[i])
			},
			cancel: cancel, grace: l.cfg.stmtTime, closing: l.closing, closeCtx: l.closeCtx,
			abandon: func(done <-chan error) { stuck = done },
			cut:     cutter(w.c),
		})
		if err != nil {
			break
		}
	}
	w.leave()
	if err != nil {
		// If the driver is still in the statement (stuck), the connection is
		// discarded when it comes back.
		l.sessions.dropWait(w, stuck)
		return grant{}, at, classify(err)
	}
	return grant{h: w, tokens: tokens, own: true}, 0, nil
}
