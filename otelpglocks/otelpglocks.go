// Package otelpglocks records what pglocks Lockers do as OpenTelemetry
// metrics and spans. It is a module of its own, so that pglocks itself
// does not depend on OpenTelemetry.
//
//	t, err := otelpglocks.New() // the global MeterProvider and TracerProvider
//	...
//	l, err := pglocks.New(pool, pglocks.WithTracer(t))
//
// # Metrics
//
//	pglocks.acquire.duration  histogram, s      how long Lock, TryLock, LockAll, TryLockAll (and
//	                                             Do's, TryDo's, DoAll's, Lead's) acquisitions took,
//	                                             from the call to its end
//	pglocks.locks.held        up-down, {lock}    keys held on the server
//	pglocks.waits             up-down, {wait}    goroutines waiting, by pglocks.wait.place
//	pglocks.sessions          up-down, {session} connections the Lockers use, by pglocks.session.state
//	pglocks.lock.losses       counter, {lock}    locks lost (the session ended, or was cut off)
//	pglocks.leader.changes    counter, {change}  terms of Lead begun and ended, by pglocks.leader.change
//	pglocks.leader.terms      up-down, {term}    terms of Lead in progress (1 on the leader)
//
// Attributes: pglocks.lock.mode (exclusive, shared), pglocks.acquire.type
// (wait, try), pglocks.acquire.outcome (acquired, locked, timeout,
// cancelled, failed: see pglocks.Outcome) and, for acquisitions given
// [pglocks.Label], pglocks.lock.label. Keys are not attributes of metrics:
// there may be any number of them. The up-down counters are observed from
// [pglocks.Locker.Stat] of every Locker made with the Tracer, summed.
//
// # Spans
//
// An acquisition is a span, "pglocks Lock" (TryLock, LockAll, TryLockAll,
// Lead), from the call until the lock is released or lost: its events say
// when it was acquired, released or lost (with the cause); a failed
// acquisition ends it with an error status (not ErrLocked, which is an
// answer). A span carries the key (pglocks.lock.key, as [pglocks.Key.String]
// prints it) and its label.
package otelpglocks

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/pglocks/pglocks"
)

// ScopeName is the instrumentation scope of the meter and the tracer.
const ScopeName = "github.com/pglocks/pglocks/otelpglocks"

// Attribute keys.
const (
	AttrMode    = attribute.Key("pglocks.lock.mode")       // exclusive, shared
	AttrType    = attribute.Key("pglocks.acquire.type")    // wait, try
	AttrOutcome = attribute.Key("pglocks.acquire.outcome") // see pglocks.Outcome
	AttrLabel   = attribute.Key("pglocks.lock.label")      // pglocks.Label's, when given
	AttrKey     = attribute.Key("pglocks.lock.key")        // spans only
	AttrPlace   = attribute.Key("pglocks.wait.place")      // server, multiplexed, process
	AttrState   = attribute.Key("pglocks.session.state")   // waiting, spare, holding
	AttrChange  = attribute.Key("pglocks.leader.change")   // gained, lost
)

// Option configures a Tracer.
type Option func(*config)

type config struct {
	mp metric.MeterProvider
	tp trace.TracerProvider
}

// WithMeterProvider records metrics with mp instead of the global
// MeterProvider.
func WithMeterProvider(mp metric.MeterProvider) Option { return func(c *config) { c.mp = mp } }

// WithTracerProvider records spans with tp instead of the global
// TracerProvider.
func WithTracerProvider(tp trace.TracerProvider) Option { return func(c *config) { c.tp = tp } }

// Tracer implements every pglocks tracer interface; pass it to
// [pglocks.WithTracer]. One Tracer may serve any number of Lockers.
type Tracer struct {
	tracer   trace.Tracer
	duration metric.Float64Histogram
	losses   metric.Int64Counter
	changes  metric.Int64Counter
	reg      metric.Registration
	terms    atomic.Int64

	mu      sync.Mutex
	lockers map[*pglocks.Locker]struct{}

	// sets caches the attribute sets of acquisitions without a label, by
	// shared, wait and outcome.
	sets sync.Map // setKey -> metric.MeasurementOption
}

