package pglocks

// trace.go: the tracer hooks, and how a Locker calls them.

import (
	"context"
	"errors"
	"time"
)

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

// start begins tracing an acquisition, if a tracer wants it.
func (t *tracers) start(ctx context.Context, l *Locker, keys []Key, o lockConfig, wait bool) context.Context {
	if t.acquire == nil {
		return nil
	}
	return t.acquire.TraceAcquireStart(ctx, l, TraceAcquireStartData{Keys: keys, Shared: o.shared, Wait: wait,
		Slots: int(o.slots), Lead: o.own, Label: o.label})
}

// end tells the tracer how an acquisition that took d ended, with tctx, the
// ctx start returned. lk is the lock Lock acquired, or locks LockAll's.
func (t *tracers) end(tctx context.Context, l *Locker, d time.Duration, lk *Lock, locks []*Lock, err error) {
	if lk != nil {
		locks = []*Lock{lk} // only here: it would escape, and allocate on every call
	}
	tr := &lockTrace{ctx: tctx, granted: time.Now()}
	for _, lk := range locks {
		lk.trace.Store(tr)
	}
	t.acquire.TraceAcquireEnd(tctx, l, TraceAcquireEndData{Locks: locks, Err: err, Outcome: OutcomeOf(err), Took: d})
}

// traceRelease tells the tracer that lk was released with err.
func (t *tracers) traceRelease(l *Locker, lk *Lock, err error) {
	if tr := lk.trace.Load(); t.release != nil && tr != nil {
		t.release.TraceRelease(tr.ctx, l, TraceReleaseData{Lock: lk, Held: time.Since(tr.granted), Err: err})
	}
}

// traceLoss tells the tracer that holds were lost.
func (t *tracers) traceLoss(l *Locker, holds []*hold) {
	if t.loss == nil {
		return
	}
	for _, h := range holds {
		lk := lockOf(h)
		ctx := context.Background()
		if tr := lk.trace.Load(); tr != nil {
			ctx = tr.ctx
		}
		t.loss.TraceLoss(ctx, l, TraceLossData{Lock: lk, Cause: lk.Err()})
	}
}
