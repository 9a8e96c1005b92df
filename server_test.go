package pglocks_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// 4. Fencing tokens increase strictly from one holder to the next, and are
// read after the grant, not when the wait began.
func TestFencingTokens(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		a := e.locker(4, pglocks.WithFencingTokens())
		b := e.locker(4, pglocks.WithFencingTokens())
		plain := e.locker(4)
		key := testKey(t, 0)

		lp := mustLock(t, plain, key)
		if lp.Token() != 0 {
			t.Errorf("Token without WithFencingTokens: %d", lp.Token())
		}
		mustRelease(t, lp)

		var last int64
		next := func(lk *pglocks.Lock) {
			t.Helper()
			if lk.Token() <= last {
				t.Fatalf("token %d after %d: not increasing", lk.Token(), last)
			}
			last = lk.Token()
		}
		for range 3 { // uncontended, alternating Lockers
			for _, l := range []*pglocks.Locker{a, b} {
				lk := mustLock(t, l, key)
				next(lk)
				mustRelease(t, lk)
			}
		}

		// A waiter's token is read when it is granted: after anything that
		// happened while it waited.
		la := mustLock(t, a, key)
		next(la)
		got := make(chan *pglocks.Lock)
		go func() { got <- mustLock(t, b, key) }()
		waitFor(t, 10*time.Second, "b to wait", func() bool { return e.waiting(bigint(key)) })
		var during int64
		if err := srv.Admin.QueryRow(t.Context(), "SELECT pg_current_xact_id()::text::bigint").Scan(&during); err != nil {
			t.Fatal(err)
		}
		mustRelease(t, la)
		lb := <-got
		if lb.Token() <= during {
			t.Fatalf("waiter's token %d is not after %d, taken while it waited", lb.Token(), during)
		}
		mustRelease(t, lb)

		// Goroutines sharing one hold share its token.
		s1 := mustLock(t, a, key, pglocks.Shared())
		s2 := mustLock(t, a, key, pglocks.Shared())
		if s1.Token() == 0 || s1.Token() != s2.Token() {
			t.Errorf("shared holders of one Locker: tokens %d and %d", s1.Token(), s2.Token())
		}
		mustRelease(t, s1)
		mustRelease(t, s2)
	})
}

// 5. A standby grants advisory locks that the primary never sees: taking a
// lock there fails with ErrStandby and leaves nothing, and asking it who
// leads fails with ErrStandby rather than saying nobody does.
func TestStandby(t *testing.T) {
	t.Parallel()
	primary := pgtest.Local(t, pgtest.Options{})
	standby := primary.Standby(t)
	var inRecovery bool
	if err := standby.Admin.QueryRow(t.Context(), "SELECT pg_is_in_recovery()").Scan(&inRecovery); err != nil || !inRecovery {
		t.Fatalf("the standby is not in recovery: %v %v", inRecovery, err)
	}
	// The primary has a leader for ID(1).
	leader, err := pgx.Connect(t.Context(), primary.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer leader.Close(context.Background())
	if _, err := leader.Exec(t.Context(), "SELECT pg_advisory_lock(1)"); err != nil {
		t.Fatal(err)
	}
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) {
			l := lockerOn(t, d, standby.URL)
			_, err := l.Lock(t.Context(), pglocks.ID(1))
			wantErr(t, err, pglocks.ErrStandby)
			_, err = l.TryLock(t.Context(), pglocks.ID(1))
			wantErr(t, err, pglocks.ErrStandby)
			wantErr(t, l.Do(t.Context(), pglocks.ID(1), func(context.Context) error { t.Error("fn ran"); return nil }), pglocks.ErrStandby)
			_, err = l.Leader(t.Context(), pglocks.ID(1))
			wantErr(t, err, pglocks.ErrStandby)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			for h := range l.Observe(ctx, pglocks.ID(1)) {
				t.Errorf("Observe on a standby reported %+v", h)
			}
			if ctx.Err() != nil {
				t.Error("Observe on a standby did not stop")
			}
			wantErr(t, l.Lead(t.Context(), pglocks.ID(1), func(context.Context) error { t.Error("fn ran"); return nil }), pglocks.ErrStandby)
		})
	}
	c, err := pgx.Connect(t.Context(), standby.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	tx, err := c.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	wantErr(t, pglocks.LockTx(t.Context(), tx, pglocks.ID(1)), pglocks.ErrStandby)
	_ = tx.Rollback(t.Context())
	if locks := serverLocks(t, standby); len(locks) != 0 {
		t.Fatalf("locks left on the standby: %v", locks)
	}
}

