package pglocks

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// A LockSet is several locks taken together by [Locker.LockAll] or
// [Locker.TryLockAll]: all of them were held at once when it was returned.
type LockSet struct {
	locks []*Lock

	// The set's own ctx, done once any lock of the set is no longer held;
	// made on the first call of Done or Err.
	once   sync.Once
	ctx    context.Context
	cancel context.CancelCauseFunc
	mu     sync.Mutex
	stops  []func() bool
}

// Locks returns the set's locks, one per distinct key, in the order they
// were taken (see [Locker.LockAll]).
func (s *LockSet) Locks() []*Lock { return slices.Clone(s.locks) }

// Done returns a channel that is closed once any lock of the set is no
// longer held: released, released by [Locker.Close], or lost.
func (s *LockSet) Done() <-chan struct{} { return s.watch().Done() }

// Err returns nil while every lock of the set is held, and otherwise the
// error of the first lock (in key order) not held, as [Lock.Err] reports it.
func (s *LockSet) Err() error {
	for _, lk := range s.locks {
		if err := lk.Err(); err != nil {
			return err
		}
	}
	return nil
}

// watch returns the set's ctx, making it on first use: done at once if a
// lock has ended already, else when the first one ends.
func (s *LockSet) watch() context.Context {
	s.once.Do(func() {
		s.ctx, s.cancel = context.WithCancelCause(context.Background())
		if err := s.Err(); err != nil {
			s.cancel(err)
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, lk := range s.locks {
			s.stops = append(s.stops, context.AfterFunc(lk.ctx, func() { s.cancel(lk.Err()) }))
		}
	})
	return s.ctx
}

// Release releases every lock of the set, as [Lock.Release] does, sending
// the unlocks for one session together (one round trip with pgx); it returns
// their errors joined.
func (s *LockSet) Release(ctx context.Context) error {
	if ctx == nil {
		ctx = context.Background() // see Lock.Release
	}
	defer s.stop()
	var errs []error
	var rels []*release
	byHolder := map[*holder][]*req{}
	for _, lk := range s.locks {
		rel, err := lk.beginRelease()
		if rel == nil {
			errs = append(errs, err)
			continue
		}
		rels = append(rels, rel)
		byHolder[rel.h] = append(byHolder[rel.h], rel.r)
	}
	if len(rels) == 0 {
		s.watch()
		s.cancel(s.Err())
		return errors.Join(errs...)
	}
	l := rels[0].lk.l
	if len(byHolder) == 1 {
		l.doMany(context.WithoutCancel(ctx), rels[0].h, byHolder[rels[0].h])
	} else {
		var wg sync.WaitGroup
		for h, rs := range byHolder {
			wg.Go(func() { l.doMany(context.WithoutCancel(ctx), h, rs) })
		}
		wg.Wait()
	}
	for _, rel := range rels {
		errs = append(errs, rel.end(rel.r.err))
	}
	s.watch()
	s.cancel(s.Err()) // Done is closed when Release returns
	return errors.Join(errs...)
}

// stop unregisters what watch registered on the locks' ctx.
func (s *LockSet) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.stops {
		f()
	}
	s.stops = nil
}

func newLockSet(locks []*Lock) *LockSet { return &LockSet{locks: locks} }

// LockAll takes every key in keys, all or nothing, waiting as long as ctx
// allows, and returns them as a [LockSet].
//
//   - Keys are taken in one global order, whatever their order in keys:
//     bigint keys by value, then pair keys by (a, b). Two LockAll calls, in
//     this process or any other using pglocks, therefore never deadlock each
//     other, and neither do a LockAll and a transaction or a client that
//     takes the keys in the same order.
//   - A key listed more than once is taken once: duplicates are merged.
//   - First every key is tried at once, in one round trip where the driver
//     pipelines (pgx). If any is held elsewhere, what was taken is let go and
//     the keys are waited for in order, on one server session that then holds
//     them all, so the server's deadlock detector sees any cycle through
//     it: a deadlock with a client that takes the keys in another order
//     fails one of the two waits with [ErrDeadlock].
//   - When LockAll returns an error, none of the keys is held by it, on the
//     server or in this process.
//
// ctx's deadline is enforced by the server, as for [Locker.Lock]. An empty
// keys, or a zero Key in it, is an error.
func (l *Locker) LockAll(ctx context.Context, keys []Key, opts ...LockOption) (*LockSet, error) {
	return l.acquireAll(ctx, keys, lockOptions(opts), true)
}

