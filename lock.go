package pglocks

// lock.go: the handle of a session-level lock that a Locker holds.

import (
	"context"
	"errors"
	"sync/atomic"
	"time"
)

// A Lock is a session-level advisory lock held by a [Locker]. It stays held
// until [Lock.Release], [Locker.Close], or until it is lost because its server
// session ended; [Lock.Done] tells which has happened.
type Lock struct {
	hold // the table's record of the handle (see table.go)
	l    *Locker
	// trace is set, once acquired, when a tracer wants it.
	trace atomic.Pointer[lockTrace]
}

// lockTrace is what tracers need of a handle: the ctx TraceAcquireStart
// returned, and when the acquisition ended.
type lockTrace struct {
	ctx     context.Context
	granted time.Time
}

// Key returns the lock's key: for a lock taken with [Slots], the key asked
// for, not its slot's (see [Lock.Slot]).
func (lk *Lock) Key() Key { return lk.key() }

// Slot returns which slot of [Lock.Key] the lock holds, 0 to n-1, for a
// lock taken with [Slots](n); it holds the key Key().Slot(i). It returns -1
// for other locks.
func (lk *Lock) Slot() int { return lk.slot }

// Token returns the lock's fencing token, or 0 unless the Locker was made
// with [WithFencingTokens]. Tokens increase strictly from one holder of a key
// to the next (they are the server's pg_current_xact_id(), read just after
// the lock was granted), so a resource that remembers the highest token it
// has seen for a key can refuse a write that carries a lower one:
//
//	UPDATE jobs SET result = $1, token = $2 WHERE id = $3 AND token < $2
//
// A lock alone cannot stop a holder that was paused (a long GC, a stopped
// VM) or cut off while its lock was freed and taken by another: when it
// resumes it still believes it holds the lock. The token lets the resource
// reject it. Goroutines of one Locker that share a lock in [Shared] mode
// share its token. Shared holders in different sessions hold at the same
// time, so their tokens order their grants, not their turns: fence only
// exclusive holders this way.
func (lk *Lock) Token() int64 { return lk.token }

// Done returns a channel that is closed once the lock is no longer held:
// released, released by [Locker.Close], or lost because its server session
// ended.
func (lk *Lock) Done() <-chan struct{} { return lk.ctx.Done() }

// Err returns nil while the lock is held. Once [Lock.Done] is closed it
// returns why: [ErrReleased], [ErrClosed], or an error matching [ErrLockLost].
func (lk *Lock) Err() error {
	if lk.ctx.Err() == nil {
		return nil
	}
	return context.Cause(lk.ctx)
}

// Release releases the lock. It returns an error matching [ErrReleased] if the
// lock was already released, [ErrClosed] after [Locker.Close], and the loss
// error for a lock that was lost.
//
// A release is never abandoned halfway: the unlock statement runs to the end
// even if ctx is cancelled (it is bounded by [WithStatementTimeout]). If it
// fails, the connection is closed, which frees its locks on the server, and
// the error says so; if it fails because the server session had ended, the
// lock may have been free before Release, and the error is the loss's
// (matching [ErrLockLost] and [ErrSessionEnded]). Release waits for the
// server's answer; [Lock.ReleaseNoWait] does not. When several goroutines
// of one Locker share a lock in [Shared] mode, the server's lock is
// released with the last of them; the others' Release, and a Release
// within a [MinHold], which let nothing go on the server, wait for the
// session to answer a statement (one round trip, shared with whatever else
// goes there), so that a lock lost just before is reported lost even if
// the Locker had not heard of it yet.
//
// Release only passes ctx's values on, and never waits on ctx; a nil ctx is
// taken as context.Background(), so that a careless defer does not leave the
// lock held.
func (lk *Lock) Release(ctx context.Context) error {
	if ctx == nil {
		ctx = context.Background()
	}
	err := lk.l.rel.releaseOne(ctx, &lk.hold)
	if lk.l.cfg.tracers.release != nil {
		lk.l.cfg.tracers.traceRelease(lk.l, lk, err)
	}
	return err
}

// ReleaseNoWait releases the lock as [Lock.Release] does, but without
// waiting for the server's answer, so that a loop of Lock and ReleaseNoWait
// costs one round trip a cycle instead of two. The unlock is queued on the
// lock's session and goes in the round trip of the next statement the
// Locker sends there (the next Lock's try, typically), or alone within half
// a millisecond.
//
// When it returns:
//   - the lock is no longer this handle's ([Lock.Done] is closed, and
//     [Lock.Err] says [ErrReleased]), and a goroutine of this Locker may take the key at
//     once: its try is sent after the unlock, on the same session;
//   - another session can take the key within half a millisecond and one
//     round trip;
//   - it has returned the errors Release returns for what the Locker knows
//     by then (released already, closed, lost).
//
// What it does not say: that the server still held the lock until the
// unlock. If the server's answer says otherwise (the session had ended and
// its locks were freed), the session is closed and its other locks are
// reported lost, but this call has already returned nil. Use Release, or
// [Locker.Do], where that proof matters: they wait for the answer and
// return the loss. A lock held on a session that waited for it, or taken
// with [WithFencingTokens] (unless through a transaction pooler), or
// wanted by a waiter elsewhere that must be told of its release, is
// released as Release does.
//
// Like Release it never waits on ctx, which it takes for symmetry with
// Release (a nil ctx is fine).
func (lk *Lock) ReleaseNoWait(ctx context.Context) error {
	_ = ctx
	err := lk.l.rel.releaseNoWait(&lk.hold)
	if lk.l.cfg.tracers.release != nil {
		lk.l.cfg.tracers.traceRelease(lk.l, lk, err)
	}
	return err
}

// lockOf returns the Lock a hold was made for.
func lockOf(h *hold) *Lock { return h.handle.(*Lock) }

// locksOf returns the Locks holds were made for.
func locksOf(holds []*hold) []*Lock {
	locks := make([]*Lock, len(holds))
	for i, h := range holds {
		locks[i] = lockOf(h)
	}
	return locks
}

// run runs fn under lk for Do, TryDo and Lead, and releases lk afterwards.
func (lk *Lock) run(ctx context.Context, fn func(ctx context.Context) error) error {
	return runHeld(ctx, context.WithValue(ctx, lockCtxKey{}, lk), lk.ctx, lk.Err, lk.Release, fn)
}

// runHeld runs fn with fnCtx, cancelled with the loss's cause when held is
// done, then releases (with ctx, uncancelled). If the hold ended before fn
// was done, the error says why; otherwise it carries release's error.
func runHeld(ctx, fnCtx, held context.Context, why func() error, release func(context.Context) error,
	fn func(ctx context.Context) error) (err error) {
	fctx, cancel := context.WithCancelCause(fnCtx)
	stop := context.AfterFunc(held, func() { cancel(why()) })
	defer func() {
		stop()
		cancel(nil)
		lost := why() // nil, or why the hold went before fn was done
		rerr := release(context.WithoutCancel(ctx))
		switch {
		case lost != nil && errors.Is(err, lost):
			// fn returned its ctx's cause, or wrapped it: said once.
		case lost != nil:
			err = errors.Join(err, lost)
		case rerr != nil:
			err = errors.Join(err, rerr)
		}
	}()
	return fn(fctx)
}
