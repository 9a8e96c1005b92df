package pglocks_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/pglocks/pglocks"
)

// terminateAndTake ends the server session that holds key for l1 (waiting
// until it has exited), then takes key exclusively with l2 at once, as
// another process would: between the two, l1 may not have heard of its
// session's end yet.
func terminateAndTake(t *testing.T, e *env, l2 *pglocks.Locker, key pglocks.Key) *pglocks.Lock {
	t.Helper()
	pids := e.held(bigint(key))
	if len(pids) != 1 {
		t.Fatalf("want one session holding %v, got %v", key, pids)
	}
	if _, err := srv.Admin.Exec(context.Background(), "SELECT pg_terminate_backend($1, 5000)", pids[0]); err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(10 * time.Second); ; {
		lk, err := l2.TryLock(context.Background(), key)
		if err == nil {
			return lk
		}
		if !errors.Is(err, pglocks.ErrLocked) || time.Now().After(end) {
			t.Fatalf("another Locker's TryLock after the holder's session ended: %v", err)
		}
	}
}

// A handle's Release that lets nothing go on the server (others of the
// Locker share the hold, or a minimum hold keeps it) reports a lock lost
// just before it, even when another session holds the key already and the
// Locker has not heard of the loss (issue 25: nil for 1 of 20 shared
// handles before, and in most rounds with the Release right after the
// other grant).
func TestReleaseReportsLossWithoutUnlock(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l1, l2 := e.locker(2), e.locker(2)
		ctx := context.Background()
		for i := range 20 {
			key := testKey(t, i)
			var lks []*pglocks.Lock
			var what string
			switch i % 3 {
			case 0, 1:
				what = "one of two shared handles"
				lks = []*pglocks.Lock{mustLock(t, l1, key, pglocks.Shared()), mustLock(t, l1, key, pglocks.Shared())}
			case 2:
				what = "a handle within its minimum hold"
				lks = []*pglocks.Lock{mustLock(t, l1, key, pglocks.MinHold(time.Minute))}
			}
			other := terminateAndTake(t, e, l2, key)
			for j, lk := range lks {
				if err := lk.Release(ctx); !errors.Is(err, pglocks.ErrLockLost) {
					t.Fatalf("round %d: Release of %s (%d) after another session took the key: %v, want ErrLockLost", i, what, j, err)
				}
			}
			mustRelease(t, other)
		}
	})
}

// Do in Shared mode beside another shared handle of the same Locker
// returns the loss when the session ended while fn ran.
func TestSharedDoReportsLoss(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l1, l2 := e.locker(2), e.locker(2)
		ctx := context.Background()
		for i := range 5 {
			key := testKey(t, i)
			first := mustLock(t, l1, key, pglocks.Shared())
			var other *pglocks.Lock
			err := l1.Do(ctx, key, func(context.Context) error {
				other = terminateAndTake(t, e, l2, key)
				return nil
			}, pglocks.Shared())
			if !errors.Is(err, pglocks.ErrLockLost) {
				t.Fatalf("round %d: Do(Shared) whose session ended while fn ran: %v, want ErrLockLost", i, err)
			}
			if err := first.Release(ctx); !errors.Is(err, pglocks.ErrLockLost) {
				t.Fatalf("round %d: the other shared handle's Release: %v", i, err)
			}
			mustRelease(t, other)
		}
	})
}

// A shared handle's Release while others hold the key on a live session
// returns nil, and the key stays held until the last one goes.
func TestSharedReleaseKeepsServerHold(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l1, l2 := e.locker(2), e.locker(2)
		ctx := context.Background()
		key := testKey(t, 0)
		a, b := mustLock(t, l1, key, pglocks.Shared()), mustLock(t, l1, key, pglocks.Shared())
		mustRelease(t, a)
		if lk, err := l2.TryLock(ctx, key); !errors.Is(err, pglocks.ErrLocked) {
			t.Fatalf("TryLock while one shared handle remains: %v %v", lk, err)
		}
		mustRelease(t, b)
		lk, err := l2.TryLock(ctx, key)
		if err != nil {
			t.Fatalf("TryLock after the last shared handle: %v", err)
		}
		mustRelease(t, lk)
	})
}