// TryLockAll takes every key in keys if all of them can be had at once, and
// otherwise returns an error matching [ErrLocked] that names a key that
// could not be had, holding none of them. It tries every key in one round
// trip where the driver pipelines (pgx), and never waits for a lock. Keys are
// ordered and merged as [Locker.LockAll] does.
func (l *Locker) TryLockAll(ctx context.Context, keys []Key, opts ...LockOption) (*LockSet, error) {
	return l.acquireAll(ctx, keys, lockOptions(opts), false)
}

// DoAll runs fn while holding every key in keys, taken as [Locker.LockAll]
// does, and releases them when fn returns or panics. fn's ctx is cancelled,
// with the loss error as its cause, if any of the locks is lost while fn
// runs; DoAll then returns an error matching [ErrLockLost].
func (l *Locker) DoAll(ctx context.Context, keys []Key, fn func(ctx context.Context) error, opts ...LockOption) error {
	if fn == nil {
		return fmt.Errorf("pglocks: DoAll: %w", errNilFunc)
	}
	s, err := l.LockAll(ctx, keys, opts...)
	if err != nil {
		return err
	}
	return runHeld(ctx, ctx, s.watch(), s.Err, s.Release, fn)
}

// compareKeys is the global order of LockAll.
func compareKeys(a, b Key) int {
	if a.kind != b.kind {
		return int(a.kind) - int(b.kind)
	}
	switch {
	case a.v < b.v:
		return -1
	case a.v > b.v:
		return 1
	}
	return 0
}

// sortedKeys returns keys in the global order without duplicates.
func sortedKeys(keys []Key) ([]Key, error) {
	if len(keys) == 0 {
		return nil, errors.New("pglocks: no keys")
	}
	for _, k := range keys {
		if !k.valid() {
			return nil, lockError(k, ErrInvalidKey)
		}
	}
	ks := slices.Clone(keys)
	slices.SortFunc(ks, compareKeys)
	return slices.Compact(ks), nil
}

// acquireAll is LockAll (wait) and TryLockAll (!wait).
func (l *Locker) acquireAll(ctx context.Context, keys []Key, o lockConfig, wait bool) (*LockSet, error) {
	if ctx == nil {
		return nil, fmt.Errorf("pglocks: %w", errNilContext)
	}
	ks, err := sortedKeys(keys)
	if err != nil {
		return nil, err
	}
	if ctx.Err() != nil {
		return nil, lockError(ks[0], ctxError(ctx))
	}
	if !l.beginCall() {
		return nil, lockError(ks[0], ErrClosed)
	}
	defer l.calls.Done()

	// In this process, in key order: a handle where a shared hold is
	// joined, else the entry to take on the server.
	locks := make([]*Lock, len(ks))
	var mine []*entry
	undo := func() {
		for _, lk := range locks {
			if lk != nil {
				_ = lk.Release(context.WithoutCancel(ctx))
			}
		}
		for _, e := range mine {
			l.unclaim(e)
		}
	}
	for i, k := range ks {
		lk, e, err := l.claim(ctx, k, o, wait)
		if err != nil {
			undo()
			return nil, err
		}
		locks[i] = lk
		if e != nil {
			mine = append(mine, e)
		}
	}
	if len(mine) > 0 {
		l.mu.Lock()
		if l.nserver+len(mine) > l.cfg.maxLocks {
			l.mu.Unlock()
			undo()
			return nil, fmt.Errorf("pglocks: %d locks: %w (%d)", len(mine), ErrTooManyLocks, l.cfg.maxLocks)
		}
		l.nserver += len(mine)
		for _, e := range mine {
			e.counted = true
		}
		l.mu.Unlock()
		held, err := l.acquireAllServer(ctx, mine, o, wait)
		if err != nil {
			undo()
			return nil, err
		}
		j := 0
		for i := range locks {
			if locks[i] == nil {
				locks[i] = held[j]
				j++
			}
		}
	}
	l.cfg.logger.Debug("pglocks: acquired a set", "keys", len(ks), "shared", o.shared)
	return newLockSet(locks), nil
}

