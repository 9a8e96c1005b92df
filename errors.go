package pglocks

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
)

// ErrLocked is returned by the Try functions when another session, or another
// goroutine of the same [Locker], holds the lock in a conflicting mode, or
// when another goroutine of the same Locker is taking or releasing it at that
// moment.
var ErrLocked = errors.New("held by another session")

// ErrReleased is returned by [Lock.Release] for a lock that was already
// released, and by [Lock.Err] once [Lock.Release] has released it.
var ErrReleased = errors.New("lock already released")

// ErrClosed is returned by every method of a [Locker] after [Locker.Close], by
// a [Locker.Lock] that was still waiting when Close was called, and by
// [Lock.Err] for the locks that Close released.
var ErrClosed = errors.New("locker closed")

// ErrInvalidKey is returned for the zero [Key], which names no lock.
var ErrInvalidKey = errors.New("invalid key (the zero Key)")

// ErrLockLost is reported by [Lock.Err] (and so by [Locker.Do]) when the
// server session that held the lock ended or could not be used any more: the
// server freed the lock, and another session may hold it now. The error
// wraps the cause; when the server ended the session, it matches
// [ErrSessionEnded] too.
var ErrLockLost = errors.New("lock lost: its server session ended")

// ErrSessionEnded is returned when the server session that a wait for a
// lock (or a try) ran on ended before the server answered: the backend was
// terminated (pg_terminate_backend), the server shut down, restarted or
// crashed (the server says FATAL, SQLSTATE 57P01 to 57P05), or the
// connection closed. Nothing was taken, and the error wraps the driver's.
// (lib/pq reports the server's FATAL as driver.ErrBadConn, as it does for a
// session that had ended before the wait began: with it, such a wait is
// tried once more, on another session.) A held lock lost that way is
// reported by [Lock.Err] with an error that matches both [ErrLockLost] and
// ErrSessionEnded.
var ErrSessionEnded = errors.New("the server session ended")

// ErrStandby is returned when the server is a standby (in recovery): a hot
// standby grants advisory locks that the primary never sees, so they would
// exclude nothing.
var ErrStandby = errors.New("server is a standby: its advisory locks are not seen by the primary")

// ErrDeadlock is returned when the server detected a deadlock (SQLSTATE
// 40P01) and chose this wait to fail. The error wraps the driver's error.
var ErrDeadlock = errors.New("deadlock detected by the server")

// ErrLockTableFull is returned when the server's shared lock table is full
// (SQLSTATE 53200, "out of shared memory"). Nothing was taken. Hold fewer
// locks, or raise max_locks_per_transaction on the server.
var ErrLockTableFull = errors.New("the server's lock table is full")

// ErrTooManyLocks is returned when the keys the Locker holds, together with
// those it is taking or waiting for, are already as many as [WithMaxLocks]
// allows. The error says how many of them are held.
var ErrTooManyLocks = errors.New("the Locker holds or waits for as many locks as WithMaxLocks allows")

// ErrTransactionPooling is returned when a proxy shares every server session
// between statements (PgBouncer's pool_mode=statement), where no transaction
// can pin one, and reported by [Lock.Err] joined with [ErrLockLost] when the
// heartbeat finds a session's statements reaching another server session (a
// pooler the Locker could not recognise). Behind a transaction pooler
// (pool_mode=transaction) session locks work: the Locker pins each session
// it uses with a transaction of its own (see the package documentation).
var ErrTransactionPooling = errors.New("session locks do not work through a transaction-pooling proxy")

// ErrServerTimeout is returned when the server, not the caller's ctx, ended
// a wait for a lock: a lock_timeout or statement_timeout that pglocks could
// not override (a setting made inside the caller's transaction is restored
// for its own statements, but one made by a proxy or an extension is not),
// or a cancel request that pglocks did not send (pg_cancel_backend from
// another session). The lock was not had; the error names the setting or
// the cancel, and wraps the server's error. Sessions of a [Locker] and the
// waits of transaction locks turn those timeouts off for the wait (see the
// package documentation), so this is rare.
var ErrServerTimeout = errors.New("the server ended the wait")

// errNilContext and errNilFunc are returned for a nil ctx or fn.
var (
	errNilContext = errors.New("nil Context")
	errNilFunc    = errors.New("nil fn")
)

// errNotHeld is the cause when the server says a lock we hold was not held.
var errNotHeld = errors.New("the server says the lock was not held")

// lockError wraps err in the one form used for errors about a key:
// "pglocks: lock KEY: err", where KEY is the key as [Key.String] writes
// it, after its name when the key was made from one lately (see names.go).
func lockError(key Key, err error) error {
	return &keyError{key: key, name: nameOf(key), err: err}
}

