package pglocks_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// 6. Through PgBouncer in transaction pooling, the Locker pins each session it
// uses with a transaction of its own: session locks exclude other clients
// of the pooler and direct sessions, idle pinned sessions hold back no
// VACUUM, and none of the Locker's settings reach the pooler's other
// clients. Transaction locks work through it, and session pooling works.
func TestPgBouncer(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{})
	direct, err := pgx.Connect(t.Context(), fs.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(context.Background())
	// tryDirect reports whether a session straight to the server could take
	// ID(n), and lets it go again.
	tryDirect := func(t *testing.T, n int64) bool {
		t.Helper()
		var ok bool
		if err := direct.QueryRow(t.Context(), "SELECT pg_try_advisory_lock($1)", n).Scan(&ok); err != nil {
			t.Fatal(err)
		}
		if ok {
			if _, err := direct.Exec(t.Context(), "SELECT pg_advisory_unlock($1)", n); err != nil {
				t.Fatal(err)
			}
		}
		return ok
	}

	t.Run("transaction pooling", func(t *testing.T) {
		b, err := fs.StartPgBouncer("transaction")
		if err != nil {
			t.Fatal(err)
		}
		defer b.Stop()
		type via struct {
			name string
			d    driver
			url  string
		}
		var vias []via
		for _, d := range drivers {
			vias = append(vias, via{d.name, d, bouncerURL(b, d)})
			if d.name != "libpq" {
				// The query modes of pgx that work through PgBouncer 1.18's
				// transaction pooling (no prepared statements).
				for _, mode := range []string{"exec", "cache_describe"} {
					vias = append(vias, via{d.name + "/" + mode, d, strings.Replace(b.URL, "=simple_protocol", "="+mode, 1)})
				}
			}
		}
		for _, v := range vias {
			d := v.d
			t.Run(v.name, func(t *testing.T) {
				// The role carries the settings that would end a pinned
				// transaction or a wait; the Locker overrides them for its
				// own transactions only.
				l := lockerOn(t, d, v.url, pglocks.WithMaxConns(3))
				lk := mustLock(t, l, pglocks.ID(1))
				if tryDirect(t, 1) {
					t.Fatal("a session lock through transaction pooling excluded nothing")
				}
				// Another client of the same PgBouncer: kept out, and sees none
				// of the Locker's settings.
				other, err := pgx.Connect(t.Context(), b.URL)
				if err != nil {
					t.Fatal(err)
				}
				defer other.Close(context.Background())
				var got bool
				var lt, st, idle string
				if err := other.QueryRow(t.Context(), "SELECT pg_try_advisory_lock(1), current_setting('lock_timeout'), "+
					"current_setting('statement_timeout'), current_setting('idle_in_transaction_session_timeout')").Scan(&got, &lt, &st, &idle); err != nil {
					t.Fatal(err)
				}
				if got {
					t.Fatal("another client of the pooler took the key the Locker holds")
				}
				// A contended wait and a try on the pinned sessions.
				lk2 := mustLock(t, l, pglocks.ID(2))
				mustRelease(t, lk2)
				done := make(chan error, 1)
				go func() {
					lk3, err := l.Lock(t.Context(), pglocks.ID(1), pglocks.Shared())
					if err == nil {
						err = lk3.Release(t.Context())
					}
					done <- err
				}()
				mustRelease(t, lk)
				if err := <-done; err != nil {
					t.Fatal(err)
				}
				// Idle pinned sessions hold back no VACUUM and have no xid.
				var pinned, held int
				if err := fs.Admin.QueryRow(t.Context(), `SELECT count(*), count(*) FILTER (WHERE backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
					FROM pg_stat_activity WHERE state = 'idle in transaction'`).Scan(&pinned, &held); err != nil {
					t.Fatal(err)
				}
				if pinned == 0 || held != 0 {
					rows, _ := fs.Admin.Query(t.Context(), "SELECT pid, backend_xmin::text, backend_xid::text, query FROM pg_stat_activity WHERE state = 'idle in transaction'")
					for rows.Next() {
						var pid int
						var xmin, xid *string
						var q string
						_ = rows.Scan(&pid, &xmin, &xid, &q)
						t.Logf("pid %d xmin %v xid %v %q", pid, xmin, xid, q)
					}
					rows.Close()
					t.Fatalf("%d sessions idle in transaction, %d of them with backend_xmin or backend_xid", pinned, held)
				}
				if err := l.Close(); err != nil {
					t.Fatal(err)
				}
				if !tryDirect(t, 1) || !tryDirect(t, 2) {
					t.Error("held after Close")
				}
				if locks := serverLocks(t, fs); len(locks) != 0 {
					t.Fatalf("locks left on the server: %v", locks)
				}
				// Given back: the pooler's server sessions carry none of the
				// Locker's settings into other clients' transactions.
				for range 5 {
					var lt2, st2, idle2, app string
					if err := other.QueryRow(t.Context(), "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), "+
						"current_setting('idle_in_transaction_session_timeout'), current_setting('application_name')").Scan(&lt2, &st2, &idle2, &app); err != nil {
						t.Fatal(err)
					}
					if lt2 != lt || st2 != st || idle2 != idle || strings.Contains(app, " @") {
						t.Fatalf("a setting of the Locker's reached another client: %s %s %s %q (was %s %s %s)", lt2, st2, idle2, app, lt, st, idle)
					}
				}
			})
		}
		// Transaction locks work through transaction pooling.
		c, err := pgx.Connect(t.Context(), b.URL)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(context.Background())
		err = pgx.BeginFunc(t.Context(), c, func(tx pgx.Tx) error {
			if err := pglocks.LockTx(t.Context(), tx, pglocks.ID(2)); err != nil {
				return err
			}
			if tryDirect(t, 2) {
				t.Error("a transaction lock through PgBouncer excluded nothing")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !tryDirect(t, 2) {
			t.Error("the transaction lock outlived its transaction")
		}
	})

	t.Run("statement pooling", func(t *testing.T) {
		b, err := fs.StartPgBouncer("statement")
		if err != nil {
			t.Fatal(err)
		}
		defer b.Stop()
		for _, d := range drivers {
			t.Run(d.name, func(t *testing.T) {
				l := lockerOn(t, d, bouncerURL(b, d))
				_, err := l.Lock(t.Context(), pglocks.ID(4))
				wantErr(t, err, pglocks.ErrTransactionPooling)
				if locks := serverLocks(t, fs); len(locks) != 0 {
					t.Fatalf("locks left on the server: %v", locks)
				}
			})
		}
	})

	t.Run("session pooling", func(t *testing.T) {
		b, err := fs.StartPgBouncer("session")
		if err != nil {
			t.Fatal(err)
		}
		defer b.Stop()
		for _, d := range drivers {
			t.Run(d.name, func(t *testing.T) {
				l := lockerOn(t, d, bouncerURL(b, d))
				lk := mustLock(t, l, pglocks.ID(3))
				if tryDirect(t, 3) {
					t.Error("a session lock through session pooling excluded nothing")
				}
				mustRelease(t, lk)
				if !tryDirect(t, 3) {
					t.Error("released, yet still held")
				}
			})
		}
	})
}

// bouncerURL is b's URL for driver d: lib/pq would send pgx's parameter to
// PgBouncer as a startup parameter, which PgBouncer refuses.
func bouncerURL(b *pgtest.PgBouncer, d driver) string {
	if d.name == "libpq" {
		return strings.Replace(b.URL, "&default_query_exec_mode=simple_protocol", "", 1)
	}
	return b.URL
}

// A statement that fails inside a pinned transaction aborts it; the Locker
// recovers inside it (savepoints) or closes the session, so that the
// pooler never hands a server session with the Locker's locks to another
// client: a wait's deadline, a cancelled wait, a deadlock and a full lock
// table, each through PgBouncer in transaction pooling, leave the Locker's
// other locks held, nothing else held, and no aborted transaction behind.
func TestPgBouncerFailures(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{Settings: []string{"max_locks_per_transaction=10", "max_connections=40"}})
	b, err := fs.StartPgBouncer("transaction")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	direct, err := pgx.Connect(t.Context(), fs.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(context.Background())
	directPID := int(direct.PgConn().PID())
	exec := func(t *testing.T, q string, args ...any) {
		t.Helper()
		if _, err := direct.Exec(t.Context(), q, args...); err != nil {
			t.Fatal(err)
		}
	}
	// clean checks that no backend is left in an aborted transaction and
	// that the Locker's lock k0 is still held, by one backend.
	clean := func(t *testing.T, lk0 *pglocks.Lock) {
		t.Helper()
		var aborted int
		if err := fs.Admin.QueryRow(t.Context(),
			"SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction (aborted)'").Scan(&aborted); err != nil {
			t.Fatal(err)
		}
		if aborted != 0 {
			t.Fatalf("%d backends idle in an aborted transaction", aborted)
		}
		if lk0.Err() != nil || heldOn(t, fs, lk0.Key()) == 0 {
			t.Fatalf("the Locker's other lock: %v, held by pid %d", lk0.Err(), heldOn(t, fs, lk0.Key()))
		}
	}
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) {
			l := lockerOn(t, d, bouncerURL(b, d), pglocks.WithMaxConns(3))
			k0, k1, k2 := testKey(t, 0), testKey(t, 1), testKey(t, 2)
			lk0 := mustLock(t, l, k0)

			// A wait that its deadline ends (the server's lock_timeout).
			exec(t, "SELECT pg_advisory_lock($1)", k1.String())
			ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
			_, err := l.Lock(ctx, k1)
			cancel()
			wantErr(t, err, context.DeadlineExceeded)
			clean(t, lk0)

			// A wait that is cancelled (a cancel request through PgBouncer).
			ctx, cancel = context.WithCancel(t.Context())
			time.AfterFunc(200*time.Millisecond, cancel)
			_, err = l.Lock(ctx, k1)
			wantErr(t, err, context.Canceled)
			clean(t, lk0)
			if pid := heldOn(t, fs, k1); pid != directPID || waitedOn(t, fs, k1) {
				t.Fatalf("after the failed waits k1 is held by pid %d (the direct session is %d), waited for: %v", pid, directPID, waitedOn(t, fs, k1))
			}

			// A deadlock: the Locker waits for k1 then k2 on one session
			// while the direct session holds k1 and waits for k2.
			exec(t, "SELECT pg_advisory_unlock($1)", k1.String())
			exec(t, "SELECT pg_advisory_lock($1)", k2.String())
			res := make(chan error, 1)
			go func() {
				set, err := l.LockAll(t.Context(), []pglocks.Key{k1, k2})
				if err == nil {
					err = set.Release(t.Context())
				}
				res <- err
			}()
			waitFor(t, 10*time.Second, "the Locker to wait for k2", func() bool { return heldOn(t, fs, k1) != 0 && waitedOn(t, fs, k2) })
			_, derr := direct.Exec(t.Context(), "SELECT pg_advisory_lock($1)", k1.String())
			exec(t, "SELECT pg_advisory_unlock_all()")
			if err := <-res; derr == nil && !errors.Is(err, pglocks.ErrDeadlock) {
				t.Fatalf("neither wait saw the deadlock: the Locker's %v", err)
			} else if derr != nil && err != nil {
				t.Fatalf("the direct session lost the deadlock (%v), yet the Locker failed: %v", derr, err)
			}
			clean(t, lk0)

			// The lock table fills up while the Locker tries on its pinned
			// primary, where it holds k0.
			filler, err := pgx.Connect(t.Context(), fs.URL)
			if err != nil {
				t.Fatal(err)
			}
			defer filler.Close(context.Background())
			_, err = filler.Exec(t.Context(), "SELECT count(pg_advisory_lock(g)) FROM generate_series(1000, 1000000) g")
			if sqlState(err) != "53200" {
				t.Fatalf("filling the lock table: %v", err)
			}
			_, err = l.TryLock(t.Context(), k1)
			wantErr(t, err, pglocks.ErrLockTableFull)
			if _, err := filler.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
				t.Fatal(err)
			}
			clean(t, lk0)
			mustRelease(t, mustLock(t, l, k1))
			mustRelease(t, lk0)
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			if locks := serverLocks(t, fs); len(locks) != 0 {
				t.Fatalf("locks left on the server: %v", locks)
			}
		})
	}
}

