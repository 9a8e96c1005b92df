package pglocks

// release.go: letting locks go: the table decides, the unlocks run on the
// sessions that hold the keys, and waiters are told.

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// releaser lets holds go for a Locker.
type releaser struct {
	table *table
	pool  *pool
	batch *batcher
	mux   *mux
}

// releaseOne releases h, as Lock.Release does.
func (r *releaser) releaseOne(ctx context.Context, h *hold) error {
	u, prove, err := r.table.release(h)
	switch {
	case u != nil:
		err = r.unlock([]*pendingUnlock{u})[0]
	case prove != nil:
		err = r.prove(prove, []Key{h.key()})[0]
	}
	return err
}

// prove shows that s's server session had not ended when keys, which it
// holds for other handles (or for a minimum hold), were released by a
// handle: the server was not asked to let them go, so nothing else would
// tell a Release that returns before the Locker hears of a session's end
// that the lock it reports held to the end had been lost. A statement that
// the same backend answers after the Release began shows that the session,
// and every lock it held, was still there; if it fails, each key's error
// says the lock was lost. It shares a round trip with whatever else is
// sent on s.
func (r *releaser) prove(s *session, keys []Key) []error {
	errs := make([]error, len(keys))
	l := r.pool.lease(s)
	defer l.end()
	err := r.batch.do(context.Background(), s, pingReq(s))
	if err == nil {
		return errs
	}
	if ended := sessionEnded(err); errors.Is(ended, ErrSessionEnded) {
		err = ended
	}
	for i, k := range keys {
		errs[i] = lossError(k, err)
	}
	return errs
}

// releaseNoWait releases h, as Lock.ReleaseNoWait does: if its session is
// the primary, where the Locker's next tries go, and pipelines, the unlock
// is posted there (see batcher.post) instead of waited for; otherwise it
// runs as releaseOne's does.
func (r *releaser) releaseNoWait(h *hold) error {
	u, _, err := r.table.release(h) // no proof: ReleaseNoWait reports no loss
	if u == nil {
		return err
	}
	if u.notify || !r.batch.combines(u.s) || !r.pool.isPrimary(u.s) {
		return r.unlock([]*pendingUnlock{u})[0]
	}
	u.r = unlockReq(u.e.key, u.shared)
	u.r.unlock = u
	u.r.done.Add(1)
	u.l = r.pool.lease(u.s)
	// Queued first, then made known to claims (which may wait for it at
	// once); if goroutines of this Locker queued for the key meanwhile,
	// they are let go only once it has run: it goes now.
	r.batch.post(u.s, u.r)
	if !r.table.post(u) {
		r.batch.kick(u.s)
	}
	h.cancel(ErrReleased) // no longer the handle's; released says so again
	return nil
}

// posted finishes a release whose unlock rq was posted, once rq has run.
// If it failed, the session was closed (which freed the key) and its other
// locks were reported lost; the caller heard nothing, having been told the
// key was no longer its own.
func (r *releaser) posted(rq *req) {
	u := rq.unlock
	_ = r.unlocked([]*pendingUnlock{u}, []*req{rq}, u.l)
}

// follow sends the posted unlocks that es, claimed behind them, follow, and
// waits for them, unless the acquisition will try es on the session they
// are queued on, after them (the primary): for a wait, which goes on a
// session of its own or is multiplexed. It reports whether the tries must
// go on the primary (not spread: see pool.primary) for that.
func (r *releaser) follow(es []*entry, tries bool) (onPrimary bool) {
	for _, e := range es {
		u := e.unlock
		if u == nil {
			continue
		}
		e.unlock = nil
		if !tries || !r.pool.isPrimary(u.s) {
			r.batch.kick(u.s)
			u.r.done.Wait()
		} else {
			onPrimary = true
		}
	}
	return onPrimary
}

// release releases holds, as LockSet.Release does, the unlocks on one
// session in one round trip, and returns each hold's error.
func (r *releaser) release(ctx context.Context, holds []*hold) []error {
	errs := make([]error, len(holds))
	var us []*pendingUnlock
	var at []int                  // us[i] is holds[at[i]]'s
	var proofs map[*session][]int // holds[i] to prove on s (see prove)
	for i, h := range holds {
		u, prove, err := r.table.release(h)
		switch {
		case u != nil:
			us, at = append(us, u), append(at, i)
		case prove != nil:
			if proofs == nil {
				proofs = map[*session][]int{}
			}
			proofs[prove] = append(proofs[prove], i)
		default:
			errs[i] = err
		}
	}
	if len(us) > 0 {
		for j, err := range r.unlock(us) {
			errs[at[j]] = err
		}
	}
	for s, is := range proofs {
		keys := make([]Key, len(is))
		for j, i := range is {
			keys[j] = holds[i].key()
		}
		for j, err := range r.prove(s, keys) {
			errs[is[j]] = err
		}
	}
	return errs
}

