package pglocks_test

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// 1. Exclusion between sessions, and shared locks.
func TestExclusionBetweenSessions(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		a, b, c := e.locker(4), e.locker(4), e.locker(4)
		key := testKey(t, 0)

		lk := mustLock(t, a, key)
		_, err := b.TryLock(ctx, key)
		wantErr(t, err, pglocks.ErrLocked)
		_, err = b.TryLock(ctx, key, pglocks.Shared())
		wantErr(t, err, pglocks.ErrLocked)

		got := make(chan *pglocks.Lock)
		go func() { got <- mustLock(t, b, key) }()
		waitFor(t, 10*time.Second, "b to wait on the server", func() bool { return e.waiting(bigint(key)) })
		select {
		case <-got:
			t.Fatal("b took the lock while a held it")
		default:
		}
		mustRelease(t, lk)
		mustRelease(t, <-got)

		// Shared: any number at once; exclusive waits for all of them.
		s1 := mustLock(t, a, key, pglocks.Shared())
		s2 := mustLock(t, b, key, pglocks.Shared())
		_, err = c.TryLock(ctx, key)
		wantErr(t, err, pglocks.ErrLocked)
		excl := make(chan *pglocks.Lock)
		go func() { excl <- mustLock(t, c, key) }()
		waitFor(t, 10*time.Second, "c to wait on the server", func() bool { return e.waiting(bigint(key)) })
		mustRelease(t, s1)
		select {
		case <-excl:
			t.Fatal("exclusive granted while a shared holder remains")
		case <-time.After(50 * time.Millisecond):
		}
		if pids := e.held(bigint(key)); len(pids) != 1 {
			t.Fatalf("want only b's shared hold, pg_locks has holders %v", pids)
		}
		mustRelease(t, s2)
		x := <-excl
		// A new shared request waits behind the exclusive holder.
		_, err = a.TryLock(ctx, key, pglocks.Shared())
		wantErr(t, err, pglocks.ErrLocked)
		mustRelease(t, x)
	})
}

// 1. Goroutines of one Locker exclude each other, although the server would
// let one session take its own lock again.
func TestExclusionBetweenGoroutines(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(8)
		key := testKey(t, 0)
		var inside, entered atomic.Int32
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				for range 5 {
					err := l.Do(t.Context(), key, func(context.Context) error {
						if n := inside.Add(1); n != 1 {
							t.Errorf("%d goroutines inside the lock at once", n)
						}
						entered.Add(1)
						time.Sleep(time.Millisecond)
						inside.Add(-1)
						return nil
					})
					if err != nil {
						t.Error(err)
					}
				}
			})
		}
		wg.Wait()
		if entered.Load() != 80 {
			t.Fatalf("entered %d times, want 80", entered.Load())
		}

		// TryLock from a second goroutine of the same Locker fails.
		lk := mustLock(t, l, key)
		_, err := l.TryLock(t.Context(), key)
		wantErr(t, err, pglocks.ErrLocked)
		_, err = l.TryLock(t.Context(), key, pglocks.Shared())
		wantErr(t, err, pglocks.ErrLocked)
		mustRelease(t, lk)

		// Shared holders in one Locker coexist; an exclusive one waits for all.
		s1 := mustLock(t, l, key, pglocks.Shared())
		s2 := mustLock(t, l, key, pglocks.Shared())
		excl := make(chan *pglocks.Lock)
		go func() { excl <- mustLock(t, l, key) }()
		mustRelease(t, s1)
		select {
		case <-excl:
			t.Fatal("exclusive granted while a shared holder of the same Locker remains")
		case <-time.After(50 * time.Millisecond):
		}
		mustRelease(t, s2)
		mustRelease(t, <-excl)
	})
}

