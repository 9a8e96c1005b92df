package pglocks_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// roleDSN creates a login role whose sessions in e's database carry
// settings (ALTER ROLE … IN DATABASE … SET name = value, as a DBA would
// set them), and returns a connection string for e's database as that role.
// The role is dropped when t ends, after the pools made later are closed.
func (e *env) roleDSN(t *testing.T, suffix string, settings map[string]string) string {
	t.Helper()
	ctx := context.Background()
	role := pgx.Identifier{"r" + suffix + "_" + e.db}.Sanitize()
	db := pgx.Identifier{e.db}.Sanitize()
	if _, err := srv.Admin.Exec(ctx, "CREATE ROLE "+role+" LOGIN"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := srv.Admin.Exec(ctx, "DROP ROLE "+role); err != nil {
			t.Errorf("drop role: %v", err)
		}
	})
	for name, value := range settings {
		if _, err := srv.Admin.Exec(ctx, fmt.Sprintf("ALTER ROLE %s IN DATABASE %s SET %s = '%s'", role, db, name, value)); err != nil {
			t.Fatal(err)
		}
	}
	return strings.Replace(e.dsn, "postgres://postgres@", "postgres://"+strings.Trim(role, `"`)+"@", 1)
}

// hostileProfiles are settings that production roles carry, each of which
// broke a lock before pglocks overrode it on its sessions.
var hostileProfiles = []struct {
	name     string
	settings map[string]string
}{
	{"statement_timeout", map[string]string{"statement_timeout": "1s"}},
	{"lock_timeout", map[string]string{"lock_timeout": "500ms"}},
	{"idle_session_timeout", map[string]string{"idle_session_timeout": "900ms"}},
	{"all", map[string]string{
		"statement_timeout": "1s", "lock_timeout": "500ms", "idle_session_timeout": "900ms",
		"idle_in_transaction_session_timeout": "900ms",
	}},
}

// Every entry point, on a role carrying each hostile setting, waits as long
// as its ctx allows (with a deadline and without), holds what it got past
// the role's idle timeouts, reports a deadline as context.DeadlineExceeded,
// and leaves the caller's transaction with its own settings. Meanwhile a
// pg_locks poller never sees two holders of a key.
func TestHostileRoleSettings(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		var wg sync.WaitGroup
		for i, p := range hostileProfiles {
			dsn := e.roleDSN(t, fmt.Sprint(i), p.settings)
			wg.Go(func() { hostileProfile(t, e, p.name, p.settings, dsn, i) })
		}
		overlaps := pollExclusive(t, e)
		wg.Wait()
		if n := overlaps(); n > 0 {
			t.Errorf("pg_locks showed two holders of one key %d times", n)
		}
	})
}

// pollExclusive samples pg_locks in e's database until the returned func is
// called, and counts the samples in which a key had two exclusive holders.
func pollExclusive(t *testing.T, e *env) (stop func() int) {
	t.Helper()
	done := make(chan struct{})
	result := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-done:
				result <- n
				return
			case <-time.After(5 * time.Millisecond):
			}
			var twice int
			err := srv.Admin.QueryRow(context.Background(), `
				SELECT count(*) FROM (
					SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database
					WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock' AND d.datname = $1
					GROUP BY l.classid, l.objid, l.objsubid HAVING count(*) > 1) s`, e.db).Scan(&twice)
			if err == nil && twice > 0 {
				n++
			}
		}
	}()
	return func() int { close(done); return <-result }
}

const (
	hostileHold = 2500 * time.Millisecond // how long a key stays held elsewhere: past every role timeout
	hostileIdle = 2 * time.Second         // how long a lock, once had, is held idle
)

