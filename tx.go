package pglocks

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Transaction locks (pg_advisory_xact_lock) are held by a transaction and end
// with it: at commit, at rollback, or at a rollback to a savepoint taken before
// them. They cannot be released early.

// txGrace bounds how long a cancelled transaction-lock wait may take to stop
// on the server, and how long the client waits past ctx's deadline for the
// server's lock_timeout.
const txGrace = 10 * time.Second

// LockTx takes key as a transaction lock in tx, waiting as long as ctx allows.
// ctx's deadline is enforced by the server, and the error then matches
// context.DeadlineExceeded. A wait that fails is rolled back to a savepoint,
// so tx stays usable (unless the driver closed the connection because ctx was
// cancelled) and holds nothing more than before; the lock_timeout of tx is
// left as it was.
//
// Several goroutines must not use one pgx.Tx at once: the lock is the
// transaction's, not a goroutine's.
func LockTx(ctx context.Context, tx pgx.Tx, key Key, opts ...LockOption) error {
	if tx == nil {
		return lockError(key, errors.New("nil tx"))
	}
	return lockTx(ctx, pgxTx{tx}, key, lockOptions(opts), true)
}

// TryLockTx takes key as a transaction lock in tx if it can be had at once,
// and otherwise returns an error matching [ErrLocked], leaving tx as it was.
func TryLockTx(ctx context.Context, tx pgx.Tx, key Key, opts ...LockOption) error {
	if tx == nil {
		return lockError(key, errors.New("nil tx"))
	}
	return lockTx(ctx, pgxTx{tx}, key, lockOptions(opts), false)
}

// LockSQLTx is [LockTx] for a database/sql transaction. A deadline is
// enforced by the server and leaves the transaction usable, as in LockTx. A
// wait cancelled before its deadline is stopped by the driver, which ends the
// transaction's connection: lib/pq sends a cancel request and waits for it,
// so the server has stopped waiting when LockSQLTx returns; pgx's stdlib
// driver closes the connection and sends its cancel request in the
// background, so the server stops waiting shortly after. Prefer deadlines
// with database/sql.
func LockSQLTx(ctx context.Context, tx *sql.Tx, key Key, opts ...LockOption) error {
	if tx == nil {
		return lockError(key, errors.New("nil tx"))
	}
	return lockTx(ctx, sqlTx{tx}, key, lockOptions(opts), true)
}

// TryLockSQLTx is [TryLockTx] for a database/sql transaction.
func TryLockSQLTx(ctx context.Context, tx *sql.Tx, key Key, opts ...LockOption) error {
	if tx == nil {
		return lockError(key, errors.New("nil tx"))
	}
	return lockTx(ctx, sqlTx{tx}, key, lockOptions(opts), false)
}