// 2. Lock waits in the server's lock queue, not in a polling loop: the waiter
// shows up in pg_locks as not granted, and is granted by the server itself
// when the holder lets go (a poller would never appear there).
func TestLockWaitsInServer(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		a, b := e.locker(4), e.locker(4)
		key := testKey(t, 0)
		lk := mustLock(t, a, key)
		got := make(chan *pglocks.Lock)
		go func() { got <- mustLock(t, b, key) }()
		waitFor(t, 10*time.Second, "a waiting entry in pg_locks", func() bool { return e.waiting(bigint(key)) })
		holder := e.held(bigint(key))
		mustRelease(t, lk)
		lb := <-got
		if now := e.held(bigint(key)); len(now) != 1 || now[0] == holder[0] {
			t.Fatalf("after hand-over pg_locks holders are %v (before: %v)", now, holder)
		}
		mustRelease(t, lb)
	})
}

// 3. A deadline bounds the wait, enforced by the server through lock_timeout
// for that statement only.
func TestLockDeadline(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		a, b := e.locker(4), e.locker(2)
		key := testKey(t, 0)
		lk := mustLock(t, a, key)
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		_, err := b.Lock(ctx, key)
		wantErr(t, err, context.DeadlineExceeded)
		var pgErr interface{ SQLState() string }
		if !errors.As(err, &pgErr) || pgErr.SQLState() != "55P03" {
			t.Errorf("want the server's lock_timeout error (55P03) inside %v", err)
		}
		if e.waiting(bigint(key)) {
			t.Error("the wait is still queued on the server")
		}
		// b's pool still works, and its sessions have no lock_timeout left.
		lb := make(chan *pglocks.Lock)
		go func() { lb <- mustLock(t, b, key) }()
		time.Sleep(1500 * time.Millisecond) // longer than any leaked lock_timeout
		mustRelease(t, lk)
		mustRelease(t, <-lb)

		// A deadline beyond lock_timeout's range (about 24.8 days) still
		// waits, and gets the lock when it is free.
		far, cancelFar := context.WithTimeout(t.Context(), 30*24*time.Hour)
		defer cancelFar()
		lk = mustLock(t, a, key)
		farGot := make(chan error)
		go func() {
			lb, err := b.Lock(far, key)
			if err == nil {
				err = lb.Release(context.Background())
			}
			farGot <- err
		}()
		waitFor(t, 10*time.Second, "b to wait with a far deadline", func() bool { return e.waiting(bigint(key)) })
		mustRelease(t, lk)
		if err := <-farGot; err != nil {
			t.Fatalf("Lock with a 30-day deadline: %v", err)
		}

		// A deadline already past fails before touching the server.
		past, cancel2 := context.WithDeadline(t.Context(), time.Now().Add(-time.Second))
		defer cancel2()
		_, err = b.Lock(past, key)
		wantErr(t, err, context.DeadlineExceeded)
	})
}