// 7. A full server lock table fails one acquire with ErrLockTableFull and
// leaves the Locker's other locks held; WithMaxLocks refuses before the
// server is asked.
func TestLockTableFull(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{Settings: []string{"max_locks_per_transaction=10", "max_connections=20"}})
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) {
			l := lockerOn(t, d, fs.URL)
			lk0 := mustLock(t, l, pglocks.ID(0))

			filler, err := pgx.Connect(t.Context(), fs.URL)
			if err != nil {
				t.Fatal(err)
			}
			defer filler.Close(context.Background())
			_, err = filler.Exec(t.Context(), "SELECT count(pg_advisory_lock(g)) FROM generate_series(1000, 1000000) g")
			if sqlState(err) != "53200" {
				t.Fatalf("filling the lock table: %v", err)
			}
			_, err = l.Lock(t.Context(), pglocks.ID(1))
			wantErr(t, err, pglocks.ErrLockTableFull)
			if sqlState(err) != "53200" {
				t.Errorf("the driver's error is not inside: %v", err)
			}
			if lk0.Err() != nil || heldOn(t, fs, pglocks.ID(0)) == 0 {
				t.Fatalf("the Locker's other lock was lost: %v", lk0.Err())
			}
			if heldOn(t, fs, pglocks.ID(1)) != 0 {
				t.Fatal("the failed acquire left its lock held")
			}
			if _, err := filler.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
				t.Fatal(err)
			}
			mustRelease(t, mustLock(t, l, pglocks.ID(1)))
			mustRelease(t, lk0)
		})
	}
}

func sqlState(err error) string {
	var e interface{ SQLState() string }
	if errors.As(err, &e) {
		return e.SQLState()
	}
	return ""
}

func TestMaxLocks(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4, pglocks.WithMaxLocks(2))
		s1 := mustLock(t, l, testKey(t, 0), pglocks.Shared())
		s2 := mustLock(t, l, testKey(t, 0), pglocks.Shared()) // shares s1's hold: counts once
		lk1 := mustLock(t, l, testKey(t, 1))
		_, err := l.Lock(t.Context(), testKey(t, 2))
		wantErr(t, err, pglocks.ErrTooManyLocks)
		_, err = l.TryLock(t.Context(), testKey(t, 2))
		wantErr(t, err, pglocks.ErrTooManyLocks)
		if n := len(e.locks()); n != 2 {
			t.Fatalf("%d locks on the server, want 2", n)
		}
		mustRelease(t, lk1)
		mustRelease(t, mustLock(t, l, testKey(t, 2)))
		mustRelease(t, s1)
		mustRelease(t, s2)
	})
}

// 8. A deadlock between transaction locks is detected by the server and
// reported as ErrDeadlock; the failed acquire leaves nothing held and the
// transaction usable.
func TestDeadlock(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		a, b := testKey(t, 0), testKey(t, 1)
		tx1, tx2 := e.drv.begin(t, e), e.drv.begin(t, e)
		mustDo(t, tx1.lock(ctx, a, true))
		mustDo(t, tx2.lock(ctx, b, true))
		type result struct {
			tx  testTx
			err error
		}
		res := make(chan result, 2)
		go func() { res <- result{tx1, tx1.lock(ctx, b, true)} }()
		waitFor(t, 10*time.Second, "tx1 to wait", func() bool { return e.waiting(bigint(b)) })
		go func() { res <- result{tx2, tx2.lock(ctx, a, true)} }()
		loser := <-res
		wantErr(t, loser.err, pglocks.ErrDeadlock)
		if sqlState(loser.err) != "40P01" {
			t.Errorf("the driver's error is not inside: %v", loser.err)
		}
		// The loser still holds its first lock only, and can go on.
		held := map[string]int{}
		for _, r := range e.locks() {
			if r.granted {
				held[r.key]++
			}
		}
		if held[bigint(a)] != 1 || held[bigint(b)] != 1 || len(held) != 2 {
			t.Fatalf("after the deadlock pg_locks has %v", e.locks())
		}
		if _, err := loser.tx.queryString(ctx, "SELECT 'usable'"); err != nil {
			t.Fatalf("the loser's transaction: %v", err)
		}
		mustDo(t, loser.tx.rollback()) // lets the winner through
		if w := <-res; w.err != nil {
			t.Fatalf("the winner: %v", w.err)
		}
		_ = tx1.rollback()
		_ = tx2.rollback()
	})
}
