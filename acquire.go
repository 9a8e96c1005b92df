package pglocks

// acquire.go: the acquisition pipeline, from a claim in this process to a
// grant on the server recorded in the table.

import (
	"context"
	"errors"
	"fmt"
	"sync"
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
//     in order, in the server's queue (or multiplexed, see mux.go);
//  4. keep: record them in the table, on the session that got them.

// acquirer runs the acquisition pipeline of a Locker.
type acquirer struct {
	table    *table
	pool     *pool
	batch    *batcher
	mux      *mux
	rel      *releaser
	cfg      *config
	closeCtx context.Context
	// contended remembers the keys whose try failed lately, so that the
	// next Lock of one of them waits at once.
	contended contended
}

// contended is a recentKeys for many goroutines.
type contended struct {
	mu     sync.Mutex
	recent recentKeys // guarded by mu
}

// acquire takes keys, sorted and without duplicates, all or nothing, and
// returns a hold for each. Errors name a key.
func (a *acquirer) acquire(ctx context.Context, keys []Key, o lockConfig, wait bool) ([]*hold, error) {
	if !a.table.begin() {
		return nil, lockError(keys[0], ErrClosed)
	}
	defer a.table.ops.Done()

	// In this process, in key order: a hold where a shared hold is
	// joined, else the entry to take on the server.
	holds := make([]*hold, len(keys))
	var mine []*entry
	undo := func() {
		a.rel.releaseJoined(holds)
		a.table.abandon(mine...)
	}
	for i, k := range keys {
		h, e, err := a.claim(ctx, k, o.shared, wait)
		if err != nil {
			undo()
			return nil, lockError(k, err)
		}
		holds[i] = h
		if e != nil {
			mine = append(mine, e)
		}
	}
	if len(mine) > 0 {
		if err := a.table.reserve(mine); err != nil {
			undo()
			if len(keys) == 1 {
				return nil, lockError(keys[0], err)
			}
			return nil, fmt.Errorf("pglocks: %d locks: %w", len(mine), err)
		}
		held, err := a.take(ctx, mine, o, wait)
		if err != nil {
			a.rel.releaseJoined(holds) // take abandoned mine
			return nil, err
		}
		j := 0
		for i := range holds {
			if holds[i] == nil {
				holds[i] = held[j]
				j++
			}
		}
	}
	if o.minHold > 0 {
		a.table.setTerms(holds, Key{}, -1, time.Now().Add(o.minHold))
	}
	return holds, nil
}

// claim arbitrates key between the goroutines of this Locker (see
// table.claim), waiting for its turn as long as ctx allows. It returns a
// hold if the caller joined a shared hold, or else the key's entry, in
// stateAcquiring, for the caller to take on the server.
func (a *acquirer) claim(ctx context.Context, key Key, shared, wait bool) (*hold, *entry, error) {
	h, e, w, err := a.table.claim(key, shared, wait)
	if err != nil || w == nil {
		return h, e, err
	}
	select {
	case h := <-w.ready:
		if h != nil {
			return h, nil, nil
		}
		return nil, e, nil
	case <-ctx.Done():
		err = ctxError(ctx)
	case <-a.closeCtx.Done():
		err = ErrClosed
	}
	if a.table.leave(e, w) {
		// We were given our turn as we gave up: hand it on.
		if h := <-w.ready; h != nil {
			a.rel.releaseJoined([]*hold{h})
		} else {
			a.table.abandon(e)
		}
	}
	return nil, nil, err
}

// take takes es, which the caller has claimed and reserved, on the
// server, and records them in the table. If it fails, es are abandoned.
func (a *acquirer) take(ctx context.Context, es []*entry, o lockConfig, wait bool) ([]*hold, error) {
	keys := make([]Key, len(es))
	for i, e := range es {
		keys[i] = e.key
	}
	// Claimed behind posted unlocks: a try on the primary goes after them;
	// anything else waits for them.
	behind := a.rel.follow(es, !o.own && !(wait && len(keys) == 1 && a.contended.has(keys[0])))
	for attempt := 1; ; attempt++ {
		t, err := a.serverTake(ctx, keys, o, wait, !behind) // errors name their key
		if err != nil {
			a.table.abandon(es...)
			return nil, err
		}
		holds, again, err := a.keep(ctx, es, keys, t, o.shared, attempt)
		switch {
		case again:
			continue
		case err != nil:
			return nil, lockError(keys[0], err)
		}
		return holds, nil
	}
}

// keep records in the table what the server gave for es, and ends t's
// lease. If t's session was closed since (errSessionGone: another
// goroutine's statement on it failed between the grant and now), the server
// freed the keys with it and nobody has seen them held: again says to take
// them again, up to three attempts, and es stay claimed. After Close has
// begun (ErrClosed), which will not know of them, they are let go here.
// Otherwise es are abandoned, and the error says why.
func (a *acquirer) keep(ctx context.Context, es []*entry, keys []Key, t grantSet, shared bool, attempt int) (holds []*hold, again bool, err error) {
	holds, err = a.table.record(es, t.l.s, t.tokens)
	if err == nil {
		if t.own {
			// A session of its own that waited: watched once idle.
			a.pool.waited(t.l.s)
			a.pool.watch.idle(t.l.s)
		}
		t.l.end()
		return holds, false, nil
	}
	gone := errors.Is(err, errSessionGone)
	a.drop(t, keys, shared, gone)
	if gone && attempt < 3 && ctx.Err() == nil && !a.table.isClosed() {
		return nil, true, nil
	}
	if gone {
		a.table.abandon(es...)
	}
	return nil, false, err
}

// contendedWait is how long a wait on a ready session must take for its key
// to count as still contended: an uncontended one takes a round trip.
const contendedWait = time.Millisecond

// drop hands back what the server granted but the table did not take: a
// session of its own is cleared and closed; on a shared one the keys are
// unlocked, unless the session is gone (and they with it).
func (a *acquirer) drop(t grantSet, keys []Key, shared, gone bool) {
	if t.own {
		a.pool.dropWait(t.l, nil)
		return
	}
	if !gone {
		// If an unlock fails, its session is closed, which frees the rest.
		a.batch.doMany(context.Background(), t.l.s, unlockReqs(keys, shared))
	}
	t.l.end()
}

// serverTake takes keys on the server, all or nothing: first tried together
// on the primary (unless o.own: straight to a wait on a session of its own),
// or, with spread, on another session if the primary is busy (see
// pool.primary); then, if some are held elsewhere and wait is set, waited
// for.
func (a *acquirer) serverTake(ctx context.Context, keys []Key, o lockConfig, wait, spread bool) (grantSet, error) {
	if wait && !o.own && len(keys) == 1 && a.contended.has(keys[0]) && !a.mux.waiting() {
		// The key was held elsewhere lately: a try would most likely fail
		// (a try never jumps the server's queue), so wait at once if a
		// session for it can be had now.
		w, err := a.pool.waitSession(ctx, false)
		if err != nil {
			return grantSet{}, lockError(keys[0], err)
		}
		if w.s != nil {
			began := time.Now()
			t, _, err := waitOn(ctx, w, keys, o.shared, a.cfg, a.closeCtx)
			if err != nil {
				return grantSet{}, lockError(keys[0], err)
			}
			if time.Since(began) > contendedWait {
				a.contended.add(keys[0]) // it waited: still contended
			}
			return t, nil
		}
	}
	if !o.own {
		t, err := a.tryAll(ctx, keys, o.shared, spread)
		if primaryEnded(ctx, err) {
			t, err = a.tryAll(ctx, keys, o.shared, spread) // once more, on a fresh session
		}
		if err == nil || !errors.Is(err, ErrLocked) || !wait {
			return t, err
		}
		a.contended.add(keys...)
	}
	for retried := false; ; retried = true {
		t, at, err := a.waitFor(ctx, keys, o.shared)
		if err != nil && !retried && ctx.Err() == nil && sqlState(err) == "" && !errors.Is(err, ErrClosed) &&
			!errors.Is(err, ErrDeadlock) {
			// A session kept ready (or taken from the pool) may have ended
			// meanwhile (a server restart): try once more on another.
			continue
		}
		if err != nil {
			return grantSet{}, lockError(keys[at], err)
		}
		return t, nil
	}
}

// waitFor waits for keys: on a session of its own in the server's queue if
// the Locker may have one now and no multiplexed wait is older, else
// multiplexed (and in the server's queue once the mux hands it a session).
// It returns the index of the key whose wait failed, and why.
func (a *acquirer) waitFor(ctx context.Context, keys []Key, shared bool) (grantSet, int, error) {
	if !a.mux.waiting() {
		w, err := a.pool.waitSession(ctx, false)
		if err != nil {
			return grantSet{}, 0, err
		}
		if w.s != nil {
			return waitOn(ctx, w, keys, shared, a.cfg, a.closeCtx)
		}
	}
	t, moveTo, err := a.mux.wait(ctx, keys, shared)
	if moveTo.s != nil {
		return waitOn(ctx, moveTo, keys, shared, a.cfg, a.closeCtx)
	}
	return t, 0, err
}

// brokenSession is a try that failed because the primary's session had
// ended.
type brokenSession struct{ error }

func (b brokenSession) Unwrap() error { return b.error }

// primaryEnded reports whether err is a try's that failed because the primary's
// session had ended (brokenSession), so that one more try, on a fresh
// session, may do.
func primaryEnded(ctx context.Context, err error) bool {
	if err == nil {
		return false // no brokenSession to move to the heap on the hot path
	}
	var broke brokenSession
	return errors.As(err, &broke) && ctx.Err() == nil
}

// tryAll tries every key on the primary (or, with spread, another session
// if it is busy), in one round trip where the driver pipelines. If any is
// not granted it lets the others go and returns an error matching
// ErrLocked (or the statement's error) that names the key; brokenSession
// if the primary's session had ended.
func (a *acquirer) tryAll(ctx context.Context, keys []Key, shared, spread bool) (grantSet, error) {
	l, err := a.pool.primary(ctx, spread)
	if err != nil {
		return grantSet{}, lockError(keys[0], err)
	}
	oks := make([]bool, len(keys))
	tokens := make([]int64, len(keys))
	rs := tryReqs(keys, shared, a.cfg.fencing && !l.s.pinned, oks, tokens) // a pinned session's token is read elsewhere
	if len(rs) == 1 {
		rs[0].err = a.batch.do(ctx, l.s, rs[0])
	} else {
		a.batch.doMany(ctx, l.s, rs)
	}
	var first error // the first failure, in key order
	var got []Key
	for i, r := range rs {
		switch {
		case r.err == nil && oks[i]:
			got = append(got, keys[i])
		case first != nil:
		case r.err != nil:
			first = lockError(keys[i], sessionEnded(classify(r.err)))
		default:
			first = lockError(keys[i], ErrLocked)
		}
	}
	if first == nil && a.cfg.fencing && l.s.pinned {
		if err := a.pool.open.tokens(ctx, tokens); err != nil {
			first = lockError(keys[0], err)
		}
	}
	if first == nil {
		return grantSet{l: l, tokens: tokens}, nil
	}
	if len(got) > 0 {
		// If an unlock fails, its session is closed, which frees the rest.
		a.batch.doMany(context.WithoutCancel(ctx), l.s, unlockReqs(got, shared))
	}
	dead := l.s.dead.Load()
	l.end()
	if dead && !errors.Is(first, ErrLocked) {
		first = brokenSession{first}
	}
	return grantSet{}, first
}

// tryReqs are the tries of keys, scanning into oks and tokens.
func tryReqs(keys []Key, shared, fenced bool, oks []bool, tokens []int64) []*req {
	rs := make([]*req, len(keys))
	for i, k := range keys {
		r := &req{onErr: onFullKeep}
		q, n := stmtQ(stmtTry, k, shared, fenced)
		r.setKey(q, n, k)
		r.destBuf[0], r.destBuf[1] = &oks[i], &tokens[i]
		r.dest = r.destBuf[:2]
		rs[i] = r
		if fenced {
			// With fencing the lock may have taken the last slot of the lock
			// table and the token's transaction id found none: the session
			// lock outlives the failed statement, so let it go (the Locker
			// never holds a key twice on the server, so this unlock is
			// exact). Without it nothing was granted.
			uq, uargs := stmt(stmtUnlock, k, shared, false)
			rs[i].onErr = onFullUnlock(uq, uargs)
		}
	}
	return rs
}

func (c *contended) add(keys ...Key) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range keys {
		c.recent.add(k)
	}
}

func (c *contended) has(k Key) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.recent.has(k)
}