// acquireAllServer takes the keys of es, which the caller has claimed, on
// the server: on one session, all or nothing.
func (l *Locker) acquireAllServer(ctx context.Context, es []*entry, o lockConfig, wait bool) ([]*Lock, error) {
	keys := make([]Key, len(es))
	for i, e := range es {
		keys[i] = e.key
	}
	for attempt := 1; ; attempt++ {
		h, tokens, err := l.serverLockAll(ctx, keys, o, wait)
		l.mu.Lock()
		if err == nil && h.dead {
			// h's session was closed after the grant (see acquireServer):
			// nothing is held; take them again.
			h.users--
			err = lockError(keys[0], fmt.Errorf("%w: its session was closed as it was granted", ErrLockLost))
			if attempt < 3 && ctx.Err() == nil && !l.closed {
				l.mu.Unlock()
				continue
			}
		}
		if err != nil {
			l.mu.Unlock()
			return nil, err
		}
		h.users--
		locks := make([]*Lock, len(es))
		for i, e := range es {
			e.state, e.h, e.token = stateHeld, h, tokens[i]
			h.entries[e] = struct{}{}
		}
		if l.closed {
			// Close is waiting for us; it releases what its holders hold.
			l.mu.Unlock()
			return nil, lockError(keys[0], ErrClosed)
		}
		for i, e := range es {
			locks[i] = l.newLockLocked(e)
			l.dispatch(e)
		}
		watch := h != l.primary
		l.mu.Unlock()
		if watch && h.tryEnter() {
			l.watch(h)
		}
		return locks, nil
	}
}

// serverLockAll takes keys on the server: first all at once with tries on
// the primary holder, then, if some are held elsewhere and wait is set, by
// waiting for each in turn on a session of its own. It returns the holder
// with users incremented, and the fencing tokens.
func (l *Locker) serverLockAll(ctx context.Context, keys []Key, o lockConfig, wait bool) (*holder, []int64, error) {
	for retried := false; ; retried = true {
		h, tokens, err := l.tryAll(ctx, keys, o) // errors name their key
		if err == nil {
			return h, tokens, nil
		}
		var broke brokenSession
		if errors.As(err, &broke) && !retried && ctx.Err() == nil {
			continue // the primary's session had ended: once more, on a fresh one
		}
		if !errors.Is(err, ErrLocked) || !wait {
			return nil, nil, err
		}
		break
	}
	for retried := false; ; retried = true {
		w, tokens, at, err := l.waitOnAll(ctx, keys, o)
		if err != nil && !retried && ctx.Err() == nil && sqlState(err) == "" && !errors.Is(err, ErrClosed) &&
			!errors.Is(err, ErrDeadlock) {
			continue // a stale session; see serverLock
		}
		if err != nil {
			return nil, nil, lockError(keys[at], err)
		}
		return w, tokens, nil
	}
}

// brokenSession is a tryAll that failed because the primary's session had
// ended.
type brokenSession struct{ error }

func (b brokenSession) Unwrap() error { return b.error }

// tryAll tries every key on the primary holder, in one round trip where the
// driver pipelines. If any is not granted it lets the others go and returns
// an error matching ErrLocked (or the statement's error).
func (l *Locker) tryAll(ctx context.Context, keys []Key, o lockConfig) (*holder, []int64, error) {
	h, err := l.primaryHolder(ctx)
	if err != nil {
		return nil, nil, lockError(keys[0], err)
	}
	oks := make([]bool, len(keys))
	tokens := make([]int64, len(keys))
	rs := make([]*req, len(keys))
	for i, k := range keys {
		q, args := stmt(stmtTry, k, o.shared, l.cfg.fencing)
		rs[i] = &req{q: q, args: args, dest: []any{&oks[i], &tokens[i]}, onErr: func(sctx context.Context, err error) error {
			if sqlState(err) != stateOutOfMemory {
				return err
			}
			if l.cfg.fencing { // as in serverLock
				uq, uargs := stmt(stmtUnlock, k, o.shared, false)
				var unlocked bool
				if uerr := h.c.query(sctx, uq, uargs, &unlocked); uerr != nil {
					return uerr
				}
			}
			return keepConn{classify(err)}
		}}
	}
	l.doMany(ctx, h, rs)
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
		return h, tokens, nil
	}
	if len(got) > 0 {
		us := make([]*req, len(got))
		for i, k := range got {
			q, args := stmt(stmtUnlock, k, o.shared, false)
			var ok bool
			us[i] = &req{q: q, args: args, dest: []any{&ok}, check: func() error {
				if !ok {
					return errNotHeld
				}
				return nil
			}}
		}
		// If an unlock fails, its session is closed, which frees the rest.
		l.doMany(context.WithoutCancel(ctx), h, us)
	}
	l.mu.Lock()
	dead := h.dead
	l.mu.Unlock()
	l.unuse(h)
	if dead && !errors.Is(first, ErrLocked) {
		first = brokenSession{first}
	}
	return nil, nil, first
}
