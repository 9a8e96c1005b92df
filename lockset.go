package pglocks

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
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
	stops  []func() bool // guarded by mu: what watch registered on the locks' ctx
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
	l := s.locks[0].l
	holds := make([]*hold, len(s.locks))
	for i, lk := range s.locks {
		holds[i] = &lk.hold
	}
	errs := l.rel.release(ctx, holds) // each lock's
	if l.cfg.tracers.release != nil {
		for i, lk := range s.locks {
			l.cfg.tracers.traceRelease(l, lk, errs[i])
		}
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
	switch {
	case o.err != nil:
		return nil, lockError(ks[0], o.err)
	case o.slots > 0:
		return nil, lockError(ks[0], errors.New("Slots works with Lock, TryLock, Do and TryDo, not with several keys"))
	}
	began := time.Now()
	var tctx context.Context
	if l.cfg.tracers.acquire != nil {
		tctx = l.cfg.tracers.start(ctx, l, ks, o, wait)
	}
	var locks []*Lock
	if ctx.Err() != nil {
		err = lockError(ks[0], ctxError(ctx))
	} else {
		var holds []*hold
		if holds, err = l.acq.acquire(ctx, ks, o, wait); err == nil {
			locks = locksOf(holds)
		}
	}
	d := time.Since(began)
	l.counts.count(d, err)
	if l.cfg.tracers.acquire != nil {
		l.cfg.tracers.end(tctx, l, d, nil, locks, err)
	}
	if err != nil {
		return nil, err
	}
	return newLockSet(locks), nil
}