func init() { helpers["hold"] = holdHelper }

// holdHelper takes PGLOCKS_HELPER_KEY through PGLOCKS_HELPER_DSN, says
// "held" and waits to be killed.
func holdHelper() error {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("PGLOCKS_HELPER_DSN"))
	if err != nil {
		return err
	}
	l, err := pglocks.New(pool)
	if err != nil {
		return err
	}
	if _, err := l.Lock(ctx, pglocks.Name(os.Getenv("PGLOCKS_HELPER_KEY"))); err != nil {
		return err
	}
	fmt.Println("held")
	select {}
}

// Through PgBouncer in transaction pooling, every guarantee holds when
// things break: a holder process killed with SIGKILL frees its lock for a
// waiter in another process within a second; a terminated server session,
// PgBouncer's admin KILL and a PgBouncer restart are each reported as a
// loss, and the lock is free; a waiter cancelled leaves nothing queued.
func TestPgBouncerFaults(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{})
	b, err := fs.StartPgBouncer("transaction")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop()

	t.Run("holder killed", func(t *testing.T) {
		key := testKey(t, 0)
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "PGLOCKS_HELPER=hold", "PGLOCKS_HELPER_DSN="+b.URL, "PGLOCKS_HELPER_KEY="+t.Name()+"#0")
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
		line, err := bufio.NewReader(out).ReadString('\n')
		if err != nil || line != "held\n" {
			t.Fatalf("the holder process: %q %v", line, err)
		}
		l := lockerOn(t, drivers[0], b.URL)
		got := make(chan time.Time, 1)
		go func() {
			if lk, err := l.Lock(t.Context(), key); err == nil {
				got <- time.Now()
				_ = lk.Release(t.Context())
			}
			close(got)
		}()
		waitFor(t, 10*time.Second, "the waiter to queue", func() bool { return waitedOn(t, fs, key) })
		killed := time.Now()
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		select {
		case at, ok := <-got:
			if !ok {
				t.Fatal("the waiter failed")
			}
			t.Logf("the waiter got the lock %v after the holder was killed", at.Sub(killed).Round(time.Millisecond))
			if d := at.Sub(killed); d > time.Second {
				t.Fatalf("the killed holder's lock was freed after %v", d)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the waiter did not get the killed holder's lock")
		}
	})

	// loses runs fault against a Locker of each driver that holds a key
	// through PgBouncer, and checks that the loss is told and the key freed.
	loses := func(t *testing.T, fault func(t *testing.T, pid int)) {
		for _, d := range drivers {
			t.Run(d.name, func(t *testing.T) {
				key := testKey(t, 0)
				l := lockerOn(t, d, bouncerURL(b, d), pglocks.WithHeartbeat(200*time.Millisecond, time.Second))
				lk := mustLock(t, l, key)
				pid := heldOn(t, fs, key)
				if pid == 0 {
					t.Fatal("not held on the server")
				}
				began := time.Now()
				fault(t, pid)
				select {
				case <-lk.Done():
					t.Logf("loss told after %v: %v", time.Since(began).Round(time.Millisecond), lk.Err())
				case <-time.After(10 * time.Second):
					t.Fatal("the loss was not told")
				}
				wantErr(t, lk.Err(), pglocks.ErrLockLost)
				waitFor(t, 10*time.Second, "the lost key to be free", func() bool { return heldOn(t, fs, key) == 0 })
				// The Locker goes on through the pooler.
				waitFor(t, 10*time.Second, "a new lock", func() bool {
					lk, err := l.TryLock(t.Context(), key)
					if err == nil {
						mustRelease(t, lk)
					}
					return err == nil
				})
			})
		}
	}
	t.Run("server session terminated", func(t *testing.T) {
		loses(t, func(t *testing.T, pid int) {
			if _, err := fs.Admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", pid); err != nil {
				t.Fatal(err)
			}
		})
	})
	t.Run("admin KILL", func(t *testing.T) {
		loses(t, func(t *testing.T, pid int) {
			admin, err := pgx.Connect(t.Context(), b.AdminURL)
			if err != nil {
				t.Fatal(err)
			}
			defer admin.Close(context.Background())
			if _, err := admin.Exec(t.Context(), "KILL postgres"); err != nil {
				t.Fatal(err)
			}
			if _, err := admin.Exec(t.Context(), "RESUME postgres"); err != nil {
				t.Fatal(err)
			}
		})
	})
	t.Run("PgBouncer restarted", func(t *testing.T) {
		loses(t, func(t *testing.T, pid int) {
			if err := b.Restart(); err != nil {
				t.Fatal(err)
			}
		})
	})
}