type setKey struct {
	shared, wait bool
	outcome      pglocks.Outcome
}

var (
	setGained = metric.WithAttributeSet(attribute.NewSet(AttrChange.String("gained")))
	setLost   = metric.WithAttributeSet(attribute.NewSet(AttrChange.String("lost")))
)

// New returns a Tracer that records with the global providers, or those
// given by opts.
func New(opts ...Option) (*Tracer, error) {
	var c config
	for _, o := range opts {
		o(&c)
	}
	if c.mp == nil {
		c.mp = otel.GetMeterProvider()
	}
	if c.tp == nil {
		c.tp = otel.GetTracerProvider()
	}
	m := c.mp.Meter(ScopeName)
	t := &Tracer{tracer: c.tp.Tracer(ScopeName), lockers: make(map[*pglocks.Locker]struct{})}
	var err, e error
	t.duration, e = m.Float64Histogram("pglocks.acquire.duration", metric.WithUnit("s"),
		metric.WithDescription("How long acquisitions of advisory locks took, from the call to its end."),
		metric.WithExplicitBucketBoundaries(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
	err = errors.Join(err, e)
	t.losses, e = m.Int64Counter("pglocks.lock.losses", metric.WithUnit("{lock}"),
		metric.WithDescription("Advisory locks lost while held: their session ended or was cut off."))
	err = errors.Join(err, e)
	t.changes, e = m.Int64Counter("pglocks.leader.changes", metric.WithUnit("{change}"),
		metric.WithDescription("Terms of leadership begun (gained) and ended (lost)."))
	err = errors.Join(err, e)
	held, e := m.Int64ObservableUpDownCounter("pglocks.locks.held", metric.WithUnit("{lock}"),
		metric.WithDescription("Advisory locks held on the server, by mode."))
	err = errors.Join(err, e)
	waits, e := m.Int64ObservableUpDownCounter("pglocks.waits", metric.WithUnit("{wait}"),
		metric.WithDescription("Goroutines waiting for advisory locks: in the server's queue, multiplexed, or in the process behind another goroutine."))
	err = errors.Join(err, e)
	sessions, e := m.Int64ObservableUpDownCounter("pglocks.sessions", metric.WithUnit("{session}"),
		metric.WithDescription("Connections the Lockers use: waiting in the server's queue, spare, or holding locks."))
	err = errors.Join(err, e)
	terms, e := m.Int64ObservableUpDownCounter("pglocks.leader.terms", metric.WithUnit("{term}"),
		metric.WithDescription("Terms of leadership in progress."))
	err = errors.Join(err, e)
	if err != nil {
		return nil, err
	}
	var (
		exclusive   = metric.WithAttributeSet(attribute.NewSet(AttrMode.String("exclusive")))
		shared      = metric.WithAttributeSet(attribute.NewSet(AttrMode.String("shared")))
		server      = metric.WithAttributeSet(attribute.NewSet(AttrPlace.String("server")))
		multiplexed = metric.WithAttributeSet(attribute.NewSet(AttrPlace.String("multiplexed")))
		process     = metric.WithAttributeSet(attribute.NewSet(AttrPlace.String("process")))
		sWaiting    = metric.WithAttributeSet(attribute.NewSet(AttrState.String("waiting")))
		sSpare      = metric.WithAttributeSet(attribute.NewSet(AttrState.String("spare")))
		sHolding    = metric.WithAttributeSet(attribute.NewSet(AttrState.String("holding")))
	)
	t.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		var sum struct{ ex, sh, srv, mux, proc, wait, spare, hold int }
		t.mu.Lock()
		for l := range t.lockers {
			s := l.Stat()
			sum.ex += s.HeldExclusive()
			sum.sh += s.HeldShared()
			sum.srv += s.WaitingServer()
			sum.mux += s.WaitingMultiplexed()
			sum.proc += s.WaitingInProcess()
			sum.wait += s.SessionsWaiting()
			sum.spare += s.SessionsSpare()
			sum.hold += s.Sessions() - s.SessionsWaiting() - s.SessionsSpare()
		}
		t.mu.Unlock()
		o.ObserveInt64(held, int64(sum.ex), exclusive)
		o.ObserveInt64(held, int64(sum.sh), shared)
		o.ObserveInt64(waits, int64(sum.srv), server)
		o.ObserveInt64(waits, int64(sum.mux), multiplexed)
		o.ObserveInt64(waits, int64(sum.proc), process)
		o.ObserveInt64(sessions, int64(sum.wait), sWaiting)
		o.ObserveInt64(sessions, int64(sum.spare), sSpare)
		o.ObserveInt64(sessions, int64(sum.hold), sHolding)
		o.ObserveInt64(terms, t.terms.Load())
		return nil
	}, held, waits, sessions, terms)
	if err != nil {
		return nil, err
	}
	return t, nil
}

