package pglocks_test

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
)

// 7. Transaction locks end with the transaction: commit, rollback, and
// rollback to a savepoint taken before them.
func TestTxLockEndsWithTransaction(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		other := e.locker(4)
		key := testKey(t, 0)
		ends := map[string]func(tx testTx) error{
			"commit":   func(tx testTx) error { return tx.commit() },
			"rollback": func(tx testTx) error { return tx.rollback() },
		}
		for name, end := range ends {
			tx := e.drv.begin(t, e)
			if err := tx.lock(ctx, key, true); err != nil {
				t.Fatal(err)
			}
			_, err := other.TryLock(ctx, key)
			wantErr(t, err, pglocks.ErrLocked)
			if err := end(tx); err != nil {
				t.Fatal(err)
			}
			lk, err := other.TryLock(ctx, key)
			if err != nil {
				t.Fatalf("after %s: %v", name, err)
			}
			mustRelease(t, lk)
		}

		tx := e.drv.begin(t, e)
		if err := tx.exec(ctx, "SAVEPOINT before"); err != nil {
			t.Fatal(err)
		}
		if err := tx.lock(ctx, key, false); err != nil {
			t.Fatal(err)
		}
		if err := tx.exec(ctx, "ROLLBACK TO SAVEPOINT before"); err != nil {
			t.Fatal(err)
		}
		lk, err := other.TryLock(ctx, key)
		if err != nil {
			t.Fatalf("after rollback to savepoint: %v", err)
		}
		mustRelease(t, lk)

		// Shared transaction locks coexist and exclude an exclusive one.
		if err := tx.lock(ctx, key, true, pglocks.Shared()); err != nil {
			t.Fatal(err)
		}
		tx2 := e.drv.begin(t, e)
		if err := tx2.lock(ctx, key, false, pglocks.Shared()); err != nil {
			t.Fatal(err)
		}
		_, err = other.TryLock(ctx, key)
		wantErr(t, err, pglocks.ErrLocked)
		wantErr(t, tx2.lock(ctx, pglocks.Pair(1, 2), false), nil)
		_ = tx.rollback()
		_ = tx2.rollback()
	})
}

// 7 and 3. A transaction-lock wait is bounded by ctx's deadline, enforced
// by the server, leaves the transaction usable with its own lock_timeout,
// and is granted from the server's queue when the holder lets go.
func TestTxLockWait(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		holder := e.locker(4)
		key := testKey(t, 0)
		lk := mustLock(t, holder, key)

		tx := e.drv.begin(t, e)
		if err := tx.exec(ctx, "SET LOCAL lock_timeout = '7s'"); err != nil {
			t.Fatal(err)
		}
		wantErr(t, tx.lock(ctx, key, false), pglocks.ErrLocked)
		dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		err := tx.lock(dctx, key, true)
		wantErr(t, err, context.DeadlineExceeded)
		var pgErr interface{ SQLState() string }
		if !errors.As(err, &pgErr) || pgErr.SQLState() != "55P03" {
			t.Errorf("want the server's lock_timeout error (55P03) inside %v", err)
		}
		if got, err := tx.queryString(ctx, "SHOW lock_timeout"); err != nil || got != "7s" {
			t.Fatalf("after a failed wait the transaction says lock_timeout=%q, %v", got, err)
		}
		if e.waiting(bigint(key)) {
			t.Fatal("the wait is still queued on the server")
		}

		// Now wait with a deadline that is not reached.
		got := make(chan error)
		go func() {
			dctx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			got <- tx.lock(dctx, key, true)
		}()
		waitFor(t, 10*time.Second, "the transaction to wait on the server", func() bool { return e.waiting(bigint(key)) })
		mustRelease(t, lk)
		if err := <-got; err != nil {
			t.Fatal(err)
		}
		if got, err := tx.queryString(ctx, "SHOW lock_timeout"); err != nil || got != "7s" {
			t.Fatalf("after a wait the transaction says lock_timeout=%q, %v", got, err)
		}
		_, err = holder.TryLock(ctx, key)
		wantErr(t, err, pglocks.ErrLocked)
		if err := tx.commit(); err != nil {
			t.Fatal(err)
		}
	})
}

// A cancelled transaction-lock wait stops on the server. pgx keeps the
// transaction usable (pglocks sends the cancel request itself); lib/pq sends
// one too but then drops the connection; pgx's stdlib driver closes the
// connection, and the server only notices when the wait ends.
func TestTxLockCancel(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		holder := e.locker(4)
		key := testKey(t, 0)
		lk := mustLock(t, holder, key)
		tx := e.drv.begin(t, e)
		cctx, cancel := context.WithCancel(ctx)
		got := make(chan error)
		go func() { got <- tx.lock(cctx, key, true) }()
		waitFor(t, 10*time.Second, "the transaction to wait on the server", func() bool { return e.waiting(bigint(key)) })
		cancel()
		wantErr(t, <-got, context.Canceled)
		if e.drv.name == "stdlib" {
			// The driver closes the connection and sends its cancel request
			// in the background.
			waitFor(t, 10*time.Second, "the server to drop the wait", func() bool { return !e.waiting(bigint(key)) })
		} else if e.waiting(bigint(key)) {
			t.Error("the cancelled wait is still queued on the server")
		}
		if e.drv.name == "pgxpool" {
			if _, err := tx.queryString(ctx, "SELECT 'usable'"); err != nil {
				t.Errorf("the transaction is not usable after a cancelled wait: %v", err)
			}
		}
		_ = tx.rollback()
		mustRelease(t, lk)
	})
}

