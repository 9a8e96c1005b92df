package pglocks

import (
	"context"
	"errors"
	"fmt"
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
// server freed the lock, and another session may hold it now.
var ErrLockLost = errors.New("lock lost: its server session ended")

// errNotHeld is the cause when the server says a lock we hold was not held.
var errNotHeld = errors.New("the server says the lock was not held")

// lockError wraps err in the one form used for errors about a key.
func lockError(key Key, err error) error {
	return fmt.Errorf("pglocks: lock %v: %w", key, err)
}

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
	stateQueryCanceled    = "57014" // our cancel request arrived
)

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
