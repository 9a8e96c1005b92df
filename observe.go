package pglocks

import (
	"context"
	"errors"
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

// Stat returns a snapshot of l: see [Stat].
func (l *Locker) Stat() Stat {
	var s Stat
	s.heldExclusive, s.heldShared, s.queued = l.table.stat()
	s.sessions, s.sessionsWaiting, s.sessionsSpare, s.primary = l.sessions.stat()
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

// Tracers: [WithTracer] takes a value that implements one or more of these
// interfaces, checked once, as pgx does with its tracers; a Locker without
// a tracer pays one nil check per hook. Hooks run on the goroutine that
// acquires or releases (a loss: on the goroutine that found it) and must
// not block. Module github.com/pglocks/pglocks/otelpglocks implements them
// all for OpenTelemetry.

// AcquireTracer traces acquisitions: Lock, TryLock, LockAll, TryLockAll,
// and those of Do, TryDo, DoAll and Lead.
type AcquireTracer interface {
	// TraceAcquireStart is called when an acquisition begins; the ctx it
	// returns is passed to TraceAcquireEnd, and kept with the locks
	// acquired for ReleaseTracer and LossTracer.
	TraceAcquireStart(ctx context.Context, l *Locker, data TraceAcquireStartData) context.Context
	TraceAcquireEnd(ctx context.Context, l *Locker, data TraceAcquireEndData)
}

// TraceAcquireStartData is what an acquisition asks for.
type TraceAcquireStartData struct {
	Keys   []Key  // one key, or LockAll's (sorted, merged)
	Shared bool   // Shared
	Wait   bool   // Lock (false: TryLock)
	Slots  int    // Slots(n), or 0
	Lead   bool   // a campaign of Lead
	Label  string // Label, or ""
}

// TraceAcquireEndData is how it ended.
type TraceAcquireEndData struct {
	Locks   []*Lock // what it took, or nil
	Err     error
	Outcome Outcome
	Took    time.Duration // from the call to its end: the wait, and a round trip or two
}

// ReleaseTracer traces releases of locks taken under an AcquireTracer's ctx.
type ReleaseTracer interface {
	// TraceRelease is called once Release has let the lock go (a minimum
	// hold still lasts on the server). ctx is TraceAcquireStart's.
	TraceRelease(ctx context.Context, l *Locker, data TraceReleaseData)
}

// TraceReleaseData describes a release.
type TraceReleaseData struct {
	Lock *Lock
	Held time.Duration // since the grant
	Err  error         // Release's error
}

// LossTracer traces lost locks.
type LossTracer interface {
	// TraceLoss is called when a lock held is lost, just after its
	// [Lock.Done] is closed (and [Locker.Stat] counts the loss); ctx is
	// TraceAcquireStart's (or context.Background without an
	// AcquireTracer).
	TraceLoss(ctx context.Context, l *Locker, data TraceLossData)
}

// TraceLossData describes a loss.
type TraceLossData struct {
	Lock  *Lock
	Cause error // as Lock.Err reports it
}

// LeaderTracer traces leadership won and lost by [Locker.Lead]; ctx is the
// campaign's TraceAcquireStart's (or Lead's own without an AcquireTracer).
type LeaderTracer interface {
	TraceLeaderGained(ctx context.Context, l *Locker, key Key, token int64)
	// TraceLeaderLost is called when a term ends: err is nil when fn
	// returned nil (a resignation), the loss, fn's error or ctx's.
	TraceLeaderLost(ctx context.Context, l *Locker, key Key, err error)
}

// LockerTracer is told of a Locker's life, so that it can observe its
// [Locker.Stat] (gauges) while it lives.
type LockerTracer interface {
	TraceLockerNew(l *Locker)
	TraceLockerClose(l *Locker)
}

// tracers are the interfaces that WithTracer's value implements.
type tracers struct {
	acquire AcquireTracer
	release ReleaseTracer
	loss    LossTracer
	leader  LeaderTracer
	locker  LockerTracer
}

// WithTracer makes the Locker call t's hooks: t must implement at least one
// of [AcquireTracer], [ReleaseTracer], [LossTracer], [LeaderTracer] and
// [LockerTracer]. By default there is none, and tracing costs nothing.
func WithTracer(t any) Option {
	return func(c *config) {
		var tr tracers
		tr.acquire, _ = t.(AcquireTracer)
		tr.release, _ = t.(ReleaseTracer)
		tr.loss, _ = t.(LossTracer)
		tr.leader, _ = t.(LeaderTracer)
		tr.locker, _ = t.(LockerTracer)
		if tr == (tracers{}) {
			c.fail(errors.New("pglocks: WithTracer: the value implements none of the tracer interfaces"))
			return
		}
		c.tracers = tr
	}
}

// Label names an acquisition for tracers (TraceAcquireStartData.Label): a
// bounded name, such as the one a key was made from, that metrics can carry
// where the key itself (unbounded) should not. It changes nothing else.
func Label(name string) LockOption { return func(c *lockConfig) { c.label = name } }

// traceStart begins tracing an acquisition, if a tracer wants it.
func (l *Locker) traceStart(ctx context.Context, keys []Key, o lockConfig, wait bool) context.Context {
	t := l.cfg.tracers.acquire
	if t == nil {
		return nil
	}
	return t.TraceAcquireStart(ctx, l, TraceAcquireStartData{Keys: keys, Shared: o.shared, Wait: wait,
		Slots: int(o.slots), Lead: o.own, Label: o.label})
}

// acquired ends an acquisition begun at began: the totals, and the tracer
// with tctx, the ctx traceStart returned. lk is the lock Lock acquired, or
// locks LockAll's.
func (l *Locker) acquired(tctx context.Context, began time.Time, lk *Lock, locks []*Lock, err error) {
	d := time.Since(began)
	l.counts.count(d, err)
	if l.cfg.tracers.acquire != nil {
		if lk != nil {
			locks = []*Lock{lk} // only here: it would escape, and allocate on every call
		}
		l.traceEnd(tctx, d, locks, err)
	}
}

// traceEnd tells the tracer how an acquisition ended.
func (l *Locker) traceEnd(tctx context.Context, d time.Duration, locks []*Lock, err error) {
	tr := &lockTrace{ctx: tctx, granted: time.Now()}
	for _, lk := range locks {
		lk.trace.Store(tr)
	}
	l.cfg.tracers.acquire.TraceAcquireEnd(tctx, l, TraceAcquireEndData{Locks: locks, Err: err, Outcome: OutcomeOf(err), Took: d})
}

// traceRelease tells the tracer that lk was released with err.
func (l *Locker) traceRelease(lk *Lock, err error) {
	if t, tr := l.cfg.tracers.release, lk.trace.Load(); t != nil && tr != nil {
		t.TraceRelease(tr.ctx, l, TraceReleaseData{Lock: lk, Held: time.Since(tr.granted), Err: err})
	}
}

// onLost reports the locks on h lost, to the table, the totals and the
// tracer.
func (l *Locker) onLost(h *holder, cause error) int {
	lost, lingering := l.table.lost(h, cause) // counted in Stat's Losses
	if t := l.cfg.tracers.loss; t != nil {
		for _, lk := range lost {
			ctx := context.Background()
			if tr := lk.trace.Load(); tr != nil {
				ctx = tr.ctx
			}
			t.TraceLoss(ctx, l, TraceLossData{Lock: lk, Cause: lk.Err()})
		}
	}
	return len(lost) + lingering
}