// Shutdown stops observing the Lockers' Stat. The Tracer records nothing
// more for the up-down counters; the rest goes on.
func (t *Tracer) Shutdown() error { return t.reg.Unregister() }

// TraceLockerNew implements [pglocks.LockerTracer].
func (t *Tracer) TraceLockerNew(l *pglocks.Locker) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lockers[l] = struct{}{}
}

// TraceLockerClose implements [pglocks.LockerTracer].
func (t *Tracer) TraceLockerClose(l *pglocks.Locker) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.lockers, l)
}

// span is an acquisition's span, kept in the ctx that TraceAcquireStart
// returns; it ends when the last of the locks acquired goes.
type span struct {
	trace.Span
	label string
	left  atomic.Int32 // locks held
}

type spanKey struct{}

// TraceAcquireStart implements [pglocks.AcquireTracer].
func (t *Tracer) TraceAcquireStart(ctx context.Context, _ *pglocks.Locker, d pglocks.TraceAcquireStartData) context.Context {
	name := "pglocks TryLock"
	switch {
	case d.Lead:
		name = "pglocks Lead"
	case d.Wait && len(d.Keys) > 1:
		name = "pglocks LockAll"
	case d.Wait:
		name = "pglocks Lock"
	case len(d.Keys) > 1:
		name = "pglocks TryLockAll"
	}
	attrs := make([]attribute.KeyValue, 0, 4)
	attrs = append(attrs, AttrMode.String(mode(d.Shared)), AttrType.String(kind(d.Wait)))
	if len(d.Keys) == 1 {
		attrs = append(attrs, AttrKey.String(d.Keys[0].String()))
	} else {
		keys := make([]string, len(d.Keys))
		for i, k := range d.Keys {
			keys[i] = k.String()
		}
		attrs = append(attrs, AttrKey.StringSlice(keys))
	}
	if d.Label != "" {
		attrs = append(attrs, AttrLabel.String(d.Label))
	}
	if d.Slots > 0 {
		attrs = append(attrs, attribute.Int("pglocks.lock.slots", d.Slots))
	}
	ctx, sp := t.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindInternal), trace.WithAttributes(attrs...))
	s := &span{Span: sp, label: d.Label}
	return context.WithValue(ctx, spanKey{}, &startData{span: s, shared: d.Shared, wait: d.Wait})
}

// startData is what TraceAcquireEnd needs of the start.
type startData struct {
	span         *span
	shared, wait bool
}

// TraceAcquireEnd implements [pglocks.AcquireTracer].
func (t *Tracer) TraceAcquireEnd(ctx context.Context, _ *pglocks.Locker, d pglocks.TraceAcquireEndData) {
	sd, _ := ctx.Value(spanKey{}).(*startData)
	if sd == nil {
		return
	}
	t.duration.Record(ctx, d.Took.Seconds(), t.attrs(sd, d.Outcome))
	s := sd.span
	if d.Err != nil {
		s.SetAttributes(AttrOutcome.String(string(d.Outcome)))
		if d.Outcome != pglocks.OutcomeLocked {
			s.RecordError(d.Err)
			s.SetStatus(codes.Error, string(d.Outcome))
		}
		s.End()
		return
	}
	s.left.Store(int32(len(d.Locks)))
	s.AddEvent("acquired", trace.WithAttributes(attribute.Float64("pglocks.acquire.duration", d.Took.Seconds())))
	if len(d.Locks) == 1 {
		if slot := d.Locks[0].Slot(); slot >= 0 {
			s.SetAttributes(attribute.Int("pglocks.lock.slot", slot))
		}
		if tok := d.Locks[0].Token(); tok != 0 {
			s.SetAttributes(attribute.Int64("pglocks.lock.token", tok))
		}
	}
}