// 7. DoTx commits after fn, and rolls back (holding the lock until then) on
// an error or a panic, which goes on.
func TestDoTx(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		l, other := e.locker(4), e.locker(4)
		key := testKey(t, 0)
		raw := e.rawConn(t)
		if _, err := raw.Exec(ctx, "CREATE TABLE done (x int)"); err != nil {
			t.Fatal(err)
		}
		doTx := func(fn func(ctx context.Context, exec func(string) error) error) error {
			if e.drv.name == "pgxpool" {
				return l.DoTx(ctx, key, func(ctx context.Context, tx pgx.Tx) error {
					return fn(ctx, func(q string) error { _, err := tx.Exec(ctx, q); return err })
				})
			}
			return l.DoSQLTx(ctx, key, func(ctx context.Context, tx *sql.Tx) error {
				return fn(ctx, func(q string) error { _, err := tx.ExecContext(ctx, q); return err })
			})
		}
		rows := func() (n int) {
			if err := raw.QueryRow(ctx, "SELECT count(*) FROM done").Scan(&n); err != nil {
				t.Fatal(err)
			}
			return n
		}

		err := doTx(func(ctx context.Context, exec func(string) error) error {
			if _, err := other.TryLock(ctx, key); !errors.Is(err, pglocks.ErrLocked) {
				t.Errorf("inside DoTx another session's TryLock: %v", err)
			}
			return exec("INSERT INTO done VALUES (1)")
		})
		if err != nil || rows() != 1 {
			t.Fatalf("DoTx: %v, %d rows", err, rows())
		}
		err = doTx(func(ctx context.Context, exec func(string) error) error {
			if err := exec("INSERT INTO done VALUES (2)"); err != nil {
				return err
			}
			return errors.New("fn failed")
		})
		if err == nil || err.Error() != "fn failed" || rows() != 1 {
			t.Fatalf("DoTx with a failing fn: %v, %d rows", err, rows())
		}
		func() {
			defer func() {
				if p := recover(); p != "boom" {
					t.Fatalf("recovered %v", p)
				}
			}()
			_ = doTx(func(ctx context.Context, exec func(string) error) error {
				_ = exec("INSERT INTO done VALUES (3)")
				panic("boom")
			})
		}()
		if rows() != 1 {
			t.Fatalf("a panicking DoTx committed: %d rows", rows())
		}
		lk, err := other.TryLock(ctx, key)
		if err != nil {
			t.Fatalf("lock still held after DoTx: %v", err)
		}
		mustRelease(t, lk)

		// The wrong kind of transaction for the Locker's pool.
		if e.drv.name == "pgxpool" {
			err = l.DoSQLTx(ctx, key, func(context.Context, *sql.Tx) error { t.Error("fn ran"); return nil })
		} else {
			err = l.DoTx(ctx, key, func(context.Context, pgx.Tx) error { t.Error("fn ran"); return nil })
		}
		if err == nil {
			t.Error("a Locker ran a transaction of the other driver family")
		}
	})
}

// 11. Bad input to the transaction functions: one error, nothing held.
func TestTxBadInput(t *testing.T) {
	ctx := t.Context()
	if err := pglocks.LockTx(ctx, nil, pglocks.ID(1)); err == nil {
		t.Error("LockTx(nil tx) succeeded")
	}
	if err := pglocks.TryLockSQLTx(ctx, nil, pglocks.ID(1)); err == nil {
		t.Error("TryLockSQLTx(nil tx) succeeded")
	}
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(2)
		tx := e.drv.begin(t, e)
		wantErr(t, tx.lock(ctx, pglocks.Key{}, true), pglocks.ErrInvalidKey)
		wantErr(t, tx.lock(ctx, pglocks.Key{}, false), pglocks.ErrInvalidKey)
		done, cancel := context.WithCancel(ctx)
		cancel()
		wantErr(t, tx.lock(done, testKey(t, 0), true), context.Canceled)
		if err := tx.commit(); err != nil {
			t.Fatal(err)
		}
		if err := tx.lock(ctx, testKey(t, 0), true); err == nil {
			t.Error("LockTx on a committed transaction succeeded")
		}
		fn := func(context.Context, pgx.Tx) error { t.Error("fn ran"); return nil }
		sfn := func(context.Context, *sql.Tx) error { t.Error("fn ran"); return nil }
		wantErr(t, l.DoTx(ctx, pglocks.Key{}, fn), pglocks.ErrInvalidKey)
		wantErr(t, l.DoSQLTx(ctx, pglocks.Key{}, sfn), pglocks.ErrInvalidKey)
		_ = l.Close()
		if e.drv.name == "pgxpool" {
			wantErr(t, l.DoTx(ctx, testKey(t, 0), fn), pglocks.ErrClosed)
		} else {
			wantErr(t, l.DoSQLTx(ctx, testKey(t, 0), sfn), pglocks.ErrClosed)
		}
		if locks := e.locks(); len(locks) != 0 {
			t.Errorf("bad input left %v", locks)
		}
	})
}
