package pglocks

// observe.go: Stat, a snapshot of what a Locker holds, waits for and has
// done.

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// Stat is a snapshot of a Locker, from [Locker.Stat]: what it holds and
// waits for now, the sessions it uses, and running totals since [New]. It
// is cheap to take (a few mutexes, no I/O), so that a metrics exporter can
// take one every second.
type Stat struct {
	heldExclusive, heldShared                 int
	waitingServer, waitingMultiplexed, queued int
	sessions, sessionsWaiting, sessionsSpare  int
	primary                                   bool
	acquisitions, locked, timeouts, cancelled int64
	failed, losses                            int64
	waitTime                                  time.Duration
}

// HeldExclusive is how many keys the Locker holds exclusively on the server.
func (s Stat) HeldExclusive() int { return s.heldExclusive }

// HeldShared is how many keys it holds in shared mode (several goroutines
// sharing one hold count once).
func (s Stat) HeldShared() int { return s.heldShared }

// WaitingServer is how many waits are in the server's queue, each on a
// session of its own.
func (s Stat) WaitingServer() int { return s.waitingServer }

// WaitingMultiplexed is how many waits are multiplexed (see [Locker.Lock]),
// slot waits included.
func (s Stat) WaitingMultiplexed() int { return s.waitingMultiplexed }

// WaitingInProcess is how many goroutines wait for a key that another
// goroutine of the Locker holds or is taking.
func (s Stat) WaitingInProcess() int { return s.queued }

// Sessions is how many connections the Locker has taken from its pool (at
// most [WithMaxConns]); SessionsWaiting of them wait in the server's queue,
// SessionsSpare are idle and kept ready, and HasPrimary says whether the
// primary, where locks are tried and most are held, is one of them.
func (s Stat) Sessions() int { return s.sessions }

// SessionsWaiting: see [Stat.Sessions].
func (s Stat) SessionsWaiting() int { return s.sessionsWaiting }

// SessionsSpare: see [Stat.Sessions].
func (s Stat) SessionsSpare() int { return s.sessionsSpare }

// HasPrimary: see [Stat.Sessions].
func (s Stat) HasPrimary() bool { return s.primary }

// Acquisitions is how many Lock, TryLock, LockAll, TryLockAll calls (and
// the acquisitions of Do, TryDo, DoAll and Lead) succeeded.
func (s Stat) Acquisitions() int64 { return s.acquisitions }

// Locked is how many answered ErrLocked.
func (s Stat) Locked() int64 { return s.locked }

// Timeouts is how many ended on their ctx's deadline, or on the server's
// own timeout ([ErrServerTimeout]).
func (s Stat) Timeouts() int64 { return s.timeouts }

// Cancelled is how many ended because their ctx was cancelled, or the
// Locker closed.
func (s Stat) Cancelled() int64 { return s.cancelled }

// Failed is how many failed otherwise (the server unreachable, a bad key).
func (s Stat) Failed() int64 { return s.failed }

// Losses is how many held locks were lost (see [ErrLockLost]), a minimum
// hold cut short included.
func (s Stat) Losses() int64 { return s.losses }

// WaitTime is the time all acquisitions took, from the call to its end,
// together.
func (s Stat) WaitTime() time.Duration { return s.waitTime }

// String describes s on one line, as %v and %+v print it:
//
//	held 1 exclusive, 0 shared; waiting 0 in the server's queue, 2 multiplexed, 0 in process;
//	sessions 2 (0 waiting, 1 spare, a primary); acquired 10, locked 1, timeouts 0, cancelled 0,
//	failed 0, lost 0; wait time 12.5ms
//
// (on one line).
func (s Stat) String() string {
	primary := "no primary"
	if s.primary {
		primary = "a primary"
	}
	return fmt.Sprintf("held %d exclusive, %d shared; waiting %d in the server's queue, %d multiplexed, %d in process; "+
		"sessions %d (%d waiting, %d spare, %s); acquired %d, locked %d, timeouts %d, cancelled %d, failed %d, lost %d; wait time %v",
		s.heldExclusive, s.heldShared, s.waitingServer, s.waitingMultiplexed, s.queued,
		s.sessions, s.sessionsWaiting, s.sessionsSpare, primary,
		s.acquisitions, s.locked, s.timeouts, s.cancelled, s.failed, s.losses, s.waitTime)
}

// Stat returns a snapshot of l: see [Stat].
func (l *Locker) Stat() Stat {
	var s Stat
	s.heldExclusive, s.heldShared, s.queued = l.table.stat()
	s.sessions, s.sessionsWaiting, s.sessionsSpare, s.primary = l.pool.stat()
	s.waitingServer = s.sessionsWaiting
	s.waitingMultiplexed = l.mux.stat()
	c := &l.counts
	s.acquisitions, s.locked, s.timeouts = c.acquisitions.Load(), c.locked.Load(), c.timeouts.Load()
	s.cancelled, s.failed, s.losses = c.cancelled.Load(), c.failed.Load(), c.losses.Load()
	s.waitTime = time.Duration(c.waitNanos.Load())
	return s
}

// counts are the running totals of Stat.
type counts struct {
	acquisitions, locked, timeouts, cancelled, failed, losses, waitNanos atomic.Int64
}

// Outcome is how an acquisition ended, as [Locker.Stat] counts it and
// tracers see it.
type Outcome string

// Outcomes.
const (
	OutcomeAcquired  Outcome = "acquired"
	OutcomeLocked    Outcome = "locked"    // ErrLocked
	OutcomeTimeout   Outcome = "timeout"   // ctx's deadline, or ErrServerTimeout
	OutcomeCancelled Outcome = "cancelled" // ctx cancelled, or the Locker closed
	OutcomeFailed    Outcome = "failed"    // anything else
)

// OutcomeOf classifies an acquisition's error.
func OutcomeOf(err error) Outcome {
	switch {
	case err == nil:
		return OutcomeAcquired
	case errors.Is(err, ErrLocked):
		return OutcomeLocked
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, ErrServerTimeout):
		return OutcomeTimeout
	case errors.Is(err, context.Canceled), errors.Is(err, ErrClosed):
		return OutcomeCancelled
	}
	return OutcomeFailed
}

// count adds an acquisition that took d and ended with err to the totals.
func (c *counts) count(d time.Duration, err error) {
	c.waitNanos.Add(int64(d))
	switch OutcomeOf(err) {
	case OutcomeAcquired:
		c.acquisitions.Add(1)
	case OutcomeLocked:
		c.locked.Add(1)
	case OutcomeTimeout:
		c.timeouts.Add(1)
	case OutcomeCancelled:
		c.cancelled.Add(1)
	default:
		c.failed.Add(1)
	}
}