// 4. A failed acquire never leaves a lock behind, even when the cancel races
// with the grant: thousands of randomly timed cancellations, and after each
// failure the lock must be free at once.
func TestCancelRaceLeavesNothing(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		const workers, rounds = 4, 250 // 1000 cancellations per driver
		var wg sync.WaitGroup
		var failed, won atomic.Int32
		for w := range workers {
			h, b := e.locker(2), e.locker(2)
			key := testKey(t, w)
			r := rand.New(rand.NewPCG(uint64(w), 7))
			wg.Go(func() {
				lk, err := h.Lock(t.Context(), key)
				if err != nil {
					t.Error(err)
					return
				}
				for range rounds {
					ctx, cancel := context.WithCancel(t.Context())
					res := make(chan error, 1)
					var got *pglocks.Lock
					go func() {
						var err error
						got, err = b.Lock(ctx, key)
						res <- err
					}()
					d1 := time.Duration(r.IntN(1500)) * time.Microsecond
					d2 := time.Duration(r.IntN(1500)) * time.Microsecond
					time.AfterFunc(d1, cancel)
					time.Sleep(d2)
					if err := lk.Release(context.Background()); err != nil {
						t.Error(err)
						cancel()
						return
					}
					berr := <-res
					cancel()
					if berr == nil {
						won.Add(1)
						if err := got.Release(context.Background()); err != nil {
							t.Error(err)
							return
						}
					} else {
						if !errors.Is(berr, context.Canceled) {
							t.Errorf("want context.Canceled, got %v", berr)
							return
						}
						failed.Add(1)
					}
					// Whatever happened, nothing of b's may be held now.
					lk, err = h.TryLock(context.Background(), key)
					if err != nil {
						t.Errorf("after b's Lock returned %v, the key is still held (%v): %v", berr, err, e.locks())
						return
					}
				}
				if err := lk.Release(context.Background()); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		t.Logf("%d cancelled, %d granted", failed.Load(), won.Load())
		if failed.Load() == 0 {
			t.Error("no wait was cancelled: the test did not exercise the race")
		}
	})
}

// 5. A connection that holds locks never goes back to the pool holding them;
// a failed unlock closes the connection, which frees its locks.
func TestPoolNeverGetsHeldLocks(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(2)
		keys := []pglocks.Key{testKey(t, 0), testKey(t, 1)}
		lk0 := mustLock(t, l, keys[0])
		lk1 := mustLock(t, l, keys[1])
		holders := e.held(bigint(keys[0]))
		if len(holders) != 1 {
			t.Fatalf("holders: %v", holders)
		}
		// Kill the holder's session behind the Locker's back: the next
		// statement on it fails, and every lock on it is reported lost.
		var ok bool
		if err := srv.Admin.QueryRow(t.Context(), "SELECT pg_terminate_backend($1)", holders[0]).Scan(&ok); err != nil || !ok {
			t.Fatalf("terminate: %v %v", ok, err)
		}
		if err := lk0.Release(context.Background()); err == nil {
			t.Fatal("Release on a terminated session succeeded")
		}
		select {
		case <-lk1.Done():
		default:
			t.Fatal("the other lock on the dead session is not reported lost")
		}
		wantErr(t, lk1.Err(), pglocks.ErrLockLost)
		wantErr(t, lk1.Release(context.Background()), pglocks.ErrLockLost)

		// The Locker and its pool go on working, with a fresh session.
		lk := mustLock(t, l, keys[0])
		if now := e.held(bigint(keys[0])); len(now) != 1 || now[0] == holders[0] {
			t.Fatalf("holders after recovery: %v", now)
		}
		mustRelease(t, lk)
		if left := waitNoLocks(e, time.Second); len(left) > 0 {
			t.Fatalf("locks left while the pool is open: %v", left)
		}
	})
}

// 6. Holding many locks costs a few connections, not one each.
func TestManyLocksFewConnections(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(16)
		const n = 1000
		locks := make([]*pglocks.Lock, n)
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Go(func() {
				for i := g; i < n; i += 8 {
					lk, err := l.Lock(t.Context(), testKey(t, i))
					if err != nil {
						t.Error(err)
						return
					}
					locks[i] = lk
				}
			})
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		rows := e.locks()
		pids := map[int]bool{}
		for _, r := range rows {
			pids[r.pid] = true
		}
		if len(rows) != n {
			t.Errorf("pg_locks has %d locks, want %d", len(rows), n)
		}
		if len(pids) > 4 {
			t.Errorf("%d locks are held on %d server sessions, want at most 4", n, len(pids))
		}
		if b := e.backends(); b > 4 {
			t.Errorf("%d server sessions connected, want at most 4", b)
		}
		t.Logf("%d locks on %d sessions", len(rows), len(pids))
		for _, lk := range locks {
			mustRelease(t, lk)
		}
	})
}

