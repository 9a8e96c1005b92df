package pglocks_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

// ReleaseNoWait: the handle is released when it returns, this Locker can
// take the key again at once, and another session can take it soon after,
// without anything else sent on the session.
func TestReleaseNoWait(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		other := e.locker(4)
		key := testKey(t, 0)

		lk := mustLock(t, l, key)
		if err := lk.ReleaseNoWait(t.Context()); err != nil {
			t.Fatal(err)
		}
		select {
		case <-lk.Done():
		default:
			t.Fatal("Done not closed when ReleaseNoWait returned")
		}
		wantErr(t, lk.Err(), pglocks.ErrReleased)
		wantErr(t, lk.ReleaseNoWait(t.Context()), pglocks.ErrReleased)
		wantErr(t, lk.Release(t.Context()), pglocks.ErrReleased)

		// Nothing else is sent on the session: the unlock goes alone.
		waitFor(t, 2*time.Second, "the key to be free on the server", func() bool { return len(e.held(bigint(key))) == 0 })
		lk2, err := other.TryLock(t.Context(), key)
		if err != nil {
			t.Fatalf("another Locker's TryLock after ReleaseNoWait: %v", err)
		}
		mustRelease(t, lk2)

		// The same Locker takes the key again at once, behind its unlock;
		// the server then holds it once, on one session.
		for range 50 {
			lk = mustLock(t, l, key)
			if err := lk.ReleaseNoWait(t.Context()); err != nil {
				t.Fatal(err)
			}
			lk, err = l.TryLock(t.Context(), key)
			if err != nil {
				t.Fatalf("TryLock right after ReleaseNoWait: %v", err)
			}
			if err := lk.ReleaseNoWait(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		lk = mustLock(t, l, key)
		_, err = other.TryLock(t.Context(), key)
		wantErr(t, err, pglocks.ErrLocked)
		if pids := e.held(bigint(key)); len(pids) != 1 {
			t.Fatalf("held by sessions %v, want one", pids)
		}
		var n int
		for _, r := range e.locks() {
			if r.key == bigint(key) {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("%d rows for the key in pg_locks, want 1", n)
		}
		mustRelease(t, lk)
		if pids := e.held(bigint(key)); len(pids) != 0 {
			t.Fatalf("held by %v after Release", pids)
		}
		if st := l.Stat(); st.HeldExclusive() != 0 {
			t.Fatalf("Stat says %d held", st.HeldExclusive())
		}
	})
}

// Goroutines of one Locker, and another Locker, taking one key with
// ReleaseNoWait exclude each other as with Release.
func TestReleaseNoWaitExcludes(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		lockers := []*pglocks.Locker{e.locker(4), e.locker(4)}
		key := testKey(t, 0)
		var inside, entered atomic.Int32
		var wg sync.WaitGroup
		for g := range 8 {
			l := lockers[g%2]
			wg.Go(func() {
				for i := range 40 {
					var lk *pglocks.Lock
					var err error
					if i%3 == 0 {
						lk, err = l.TryLock(t.Context(), key)
						if errors.Is(err, pglocks.ErrLocked) {
							continue
						}
					} else {
						lk, err = l.Lock(t.Context(), key)
					}
					if err != nil {
						t.Error(err)
						return
					}
					if n := inside.Add(1); n != 1 {
						t.Errorf("%d goroutines inside at once", n)
					}
					entered.Add(1)
					inside.Add(-1)
					if i%2 == 0 {
						err = lk.ReleaseNoWait(t.Context())
					} else {
						err = lk.Release(t.Context())
					}
					if err != nil {
						t.Error(err)
					}
				}
			})
		}
		wg.Wait()
		if entered.Load() == 0 {
			t.Fatal("nobody entered")
		}
		for _, l := range lockers {
			waitFor(t, 2*time.Second, "the Locker to hold nothing", func() bool { return l.Stat().HeldExclusive() == 0 })
		}
	})
}

// A Lock/ReleaseNoWait loop under WithMaxLocks(1) never sees
// ErrTooManyLocks: a key taken behind its own posted unlock counts once.
func TestReleaseNoWaitMaxLocks(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4, pglocks.WithMaxLocks(1))
		key := testKey(t, 0)
		for range 100 {
			lk := mustLock(t, l, key)
			if err := lk.ReleaseNoWait(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		lk := mustLock(t, l, key)
		_, err := l.TryLock(t.Context(), testKey(t, 1))
		wantErr(t, err, pglocks.ErrTooManyLocks)
		mustRelease(t, lk)
	})
}