// hostileProfile runs every entry point twice against a role with settings:
// once for a key freed after hostileHold (ctx with a deadline, and without),
// once for a key that stays held past a short deadline.
func hostileProfile(t *testing.T, e *env, profile string, settings map[string]string, dsn string, n int) {
	ctx := t.Context()
	newLocker, closePool := e.drv.pool(t, dsn, 40)
	t.Cleanup(closePool)
	var logs pgtest.Buffer
	l, err := newLocker(pglocks.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	if err != nil {
		t.Error(err)
		return
	}
	t.Cleanup(func() { _ = l.Close() })

	// Transactions of the caller, on the same role, with a lock_timeout of
	// their own set inside the transaction.
	begin := func() testTx {
		tx := e.drv.beginOn(t, e, dsn)
		if err := tx.exec(ctx, "SET LOCAL lock_timeout = '200ms'"); err != nil {
			t.Error(err)
		}
		return tx
	}
	// checkTx reports whether a transaction from begin still has its own
	// settings.
	checkTx := func(query func(q string) (string, error)) error {
		want := map[string]string{"lock_timeout": "200ms", "statement_timeout": settings["statement_timeout"]}
		for name, w := range want {
			if w == "" {
				w = "0"
			}
			got, err := query("SHOW " + name)
			if err != nil {
				return err
			}
			if got != w {
				return fmt.Errorf("%s is %q in the caller's transaction after the wait, want %q", name, got, w)
			}
		}
		return nil
	}
	doTx := func(ctx context.Context, key pglocks.Key) error {
		check := func(query func(q string) (string, error)) error {
			if w := settings["statement_timeout"]; w != "" {
				if got, err := query("SHOW statement_timeout"); err != nil || got != w {
					return fmt.Errorf("DoTx's transaction has statement_timeout %q (%v), want the role's %q", got, err, w)
				}
			}
			return nil
		}
		if e.drv.name == "pgxpool" {
			return l.DoTx(ctx, key, func(ctx context.Context, tx pgx.Tx) error {
				return check(func(q string) (s string, err error) { err = tx.QueryRow(ctx, q).Scan(&s); return s, err })
			})
		}
		return l.DoSQLTx(ctx, key, func(ctx context.Context, tx *sql.Tx) error {
			return check(func(q string) (s string, err error) { err = tx.QueryRowContext(ctx, q).Scan(&s); return s, err })
		})
	}

	// hold keeps a session lock idle past the role's idle timeouts, then
	// checks that it was not lost.
	hold := func(done <-chan struct{}, errf func() error) error {
		select {
		case <-done:
			return fmt.Errorf("lost while held idle: %v", errf())
		case <-time.After(hostileIdle):
			return nil
		}
	}
	// other is a second key for LockAll and DoAll, free.
	other := func(key pglocks.Key, k int32) pglocks.Key {
		id, _ := key.Int64()
		return pglocks.Pair(int32(id>>32)+k, int32(id))
	}
	entries := []struct {
		name  string
		holds bool // holds the key idle for hostileIdle
		run   func(ctx context.Context, key pglocks.Key) error
	}{
		{"Lock", true, func(ctx context.Context, key pglocks.Key) error {
			lk, err := l.Lock(ctx, key)
			if err != nil {
				return err
			}
			defer lk.Release(ctx)
			return hold(lk.Done(), lk.Err)
		}},
		{"Do", true, func(ctx context.Context, key pglocks.Key) error {
			return l.Do(ctx, key, func(ctx context.Context) error { return hold(ctx.Done(), ctx.Err) })
		}},
		{"LockAll", true, func(ctx context.Context, key pglocks.Key) error {
			s, err := l.LockAll(ctx, []pglocks.Key{key, other(key, 1000)})
			if err != nil {
				return err
			}
			defer s.Release(ctx)
			return hold(s.Done(), s.Err)
		}},
		{"DoAll", true, func(ctx context.Context, key pglocks.Key) error {
			return l.DoAll(ctx, []pglocks.Key{key, other(key, 2000)}, func(ctx context.Context) error {
				return hold(ctx.Done(), ctx.Err)
			})
		}},
		{"DoTx", false, doTx},
		{"LockTx", false, func(ctx context.Context, key pglocks.Key) error {
			tx := begin()
			defer tx.rollback()
			if err := tx.lock(ctx, key, true); err != nil {
				return err
			}
			return checkTx(func(q string) (string, error) { return tx.queryString(ctx, q) })
		}},
		{"Lead", true, func(ctx context.Context, key pglocks.Key) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			elected := false
			var held error
			err := l.Lead(ctx, key, func(lctx context.Context) error {
				elected = true
				held = hold(lctx.Done(), func() error { return context.Cause(lctx) })
				cancel() // one term is enough
				return nil
			})
			if !elected {
				return err
			}
			return held
		}},
	}
	holder := e.rawConn(t)
	short := e.rawConn(t)
	rival := e.rawConn(t)
	var held []int64 // keys that entry points hold idle after hostileHold
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []string
	report := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		errs = append(errs, fmt.Sprintf(format, args...))
	}
	for i, ep := range entries {
		// Freed after hostileHold: with a 10 s deadline, and without one.
		for j, deadline := range []time.Duration{10 * time.Second, 0} {
			key := pglocks.ID(int64(n)<<32 | int64(i)<<8 | int64(j))
			if ep.holds {
				held = append(held, int64(n)<<32|int64(i)<<8|int64(j))
			}
			if _, err := holder.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(n)<<32|int64(i)<<8|int64(j)); err != nil {
				t.Fatal(err)
			}
			wg.Go(func() {
				cctx := ctx
				if deadline > 0 {
					var cancel context.CancelFunc
					cctx, cancel = context.WithTimeout(ctx, deadline)
					defer cancel()
				}
				// Success alone proves the wait outlasted the role's
				// timeouts: the key was freed only after hostileHold.
				began := time.Now()
				if err := ep.run(cctx, key); err != nil {
					report("%s (deadline %v): %v after %v", ep.name, deadline, err, time.Since(began).Round(time.Millisecond))
				}
			})
		}
		// Held past a 1.5 s deadline: the error is the deadline's.
		key := pglocks.ID(int64(n)<<32 | int64(i)<<8 | 9)
		if _, err := short.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(n)<<32|int64(i)<<8|9); err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
			defer cancel()
			err := ep.run(cctx, key)
			if ep.name == "Lead" {
				// Lead returns ctx's error when its ctx ends unelected.
				if !errors.Is(err, context.DeadlineExceeded) {
					report("Lead past its deadline: %v", err)
				}
				return
			}
			if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, pglocks.ErrServerTimeout) {
				report("%s past its deadline: got %v, want context.DeadlineExceeded", ep.name, err)
			}
		})
	}
	time.Sleep(hostileHold)
	if _, err := holder.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	// While the entry points hold their keys idle, another session keeps
	// trying them: it must never get one (the server ended a holder's
	// session, say, and freed its lock).
	time.Sleep(300 * time.Millisecond)
	for end := time.Now().Add(hostileIdle - 600*time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		for _, k := range held {
			var got bool
			if err := rival.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", k).Scan(&got); err != nil {
				t.Fatal(err)
			}
			if got {
				report("another session got key %d while it was held", k)
				if _, err := rival.Exec(ctx, "SELECT pg_advisory_unlock($1)", k); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	wg.Wait()
	if _, err := short.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	for _, msg := range errs {
		t.Errorf("%s: %s", profile, msg)
	}
	if s := logs.String(); strings.Contains(s, "WARN") {
		t.Errorf("%s: the Locker warned:\n%s", profile, s)
	}
}

// A wait that the server ends on its own (here another session cancels it
// with pg_cancel_backend, as a DBA would) is reported as ErrServerTimeout,
// naming why, and leaves nothing queued or held; a transaction lock's
// transaction stays usable.
func TestWaitEndedByServer(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		l := e.locker(4)
		key := testKey(t, 0)
		holder := e.rawConn(t)
		if _, err := holder.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(key)); err != nil {
			t.Fatal(err)
		}
		cancelWaiter := func() {
			t.Helper()
			var pid int
			waitFor(t, 10*time.Second, "the wait", func() bool {
				for _, r := range e.locks() {
					if r.key == bigint(key) && !r.granted {
						pid = r.pid
						return true
					}
				}
				return false
			})
			if _, err := srv.Admin.Exec(ctx, "SELECT pg_cancel_backend($1)", pid); err != nil {
				t.Fatal(err)
			}
		}
		check := func(what string, err error) {
			t.Helper()
			if !errors.Is(err, pglocks.ErrServerTimeout) || errors.Is(err, context.DeadlineExceeded) ||
				!strings.Contains(err.Error(), "pg_cancel_backend") {
				t.Errorf("%s: got %v, want ErrServerTimeout naming pg_cancel_backend", what, err)
			}
		}
		for _, deadline := range []time.Duration{0, time.Minute} {
			cctx, cancel := ctx, context.CancelFunc(func() {})
			if deadline > 0 {
				cctx, cancel = context.WithTimeout(ctx, deadline)
			}
			res := make(chan error, 1)
			go func() {
				lk, err := l.Lock(cctx, key)
				if err == nil {
					_ = lk.Release(ctx)
				}
				res <- err
			}()
			cancelWaiter()
			check(fmt.Sprintf("Lock (deadline %v)", deadline), <-res)

			tx := e.drv.begin(t, e)
			go func() { res <- tx.lock(cctx, key, true) }()
			cancelWaiter()
			check(fmt.Sprintf("LockTx (deadline %v)", deadline), <-res)
			if _, err := tx.queryString(ctx, "SELECT 'usable'"); err != nil {
				t.Errorf("the transaction after a wait the server ended: %v", err)
			}
			_ = tx.rollback()
			cancel()
		}
		if _, err := holder.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
			t.Fatal(err)
		}
		if locks := e.locks(); len(locks) != 0 {
			t.Errorf("left behind: %v", locks)
		}
	})
}