// keyError is lockError's error. The name is looked up when it is made,
// the text written only if asked for.
type keyError struct {
	key  Key
	name *keyName // or nil
	err  error
}

func (e *keyError) Error() string {
	return "pglocks: lock " + describe(e.key, e.name) + ": " + e.err.Error()
}

func (e *keyError) Unwrap() error { return e.err }

// endedError is the error of a statement whose server session ended
// (ErrSessionEnded), wrapping the driver's error.
type endedError struct{ err error }

func (e endedError) Error() string   { return ErrSessionEnded.Error() + ": " + e.err.Error() }
func (e endedError) Unwrap() []error { return []error{ErrSessionEnded, e.err} }

// lostError is why a held lock was lost (ErrLockLost), wrapping the cause.
type lostError struct{ cause error }

func (e lostError) Error() string {
	cause := e.cause
	if ended, ok := cause.(endedError); ok {
		cause = ended.err // ErrLockLost says that the session ended
	}
	return ErrLockLost.Error() + ": " + cause.Error()
}

func (e lostError) Unwrap() []error { return []error{ErrLockLost, e.cause} }

// lossError is the error of a hold of key lost for cause.
func lossError(key Key, cause error) error { return lockError(key, lostError{cause}) }

// sqlState returns the SQLSTATE of a server error from pgx or lib/pq, or "".
func sqlState(err error) string {
	var e interface{ SQLState() string }
	if errors.As(err, &e) {
		return e.SQLState()
	}
	return ""
}

// SQLSTATEs the library reacts to.
const (
	stateLockNotAvailable = "55P03" // lock_timeout expired
	stateDeadlock         = "40P01"
	stateOutOfMemory      = "53200" // out of shared memory: the lock table is full
	stateQueryCanceled    = "57014" // statement_timeout, or a cancel request
	// The server ended the session (FATAL): 57P01 admin_shutdown (a
	// terminated backend, a fast shutdown), 57P02 crash_shutdown, 57P03
	// cannot_connect_now, 57P04 database_dropped, 57P05
	// idle_session_timeout.
	stateClassSessionEnded = "57P"
)

// serverEnded wraps the error of a wait that the server ended although
// neither the caller's ctx nor pglocks asked it to: ErrServerTimeout, naming
// the setting. Other errors go through classify.
func serverEnded(err error) error {
	switch sqlState(err) {
	case stateLockNotAvailable:
		return fmt.Errorf("%w: lock_timeout expired: %w", ErrServerTimeout, err)
	case stateQueryCanceled:
		// The server's message tells which, in English (lc_messages).
		why := "statement_timeout expired, or another session cancelled it (pg_cancel_backend)"
		switch msg := err.Error(); {
		case strings.Contains(msg, "statement timeout"):
			why = "statement_timeout expired"
		case strings.Contains(msg, "user request"):
			why = "another session cancelled it (pg_cancel_backend)"
		}
		return fmt.Errorf("%w: %s: %w", ErrServerTimeout, why, err)
	}
	return classify(err)
}

// classify wraps a server error that has a sentinel of its own, once: an
// error classified already is returned as it is.
func classify(err error) error {
	st := sqlState(err)
	if st == "" || errors.Is(err, ErrDeadlock) || errors.Is(err, ErrLockTableFull) || errors.Is(err, ErrSessionEnded) {
		return err // not the server's word, or classified already
	}
	switch {
	case st == stateDeadlock:
		return fmt.Errorf("%w: %w", ErrDeadlock, err)
	case st == stateOutOfMemory:
		return fmt.Errorf("%w: %w", ErrLockTableFull, err)
	case strings.HasPrefix(st, stateClassSessionEnded):
		return endedError{err}
	}
	return err
}

// sessionEnded wraps err, why a session failed, in endedError if the server
// ended the session (its FATAL, or the connection closed: lib/pq reports
// both as driver.ErrBadConn), unless it says so already.
func sessionEnded(err error) error {
	if err == nil || errors.Is(err, ErrSessionEnded) {
		return err
	}
	if strings.HasPrefix(sqlState(err), stateClassSessionEnded) ||
		errors.Is(err, driver.ErrBadConn) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return endedError{err}
	}
	return err
}

// ctxError returns the error to report when ctx ended an operation: ctx.Err()
// (so errors.Is works for context.Canceled and context.DeadlineExceeded), with
// the cause attached when it is a different error.
func ctxError(ctx context.Context) error {
	err := ctx.Err()
	if cause := context.Cause(ctx); cause != nil && cause != err {
		return fmt.Errorf("%w: %w", err, cause)
	}
	return err
}