// 8. Do and TryDo release after fn, also when fn panics.
func TestDoReleases(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l, other := e.locker(4), e.locker(4)
		key := testKey(t, 0)
		ran := false
		err := l.Do(t.Context(), key, func(ctx context.Context) error {
			ran = true
			if _, err := other.TryLock(ctx, key); !errors.Is(err, pglocks.ErrLocked) {
				t.Errorf("inside Do, another session's TryLock: %v", err)
			}
			return errors.New("fn failed")
		})
		if !ran || err == nil || err.Error() != "fn failed" {
			t.Fatalf("Do: ran=%v err=%v", ran, err)
		}
		if len(e.locks()) != 0 {
			t.Fatalf("held after Do: %v", e.locks())
		}

		func() {
			defer func() {
				if p := recover(); p != "boom" {
					t.Fatalf("recovered %v, want the panic to go on", p)
				}
			}()
			_ = l.TryDo(t.Context(), key, func(context.Context) error { panic("boom") })
		}()
		if len(e.locks()) != 0 {
			t.Fatalf("held after a panic in TryDo: %v", e.locks())
		}

		// TryDo does not run fn when the lock is held.
		lk := mustLock(t, other, key)
		err = l.TryDo(t.Context(), key, func(context.Context) error { t.Error("fn ran"); return nil })
		wantErr(t, err, pglocks.ErrLocked)
		mustRelease(t, lk)
	})
}

// 8. A lost lock cancels Do's fn with cause ErrLockLost, and Do reports it.
func TestDoSeesLoss(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		k0, k1 := testKey(t, 0), testKey(t, 1)
		lk0 := mustLock(t, l, k0)
		err := l.Do(t.Context(), k1, func(ctx context.Context) error {
			var ok bool
			if err := srv.Admin.QueryRow(ctx, "SELECT pg_terminate_backend($1)", e.held(bigint(k1))[0]).Scan(&ok); err != nil {
				return err
			}
			// The Locker learns of the loss with its next statement there.
			_ = lk0.Release(context.Background())
			<-ctx.Done()
			if !errors.Is(context.Cause(ctx), pglocks.ErrLockLost) {
				t.Errorf("fn's ctx cause: %v", context.Cause(ctx))
			}
			return ctx.Err()
		})
		wantErr(t, err, pglocks.ErrLockLost)
	})
}

// 8. Handle life cycle: Err, Done, Release twice, ctx bounding only the
// acquisition.
func TestLockHandle(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l, other := e.locker(4), e.locker(4)
		key := testKey(t, 0)
		ctx, cancel := context.WithCancel(t.Context())
		lk, err := l.Lock(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		cancel() // the held lock outlives the acquisition's ctx
		if lk.Err() != nil || lk.Key() != key {
			t.Fatalf("Err=%v Key=%v", lk.Err(), lk.Key())
		}
		select {
		case <-lk.Done():
			t.Fatal("Done closed while held")
		default:
		}
		_, err = other.TryLock(t.Context(), key)
		wantErr(t, err, pglocks.ErrLocked)

		mustRelease(t, lk)
		<-lk.Done()
		wantErr(t, lk.Err(), pglocks.ErrReleased)
		wantErr(t, lk.Release(context.Background()), pglocks.ErrReleased)
		if len(e.locks()) != 0 {
			t.Fatalf("held after Release: %v", e.locks())
		}
	})
}