// Every API works through transaction pooling: elections (Lead, Leader,
// Observe), slots, minimum holds, fencing tokens (read elsewhere: the pinned
// transaction gets no xid) and multiplexed waits (woken by the poller, no
// notifications through the pooler).
func TestPgBouncerAPIs(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{})
	b, err := fs.StartPgBouncer("transaction")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) {
			url := bouncerURL(b, d)
			l1 := lockerOn(t, d, url, pglocks.WithFencingTokens())
			l2 := lockerOn(t, d, url, pglocks.WithFencingTokens(), pglocks.WithMaxConns(2))

			// Fencing tokens rise from one holder to the next.
			k := testKey(t, 0)
			lk := mustLock(t, l1, k)
			t1 := lk.Token()
			var xids int
			if err := fs.Admin.QueryRow(t.Context(), "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()").Scan(&xids); err != nil {
				t.Fatal(err)
			}
			if xids != 0 {
				t.Fatalf("%d sessions with a transaction id while the Locker holds a fenced lock", xids)
			}
			mustRelease(t, lk)
			lk = mustLock(t, l2, k)
			if t2 := lk.Token(); t1 == 0 || t2 <= t1 {
				t.Fatalf("tokens %d then %d", t1, t2)
			}
			// Multiplexed waits: 10 goroutines of l2 (2 sessions) wait for a
			// key l1 holds, and all get it once l1 lets go.
			mustRelease(t, lk)
			var keys []pglocks.Key
			for i := range 10 {
				keys = append(keys, testKey(t, 100+i))
			}
			held, err := l1.LockAll(t.Context(), keys)
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			errs := make(chan error, len(keys))
			for _, k := range keys {
				wg.Go(func() {
					lk, err := l2.Lock(t.Context(), k)
					if err == nil {
						err = lk.Release(t.Context())
					}
					errs <- err
				})
			}
			waitFor(t, 10*time.Second, "the waits", func() bool { _, mx := pglocks.WaitsForTest(l2); return mx >= len(keys)-1 })
			if err := held.Release(t.Context()); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}

			// Slots: two of three.
			ks := testKey(t, 2)
			s1 := mustLock(t, l1, ks, pglocks.Slots(2))
			s2 := mustLock(t, l2, ks, pglocks.Slots(2))
			_, err = l1.TryLock(t.Context(), ks, pglocks.Slots(2))
			wantErr(t, err, pglocks.ErrLocked)
			mustRelease(t, s1)
			mustRelease(t, s2)

			// A minimum hold outlives its Release.
			km := testKey(t, 3)
			mustRelease(t, mustLock(t, l1, km, pglocks.MinHold(300*time.Millisecond)))
			if _, err := l2.TryLock(t.Context(), km); !errors.Is(err, pglocks.ErrLocked) {
				t.Fatalf("a minimum hold did not last: %v", err)
			}

			// Elections: one of two leads, and Observe and Leader see it
			// (with the election-time mark of a pinned session's application_name).
			ke := testKey(t, 4)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			led := make(chan string, 4)
			for i, l := range []*pglocks.Locker{l1, l2} {
				go func() {
					_ = l.Lead(ctx, ke, func(ctx context.Context) error {
						led <- fmt.Sprint("l", i+1)
						<-ctx.Done()
						return nil
					})
				}()
			}
			first := <-led
			obs := l1.Observe(ctx, ke)
			if h := <-obs; h.PID == 0 || h.Since.IsZero() {
				t.Fatalf("Observe saw leader %+v", h)
			}
			if h, err := l2.Leader(t.Context(), ke); err != nil || h.PID == 0 {
				t.Fatalf("Leader: %+v %v", h, err)
			}
			t.Logf("%s led first", first)
			cancel()
		})
	}
}