func (t *Tracer) attrs(sd *startData, o pglocks.Outcome) metric.MeasurementOption {
	if sd.span.label != "" {
		return metric.WithAttributes(AttrMode.String(mode(sd.shared)), AttrType.String(kind(sd.wait)),
			AttrOutcome.String(string(o)), AttrLabel.String(sd.span.label))
	}
	k := setKey{sd.shared, sd.wait, o}
	if m, ok := t.sets.Load(k); ok {
		return m.(metric.MeasurementOption)
	}
	m := metric.WithAttributeSet(attribute.NewSet(AttrMode.String(mode(sd.shared)), AttrType.String(kind(sd.wait)),
		AttrOutcome.String(string(o))))
	t.sets.Store(k, m)
	return m
}

// TraceRelease implements [pglocks.ReleaseTracer].
func (t *Tracer) TraceRelease(ctx context.Context, _ *pglocks.Locker, d pglocks.TraceReleaseData) {
	sd, _ := ctx.Value(spanKey{}).(*startData)
	if sd == nil {
		return
	}
	s := sd.span
	if d.Err != nil {
		s.AddEvent("release failed", trace.WithAttributes(attribute.String("error", d.Err.Error())))
	} else {
		s.AddEvent("released", trace.WithAttributes(attribute.Float64("pglocks.lock.held", d.Held.Seconds())))
	}
	if s.left.Add(-1) == 0 {
		s.End()
	}
}

// TraceLoss implements [pglocks.LossTracer].
func (t *Tracer) TraceLoss(ctx context.Context, _ *pglocks.Locker, d pglocks.TraceLossData) {
	var opt metric.AddOption
	sd, _ := ctx.Value(spanKey{}).(*startData)
	if sd != nil && sd.span.label != "" {
		opt = metric.WithAttributes(AttrLabel.String(sd.span.label))
	} else {
		opt = metric.WithAttributeSet(attribute.NewSet())
	}
	t.losses.Add(ctx, 1, opt)
	if sd == nil {
		return
	}
	s := sd.span
	s.AddEvent("lost", trace.WithAttributes(attribute.String("pglocks.loss.cause", d.Cause.Error())))
	s.SetStatus(codes.Error, "lock lost")
	if s.left.Add(-1) == 0 {
		s.End()
	}
}

// TraceLeaderGained implements [pglocks.LeaderTracer].
func (t *Tracer) TraceLeaderGained(ctx context.Context, _ *pglocks.Locker, _ pglocks.Key, token int64) {
	t.terms.Add(1)
	t.changes.Add(ctx, 1, setGained)
	if sd, _ := ctx.Value(spanKey{}).(*startData); sd != nil {
		sd.span.AddEvent("elected")
	}
}

// TraceLeaderLost implements [pglocks.LeaderTracer].
func (t *Tracer) TraceLeaderLost(ctx context.Context, _ *pglocks.Locker, _ pglocks.Key, err error) {
	t.terms.Add(-1)
	t.changes.Add(ctx, 1, setLost)
}

func mode(shared bool) string {
	if shared {
		return "shared"
	}
	return "exclusive"
}

func kind(wait bool) string {
	if wait {
		return "wait"
	}
	return "try"
}

// Interface checks.
var (
	_ pglocks.AcquireTracer = (*Tracer)(nil)
	_ pglocks.ReleaseTracer = (*Tracer)(nil)
	_ pglocks.LossTracer    = (*Tracer)(nil)
	_ pglocks.LeaderTracer  = (*Tracer)(nil)
	_ pglocks.LockerTracer  = (*Tracer)(nil)
)