// 8. Close releases everything, stops waiting Locks with ErrClosed, leaves
// the pool usable, and makes later calls fail with ErrClosed.
func TestClose(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		newLocker, closePool := e.drv.pool(t, e.dsn, 4)
		e.onClose(closePool)
		l, err := newLocker()
		if err != nil {
			t.Fatal(err)
		}
		other := e.locker(4)
		k0, k1 := testKey(t, 0), testKey(t, 1)
		held := []*pglocks.Lock{mustLock(t, l, k0), mustLock(t, l, k1, pglocks.Shared())}
		blocker := mustLock(t, other, testKey(t, 2))
		waitErr := make(chan error)
		go func() {
			_, err := l.Lock(context.Background(), testKey(t, 2))
			waitErr <- err
		}()
		local := make(chan error) // waits in this process, behind held[0]
		go func() {
			_, err := l.Lock(context.Background(), k0)
			local <- err
		}()
		waitFor(t, 10*time.Second, "the Locker to wait on the server", func() bool { return e.waiting(bigint(testKey(t, 2))) })

		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		wantErr(t, <-waitErr, pglocks.ErrClosed)
		wantErr(t, <-local, pglocks.ErrClosed)
		for _, lk := range held {
			<-lk.Done()
			wantErr(t, lk.Err(), pglocks.ErrClosed)
		}
		if e.waiting(bigint(testKey(t, 2))) || len(e.held(bigint(k0))) != 0 || len(e.held(bigint(k1))) != 0 {
			t.Fatalf("after Close pg_locks has %v", e.locks())
		}
		mustRelease(t, blocker)

		_, err = l.Lock(t.Context(), k0)
		wantErr(t, err, pglocks.ErrClosed)
		_, err = l.TryLock(t.Context(), k0)
		wantErr(t, err, pglocks.ErrClosed)
		wantErr(t, l.Do(t.Context(), k0, func(context.Context) error { return nil }), pglocks.ErrClosed)
		wantErr(t, held[0].Release(context.Background()), pglocks.ErrClosed)
		wantErr(t, l.Close(), pglocks.ErrClosed)

		// The pool is still the caller's, and works.
		l2, err := newLocker()
		if err != nil {
			t.Fatal(err)
		}
		lk := mustLock(t, l2, k0)
		mustRelease(t, lk)
		if err := l2.Close(); err != nil {
			t.Fatal(err)
		}
	})
}

// 10. Logging is silent by default and goes to the given logger, with
// nothing per acquisition and a loss at Warn; the
// application_name is the pool's unless WithApplicationName says otherwise.
func TestObservability(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		var buf pgtest.Buffer
		logger := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
		l := e.locker(2, pglocks.WithLogger(logger), pglocks.WithApplicationName("pglocks-test-holder"))
		plain := e.locker(2)
		k0, k1 := testKey(t, 0), testKey(t, 1)
		lk := mustLock(t, l, k0)
		pl := mustLock(t, plain, k1)
		if got := e.appName(e.held(bigint(k0))[0]); got != "pglocks-test-holder" {
			t.Errorf("holder application_name %q", got)
		}
		if got := e.appName(e.held(bigint(k1))[0]); got == "pglocks-test-holder" {
			t.Errorf("a Locker without the option changed application_name to %q", got)
		}
		mustRelease(t, lk)
		mustRelease(t, pl)
		// Nothing per acquisition, even at Debug.
		if buf.String() != "" {
			t.Errorf("acquisitions were logged: %q", buf.String())
		}
		// A loss is logged, at Warn.
		lk = mustLock(t, l, k0)
		var ok bool
		if err := srv.Admin.QueryRow(t.Context(), "SELECT pg_terminate_backend($1)", e.held(bigint(k0))[0]).Scan(&ok); err != nil || !ok {
			t.Fatalf("terminate: %v %v", ok, err)
		}
		select {
		case <-lk.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("the loss was not noticed")
		}
		wantErr(t, lk.Err(), pglocks.ErrLockLost)
		// Logged just after the handles are told.
		waitFor(t, 5*time.Second, "the loss to be logged at Warn", func() bool {
			out := buf.String()
			return strings.Contains(out, "level=WARN") && strings.Contains(out, "locks are lost")
		})
		// Back in the pool, the session has its own name again.
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		for _, name := range e.appNames() {
			if name == "pglocks-test-holder" {
				t.Errorf("a pooled session kept the Locker's application_name")
			}
		}
	})
}