// DoTx begins a transaction on the Locker's pool, takes key in it as
// [LockTx] does, runs fn, and commits. If taking the lock fails, fn returns
// an error or panics, or ctx ends, the transaction is rolled back (and the
// panic goes on). The lock is held until the commit or rollback has
// finished. DoTx needs a Locker made by [New]; use [Locker.DoSQLTx] with
// [NewDB].
func (l *Locker) DoTx(ctx context.Context, key Key, fn func(ctx context.Context, tx pgx.Tx) error, opts ...LockOption) (err error) {
	if err := l.txCheck(ctx, key, fn == nil, l.pgx != nil, "DoTx needs a Locker made by New; use DoSQLTx"); err != nil {
		return err
	}
	tx, err := l.pgx.Begin(ctx)
	if err != nil {
		return lockError(key, fmt.Errorf("begin: %w", err))
	}
	finished := false
	defer func() {
		if !finished {
			_ = tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	if err := LockTx(ctx, tx, key, opts...); err != nil {
		return err
	}
	if err := fn(ctx, tx); err != nil {
		return err
	}
	finished = true
	if err := tx.Commit(ctx); err != nil {
		return lockError(key, fmt.Errorf("commit: %w", err))
	}
	return nil
}

// DoSQLTx is [Locker.DoTx] for a Locker made by [NewDB].
func (l *Locker) DoSQLTx(ctx context.Context, key Key, fn func(ctx context.Context, tx *sql.Tx) error, opts ...LockOption) (err error) {
	if err := l.txCheck(ctx, key, fn == nil, l.db != nil, "DoSQLTx needs a Locker made by NewDB; use DoTx"); err != nil {
		return err
	}
	tx, err := l.db.BeginTx(ctx, nil)
	if err != nil {
		return lockError(key, fmt.Errorf("begin: %w", err))
	}
	finished := false
	defer func() {
		if !finished {
			_ = tx.Rollback()
		}
	}()
	if err := LockSQLTx(ctx, tx, key, opts...); err != nil {
		return err
	}
	if err := fn(ctx, tx); err != nil {
		return err
	}
	finished = true
	if err := tx.Commit(); err != nil {
		return lockError(key, fmt.Errorf("commit: %w", err))
	}
	return nil
}

// txCheck checks what DoTx and DoSQLTx can check before they begin.
func (l *Locker) txCheck(ctx context.Context, key Key, fnNil, driverOK bool, driverMsg string) error {
	switch {
	case ctx == nil:
		return lockError(key, errNilContext)
	case fnNil:
		return lockError(key, errNilFunc)
	case !key.valid():
		return lockError(key, ErrInvalidKey)
	case !driverOK:
		return lockError(key, errors.New(driverMsg))
	case ctx.Err() != nil:
		return lockError(key, ctxError(ctx))
	}
	if l.table.isClosed() {
		return lockError(key, ErrClosed)
	}
	return nil
}

// txConn is the part of a transaction that lockTx uses.
type txConn interface {
	query(ctx context.Context, q string, args []any, dest ...any) error
	exec(ctx context.Context, q string, args ...any) error
	// canceler returns a function that sends a cancel request, or nil.
	canceler() func(ctx context.Context) error
}

func lockTx(ctx context.Context, tx txConn, key Key, o lockConfig, wait bool) error {
	switch {
	case ctx == nil:
		return lockError(key, errNilContext)
	case !key.valid():
		return lockError(key, ErrInvalidKey)
	case o.err != nil:
		return lockError(key, o.err)
	case o.slots > 0 || o.minHold > 0:
		return lockError(key, errors.New("Slots and MinHold are for session locks: a transaction lock ends with its transaction"))
	case ctx.Err() != nil:
		return lockError(key, ctxError(ctx))
	}
	// A try never waits in the server's queue, and never jumps it either: it
	// fails while a conflicting request is queued.
	q, args := stmt(stmtXactTry, key, o.shared, false)
	var ok sql.NullBool
	var st string // the transaction's statement_timeout
	if err := tx.query(ctx, q, args, &ok, &st); err != nil {
		return lockError(key, classify(err))
	}
	if !ok.Valid {
		return lockError(key, ErrStandby)
	}
	if ok.Bool {
		return nil
	}
	if !wait {
		return lockError(key, ErrLocked)
	}
	if err := tx.exec(ctx, sqlSavepoint); err != nil {
		return lockError(key, err)
	}
	err := waitLock(ctx, waitSpec{
		stmt:   xactWait(key, o.shared, st),
		run:    func(ctx context.Context, q string, args []any) error { return tx.exec(ctx, q, args...) },
		cancel: tx.canceler(), grace: txGrace,
	})
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), txGrace)
	defer cancel()
	if err != nil {
		// Rolling back to the savepoint frees a lock granted as the wait was
		// cancelled, and makes the transaction usable again.
		if rerr := tx.exec(rctx, sqlRollbackSavepoint); rerr == nil {
			_ = tx.exec(rctx, sqlReleaseSavepoint)
		}
		return lockError(key, err) // classified by waitLock
	}
	if err := tx.exec(rctx, sqlReleaseSavepoint); err != nil {
		return lockError(key, err)
	}
	return nil
}

type pgxTx struct{ tx pgx.Tx }

func (t pgxTx) query(ctx context.Context, q string, args []any, dest ...any) error {
	return t.tx.QueryRow(ctx, q, args...).Scan(dest...)
}

func (t pgxTx) exec(ctx context.Context, q string, args ...any) error {
	_, err := t.tx.Exec(ctx, q, args...)
	return err
}

func (t pgxTx) canceler() func(ctx context.Context) error {
	c := t.tx.Conn()
	if c == nil {
		return nil
	}
	return c.PgConn().CancelRequest
}

type sqlTx struct{ tx *sql.Tx }

func (t sqlTx) query(ctx context.Context, q string, args []any, dest ...any) error {
	return t.tx.QueryRowContext(ctx, q, args...).Scan(dest...)
}

func (t sqlTx) exec(ctx context.Context, q string, args ...any) error {
	_, err := t.tx.ExecContext(ctx, q, args...)
	return err
}

func (sqlTx) canceler() func(ctx context.Context) error { return nil }