// releaseJoined releases the holds of holds that are not nil, for an
// acquisition that failed after it joined shared holds: its caller hears
// of no loss, so nothing is proved.
func (r *releaser) releaseJoined(holds []*hold) {
	for _, h := range holds {
		if h == nil {
			continue
		}
		if u, _, _ := r.table.release(h); u != nil {
			_ = r.unlock([]*pendingUnlock{u})
		}
	}
}

// endLinger lets e go on the server once its minimum hold is up, unless it
// was taken again or lost meanwhile, or the Locker closed (Close clears
// every session).
func (r *releaser) endLinger(e *entry) {
	if !r.table.begin() {
		return
	}
	defer r.table.ops.Done()
	if u := r.table.endLinger(e); u != nil {
		_ = r.unlock([]*pendingUnlock{u})
	}
}

// unlock runs the unlocks that table.release asked for, those on one
// session in one round trip, and finishes them; it returns their errors.
func (r *releaser) unlock(us []*pendingUnlock) []error {
	// Unlocks run whatever the caller's ctx says: the statement is short,
	// and a key not let go would stay held. (The batcher looks at its ctx
	// only before it queues a statement.)
	ctx := context.Background()
	rs := make([]*req, len(us))
	if len(us) == 1 && !us[0].notify {
		// The common case, without the maps.
		u := us[0]
		rs[0] = unlockReq(u.e.key, u.shared)
		l := r.pool.lease(u.s)
		rs[0].err = r.batch.do(ctx, u.s, rs[0])
		return r.unlocked(us, rs, l)
	}
	bySession := map[*session][]*req{}
	tell := map[*session][]Key{} // wanted keys: their release notifies
	for i, u := range us {
		rs[i] = unlockReq(u.e.key, u.shared)
		bySession[u.s] = append(bySession[u.s], rs[i])
		if u.notify && !u.s.pinned { // a pinned session's would be sent when it ends
			tell[u.s] = append(tell[u.s], u.e.key)
		}
	}
	for s, keys := range tell {
		// After the unlocks, in the same round trip where the driver
		// pipelines: sent when they are done.
		for _, p := range payloads(freedMark, keys) {
			bySession[s] = append(bySession[s], notifyReq(p))
		}
	}
	leases := make([]lease, 0, len(bySession))
	for s := range bySession {
		leases = append(leases, r.pool.lease(s))
	}
	if len(bySession) == 1 {
		r.unlockOn(ctx, us[0].s, bySession[us[0].s])
	} else {
		var wg sync.WaitGroup
		for s, srs := range bySession {
			wg.Go(func() { r.unlockOn(ctx, s, srs) })
		}
		wg.Wait()
	}
	return r.unlocked(us, rs, leases...)
}

// unlocked finishes unlocks us, whose statements rs have run, and ends the
// leases taken for them.
func (r *releaser) unlocked(us []*pendingUnlock, rs []*req, leases ...lease) []error {
	errs := make([]error, len(us))
	var late []Key // wanted while being released: told now
	for i, u := range us {
		if r.table.released(u) {
			late = append(late, u.e.key)
		}
		if err := rs[i].err; err != nil {
			if ended := sessionEnded(err); errors.Is(ended, ErrSessionEnded) {
				// Its session had ended before the unlock reached it: the
				// server had freed the key, maybe before the release.
				errs[i] = lossError(u.e.key, ended)
				r.table.ev.losses.Add(1) // the session's end skipped it: being released
				continue
			}
			if _, said := err.(brokenError); said {
				// It says that the connection was closed.
				err = fmt.Errorf("unlock failed: %w", err)
			} else {
				err = fmt.Errorf("unlock failed; its connection was closed: %w", err)
			}
			errs[i] = lockError(u.e.key, err)
		}
	}
	for _, l := range leases {
		l.end()
	}
	if len(late) > 0 {
		r.mux.tellFreed(late)
	}
	if r.mux.nwatch.Load() > 0 {
		freed := make([]Key, len(us))
		for i, u := range us {
			freed[i] = u.e.key
		}
		r.mux.freed(freed) // goroutines of this Locker waiting for a slot
	}
	return errs
}

// unlockOn runs rs, unlocks (and notifications), on s.
func (r *releaser) unlockOn(ctx context.Context, s *session, rs []*req) {
	if len(rs) == 1 {
		rs[0].err = r.batch.do(ctx, s, rs[0])
		return
	}
	r.batch.doMany(ctx, s, rs)
}