// 11. Bad input: one clear error, nothing touched.
func TestBadInput(t *testing.T) {
	if _, err := pglocks.New(nil); err == nil {
		t.Error("New(nil) succeeded")
	}
	if _, err := pglocks.NewDB(nil); err == nil {
		t.Error("NewDB(nil) succeeded")
	}
	forEachDriver(t, func(t *testing.T, e *env) {
		newLocker, closePool := e.drv.pool(t, e.dsn, 2)
		e.onClose(closePool)
		// Options the server would refuse, or under which nothing works,
		// fail New with one error that says why.
		for name, tt := range map[string]struct {
			opt  pglocks.Option
			want string
		}{
			"nil logger":              {pglocks.WithLogger(nil), "nil logger"},
			"empty app name":          {pglocks.WithApplicationName(""), "empty name"},
			"app name with NUL":       {pglocks.WithApplicationName("a\x00b"), "NUL"},
			"app name not UTF-8":      {pglocks.WithApplicationName("a\xffb"), "UTF-8"},
			"app name too long":       {pglocks.WithApplicationName(strings.Repeat("x", 64)), "at most 63"},
			"zero timeout":            {pglocks.WithStatementTimeout(0), "WithStatementTimeout"},
			"negative timeout":        {pglocks.WithStatementTimeout(-time.Second), "WithStatementTimeout"},
			"1ns timeout":             {pglocks.WithStatementTimeout(time.Nanosecond), "100ms"},
			"timeout beyond server's": {pglocks.WithStatementTimeout(25 * 24 * time.Hour), "WithStatementTimeout"},
			"1ms heartbeat":           {pglocks.WithHeartbeat(time.Millisecond, time.Millisecond), "100ms"},
			"huge heartbeat":          {pglocks.WithHeartbeat(1<<62, time.Second), "WithHeartbeat"},
			"heartbeat past keepalive": {pglocks.WithHeartbeat(10*time.Second, time.Second),
				"shorter than the server keepalive bound"},
			"keepalive beyond server's": {pglocks.WithServerKeepalive(1e6*time.Hour, time.Second, 3), "whole seconds"},
			"keepalive not whole":       {pglocks.WithServerKeepalive(1500*time.Millisecond, time.Second, 3), "whole seconds"},
			"keepalive count too big":   {pglocks.WithServerKeepalive(time.Second, time.Second, 1<<40), "count 1099511627776"},
			"keepalive bound too long":  {pglocks.WithServerKeepalive(32767*time.Second, 32767*time.Second, 127), "tcp_user_timeout"},
			"max locks 0":               {pglocks.WithMaxLocks(0), "WithMaxLocks"},
			"nil option itself":         {nil, "nil Option"},
		} {
			l, err := newLocker(tt.opt)
			if err == nil {
				_ = l.Close()
				t.Errorf("%s: accepted", name)
				continue
			}
			if !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "(-") {
				t.Errorf("%s: error %q does not say %q", name, err, tt.want)
			}
		}
		if n := e.backends(); n != 0 {
			t.Errorf("bad options opened %d server sessions", n)
		}
		l := e.locker(2)
		done, cancel := context.WithCancel(t.Context())
		cancel()
		fn := func(context.Context) error { t.Error("fn ran"); return nil }
		for name, call := range map[string]func() error{
			"Lock zero key":    func() error { _, err := l.Lock(t.Context(), pglocks.Key{}); return err },
			"TryLock zero key": func() error { _, err := l.TryLock(t.Context(), pglocks.Key{}); return err },
			"Do zero key":      func() error { return l.Do(t.Context(), pglocks.Key{}, fn) },
			"TryDo zero key":   func() error { return l.TryDo(t.Context(), pglocks.Key{}, fn) },
		} {
			if err := call(); !errors.Is(err, pglocks.ErrInvalidKey) {
				t.Errorf("%s: %v", name, err)
			}
		}
		for name, call := range map[string]func() error{
			"Lock done ctx":    func() error { _, err := l.Lock(done, testKey(t, 0)); return err },
			"TryLock done ctx": func() error { _, err := l.TryLock(done, testKey(t, 0)); return err },
			"Do done ctx":      func() error { return l.Do(done, testKey(t, 0), fn) },
		} {
			if err := call(); !errors.Is(err, context.Canceled) {
				t.Errorf("%s: %v", name, err)
			}
		}
		if n := e.backends(); n != 0 {
			t.Errorf("bad input opened %d server sessions", n)
		}
		// The limits themselves are accepted, and work.
		edge := e.locker(2, pglocks.WithApplicationName(strings.Repeat("é", 31)+"x"),
			pglocks.WithStatementTimeout(100*time.Millisecond), pglocks.WithHeartbeat(100*time.Millisecond, 100*time.Millisecond),
			pglocks.WithServerKeepalive(32767*time.Second, time.Second, 127))
		lk := mustLock(t, edge, testKey(t, 9))
		time.Sleep(300 * time.Millisecond) // a few heartbeats
		if err := lk.Err(); err != nil {
			t.Errorf("a lock of a Locker with the smallest heartbeat: %v", err)
		}
		mustRelease(t, lk)
		_ = edge.Close()
	})
}