// A goroutine of the Locker that waits for a key when its holder lets it go
// with ReleaseNoWait gets it at once, not after the unlock's bound; a waiter
// in another process gets it too.
func TestReleaseNoWaitWaiters(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		other := e.locker(4)
		key := testKey(t, 0)
		for _, waiter := range []*pglocks.Locker{l, other} {
			lk := mustLock(t, l, key)
			got := make(chan error, 1)
			go func() {
				w, err := waiter.Lock(t.Context(), key)
				if err == nil {
					err = w.Release(context.Background())
				}
				got <- err
			}()
			if waiter == other {
				waitFor(t, 5*time.Second, "the waiter in the server's queue", func() bool { return e.waiting(bigint(key)) })
			} else {
				waitFor(t, 5*time.Second, "the waiter in the Locker", func() bool { return l.Stat().WaitingInProcess() == 1 })
			}
			if err := lk.ReleaseNoWait(t.Context()); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-got:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the waiter never got the key")
			}
		}
	})
}

// A session that ended under a lock: ReleaseNoWait cannot know, returns, and
// the Locker goes on with a fresh session.
func TestReleaseNoWaitEndedSession(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		key, other := testKey(t, 0), testKey(t, 1)
		lk := mustLock(t, l, key)
		held := mustLock(t, l, other)
		pids := e.held(bigint(key))
		if len(pids) != 1 {
			t.Fatalf("held by %v", pids)
		}
		if _, err := srv.Admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", pids[0]); err != nil {
			t.Fatal(err)
		}
		// Where the driver does not pipeline, it is Release: which may hear
		// that the session ended.
		err := lk.ReleaseNoWait(t.Context())
		if err != nil && !errors.Is(err, pglocks.ErrLockLost) && !errors.Is(err, pglocks.ErrSessionEnded) {
			t.Fatalf("ReleaseNoWait: %v", err)
		}
		// The other lock on that session is reported lost.
		select {
		case <-held.Done():
			wantErr(t, held.Err(), pglocks.ErrLockLost)
		case <-time.After(10 * time.Second):
			t.Fatal("the other lock on the ended session was never reported lost")
		}
		lk = mustLock(t, l, key)
		mustRelease(t, lk)
	})
}

// The statements a Locker prepares on a session are dropped when the
// session goes back to the pool: the application's connection is as it was,
// and a later Locker on the same connection prepares them again.
func TestPreparedStatementsDropped(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	cfg, err := pgxpool.ParseConfig(srv.DB(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1 // one connection, so that the second Locker gets the same one
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	prepared := func() int {
		var n int
		if err := p.QueryRow(ctx, "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pglocks\\_%'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for round := range 2 {
		l, err := pglocks.New(p, pglocks.WithMaxConns(1))
		if err != nil {
			t.Fatal(err)
		}
		key := pglocks.ID(int64(round))
		lk, err := l.Lock(ctx, key)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if err := lk.ReleaseNoWait(ctx); err != nil {
			t.Fatal(err)
		}
		lk, err = l.TryLock(ctx, key)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if err := lk.Release(ctx); err != nil {
			t.Fatal(err)
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if n := prepared(); n != 0 {
			t.Fatalf("round %d: %d statements of pglocks left on the connection", round, n)
		}
	}
}

// A lock whose session ended is one loss in Stat, whether the Locker heard
// of the end first or Release found it.
func TestReleaseOfEndedSessionCountsLoss(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		for i := range 5 {
			key := testKey(t, i)
			lk := mustLock(t, l, key)
			pids := e.held(bigint(key))
			if len(pids) != 1 {
				t.Fatalf("held by %v", pids)
			}
			if _, err := srv.Admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", pids[0]); err != nil {
				t.Fatal(err)
			}
			wantErr(t, lk.Release(t.Context()), pglocks.ErrLockLost)
			if n := l.Stat().Losses(); n != int64(i+1) {
				t.Fatalf("after %d losses Stat counts %d", i+1, n)
			}
		}
	})
}