// The pool's size bounds what the Locker pins (WithMaxConns), and the
// application's own queries through the same pool and pooler keep flowing
// while hundreds of goroutines wait.
func TestPgBouncerAppFlows(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{})
	b, err := fs.StartPgBouncer("transaction")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	cfg, err := pgxpool.ParseConfig(b.URL)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 4
	pool, err := pgxpool.NewWithConfig(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	l, err := pglocks.New(pool, pglocks.WithMaxConns(2))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	direct, err := pgx.Connect(t.Context(), fs.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(context.Background())
	const n = 200
	if _, err := direct.Exec(t.Context(), "SELECT pg_advisory_lock(g) FROM generate_series(1, $1) g", n); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			lk, err := l.Lock(t.Context(), pglocks.ID(int64(i+1)))
			if err == nil {
				err = lk.Release(t.Context())
			}
			errs <- err
		})
	}
	waitFor(t, 10*time.Second, "the waits", func() bool { s, m := pglocks.WaitsForTest(l); return s+m == n })
	for i := range 50 {
		began := time.Now()
		var one int
		if err := pool.QueryRow(t.Context(), "SELECT 1").Scan(&one); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(began); d > time.Second {
			t.Fatalf("the application's query %d took %v while %d goroutines waited", i, d, n)
		}
	}
	if got := l.Stat().Sessions(); got > 2 {
		t.Fatalf("the Locker pins %d sessions, more than WithMaxConns", got)
	}
	if _, err := direct.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

// A pooler that ends idle transactions (PgBouncer's
// idle_transaction_timeout) never fires on a session that holds locks: the
// heartbeat runs a statement on it every interval. A hold longer than the
// timeout stays held, and excludes another client all along.
func TestPgBouncerIdleTransactionTimeout(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{})
	b, err := fs.StartPgBouncer("transaction", "idle_transaction_timeout = 2")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Stop) // after the parallel subtests
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) {
			t.Parallel()
			key := testKey(t, 0)
			l := lockerOn(t, d, bouncerURL(b, d), pglocks.WithHeartbeat(500*time.Millisecond, time.Second))
			lk := mustLock(t, l, key)
			for end := time.Now().Add(4 * time.Second); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
				if lk.Err() != nil || heldOn(t, fs, key) == 0 {
					t.Fatalf("the hold ended under idle_transaction_timeout: %v", lk.Err())
				}
			}
			mustRelease(t, lk)
		})
	}
}