// A Lock whose try finds the holder session dead (say, after a server
// restart) retries on a fresh session; the locks on the dead one are
// reported lost.
func TestLockRecoversFromDeadSession(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		k0, k1 := testKey(t, 0), testKey(t, 1)
		lk0 := mustLock(t, l, k0)
		var ok bool
		if err := srv.Admin.QueryRow(t.Context(), "SELECT pg_terminate_backend($1)", e.held(bigint(k0))[0]).Scan(&ok); err != nil || !ok {
			t.Fatalf("terminate: %v %v", ok, err)
		}
		waitFor(t, 10*time.Second, "the backend to exit", func() bool { return len(e.held(bigint(k0))) == 0 })
		lk1, err := l.Lock(t.Context(), k1)
		if err != nil {
			t.Fatalf("Lock after the holder session died: %v", err)
		}
		<-lk0.Done()
		wantErr(t, lk0.Err(), pglocks.ErrLockLost)
		mustRelease(t, lk1)
	})
}

// Close stops a Lock that waits for a pooled connection, promptly.
func TestCloseWhileWaitingForConnection(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		newLocker, closePool := e.drv.pool(t, e.dsn, 1)
		e.onClose(closePool)
		l, err := newLocker()
		if err != nil {
			t.Fatal(err)
		}
		other := e.locker(2)
		k0, k1 := testKey(t, 0), testKey(t, 1)
		elsewhere := mustLock(t, other, k1)
		held := mustLock(t, l, k0) // takes the pool's only connection
		got := make(chan error)
		go func() {
			// k1 is held elsewhere, so this needs a second connection.
			_, err := l.Lock(context.Background(), k1)
			got <- err
		}()
		select {
		case err := <-got:
			t.Fatalf("Lock returned before Close: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		wantErr(t, <-got, pglocks.ErrClosed)
		wantErr(t, held.Err(), pglocks.ErrClosed)
		mustRelease(t, elsewhere)
	})
}

// Careless calls get an error and change nothing: a nil ctx or fn takes no
// lock and opens no session, Release(nil) releases, and after Close every
// method says ErrClosed. Nothing wedges Close.
func TestCarelessCalls(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		key := testKey(t, 0)
		fn := func(context.Context) error { t.Error("fn ran"); return nil }
		var nilCtx context.Context
		var nilFn func(context.Context) error
		for name, call := range map[string]func() error{
			"Lock nil ctx":       func() error { _, err := l.Lock(nilCtx, key); return err },
			"TryLock nil ctx":    func() error { _, err := l.TryLock(nilCtx, key); return err },
			"Do nil ctx":         func() error { return l.Do(nilCtx, key, fn) },
			"TryDo nil ctx":      func() error { return l.TryDo(nilCtx, key, fn) },
			"LockAll nil ctx":    func() error { _, err := l.LockAll(nilCtx, []pglocks.Key{key}); return err },
			"TryLockAll nil ctx": func() error { _, err := l.TryLockAll(nilCtx, []pglocks.Key{key}); return err },
			"DoAll nil ctx":      func() error { return l.DoAll(nilCtx, []pglocks.Key{key}, fn) },
			"Lead nil ctx":       func() error { return l.Lead(nilCtx, key, fn) },
			"Leader nil ctx":     func() error { _, err := l.Leader(nilCtx, key); return err },
			"DoTx nil ctx": func() error {
				return l.DoTx(nilCtx, key, func(context.Context, pgx.Tx) error { t.Error("fn ran"); return nil })
			},
			"DoSQLTx nil ctx": func() error {
				return l.DoSQLTx(nilCtx, key, func(context.Context, *sql.Tx) error { t.Error("fn ran"); return nil })
			},
			"LockTx nil ctx":    func() error { return e.drv.begin(t, e).lock(nilCtx, key, true) },
			"TryLockTx nil ctx": func() error { return e.drv.begin(t, e).lock(nilCtx, key, false) },
		} {
			if err := call(); err == nil || !strings.Contains(err.Error(), "nil Context") {
				t.Errorf("%s: %v", name, err)
			}
		}
		for name, call := range map[string]func() error{
			"Do nil fn":    func() error { return l.Do(t.Context(), key, nilFn) },
			"TryDo nil fn": func() error { return l.TryDo(t.Context(), key, nilFn) },
			"DoAll nil fn": func() error { return l.DoAll(t.Context(), []pglocks.Key{key}, nilFn) },
			"Lead nil fn":  func() error { return l.Lead(t.Context(), key, nilFn) },
			"DoTx nil fn":  func() error { return l.DoTx(t.Context(), key, nil) },
			"DoSQLTx nil fn": func() error {
				return l.DoSQLTx(t.Context(), key, nil)
			},
		} {
			if err := call(); err == nil || (!strings.Contains(err.Error(), "nil fn") && !strings.Contains(err.Error(), "needs a Locker made by")) {
				t.Errorf("%s: %v", name, err)
			}
		}
		if _, ok := <-l.Observe(nilCtx, key); ok {
			t.Error("Observe(nil) sent a value")
		}
		if locks := e.locks(); len(locks) != 0 {
			t.Errorf("careless calls left %v", locks)
		}

		// Release(nil) releases; so does LockSet.Release(nil).
		lk := mustLock(t, l, key)
		if err := lk.Release(nilCtx); err != nil {
			t.Errorf("Release(nil): %v", err)
		}
		set, err := l.LockAll(t.Context(), []pglocks.Key{key, testKey(t, 1)})
		if err != nil {
			t.Fatal(err)
		}
		if err := set.Release(nilCtx); err != nil {
			t.Errorf("LockSet.Release(nil): %v", err)
		}
		if locks := e.locks(); len(locks) != 0 {
			t.Errorf("held after Release(nil): %v", locks)
		}

		// After Close, ErrClosed everywhere, and Close itself returned.
		held := mustLock(t, l, key)
		closed := make(chan error)
		go func() { closed <- l.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				t.Errorf("Close: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("Close did not return")
		}
		wantErr(t, held.Err(), pglocks.ErrClosed)
		_, err = l.Leader(t.Context(), key)
		wantErr(t, err, pglocks.ErrClosed)
		if _, ok := <-l.Observe(t.Context(), key); ok {
			t.Error("Observe after Close sent a value")
		}
		wantErr(t, l.Lead(t.Context(), key, fn), pglocks.ErrClosed)
		_, err = l.Lock(t.Context(), key)
		wantErr(t, err, pglocks.ErrClosed)
		if locks := e.locks(); len(locks) != 0 {
			t.Errorf("held after Close: %v", locks)
		}
	})
}
