package pglocks

import (
	"context"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"
)

// ErrNoLeader is returned by [Locker.Leader] when no session holds the key
// exclusively.
var ErrNoLeader = errors.New("no leader: no session holds the key exclusively")

// leadRetry is how long Lead waits before campaigning again after fn
// failed, or after a campaign failed for a reason that may pass (the server
// unreachable).
const leadRetry = time.Second

// Lead campaigns for the leadership of key and runs fn while this process
// leads, for as long as ctx allows. It is the loop that "exactly one replica
// does X" needs:
//
//   - Campaign: wait for key, exclusively, inside the server's lock queue, on
//     a server session of its own. Candidates are elected in the order they
//     began to wait, the moment the leader lets go. (When the Locker has no
//     session to spare for it, see [WithMaxConns], the campaign is
//     multiplexed as a Lock's wait is, until one frees; leadership won that
//     way shares the Locker's primary session, and [Holder.Since] is zero.)
//   - Lead: run fn with a ctx that is cancelled the moment leadership is lost
//     (the session ended, or could not be checked: see [WithHeartbeat]), or
//     when ctx ends. fn must return promptly once its ctx is done.
//   - Resign: when fn returns, leadership is released at once, and passes to
//     the candidate that waited longest, if any; then Lead campaigns again.
//     So returning from fn is how to resign without stopping. After fn
//     returns an error (logged with [WithLogger]), or returns within a second
//     of its start, Lead waits until a second has passed before it campaigns
//     again, so a failing or idle leader does not spin.
//   - Stop: when ctx ends, Lead cancels fn's ctx, waits for fn to return,
//     releases leadership and returns an error matching ctx.Err(). It
//     returns early only for an error that campaigning again cannot cure:
//     [ErrClosed], [ErrInvalidKey], [ErrStandby], [ErrTransactionPooling].
//     Other campaign failures (the server down) are logged and retried
//     every second.
//
// While it leads, the session's application_name ends in " @" and the
// server's time of the election in UTC (" @20261203T141757.123Z", 22 bytes,
// cutting the name before it to the 41 bytes that leaves of the server's 63),
// so that [Locker.Leader] (and anyone reading pg_stat_activity) can tell since
// when; the name it had is put back when the session returns to the pool.
// Leader also reads the longer " since=2026-12-03T14:17:57.123Z" that
// earlier versions of pglocks wrote.
//
// A leader that is cut off from the server is told within the heartbeat
// bound, before the server frees the lock (see [WithServerKeepalive]). When
// the server itself ends the leader's session (a terminated backend, a
// restart), the next candidate is elected at once, while the old leader is
// told within milliseconds with pgx drivers (its idle session is watched),
// or within the heartbeat bound with lib/pq: the two may overlap for that
// long. Guard what fn writes with [FencingToken] where that matters.
func (l *Locker) Lead(ctx context.Context, key Key, fn func(ctx context.Context) error) error {
	switch {
	case ctx == nil:
		return lockError(key, errNilContext)
	case fn == nil:
		return lockError(key, fmt.Errorf("Lead: %w", errNilFunc))
	}
	var pause time.Duration
	for {
		if err := l.sleep(ctx, pause); err != nil {
			return lockError(key, err)
		}
		lk, err := l.lockOne(ctx, key, lockConfig{own: true}, true)
		if err != nil {
			switch {
			case ctx.Err() != nil:
				return lockError(key, ctxError(ctx))
			case errors.Is(err, ErrClosed), errors.Is(err, ErrInvalidKey), errors.Is(err, ErrStandby),
				errors.Is(err, ErrTransactionPooling):
				return err
			}
			l.cfg.logger.Info("pglocks: campaign failed; trying again", "key", key, "err", err)
			pause = leadRetry
			continue
		}
		if pause, err = l.term(ctx, lk, fn); err != nil {
			return err
		}
	}
}

// sleep waits d, unless ctx ends or the Locker closes first.
func (l *Locker) sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctxError(ctx)
	case <-l.closeCtx.Done():
		return ErrClosed
	}
}

// term runs fn for one term of leadership of lk, just won, and resigns. It
// returns how long to wait before the next campaign, or the error that ends
// Lead.
func (l *Locker) term(ctx context.Context, lk *Lock, fn func(ctx context.Context) error) (time.Duration, error) {
	key := lk.Key()
	l.markLeader(lk)
	l.cfg.logger.Info("pglocks: elected", "key", key)
	if lk.Err() != nil {
		// Lost before fn could start.
		_ = lk.Release(context.WithoutCancel(ctx))
		return 0, nil
	}
	tctx := ctx
	if tr := lk.trace.Load(); tr != nil {
		tctx = tr.ctx // the campaign's, for the tracer
	}
	if t := l.cfg.tracers.leader; t != nil {
		t.TraceLeaderGained(tctx, l, key, lk.token)
	}
	began := time.Now()
	err := lk.run(ctx, fn)
	if t := l.cfg.tracers.leader; t != nil {
		lost := err
		if lost == nil && ctx.Err() != nil {
			lost = ctxError(ctx)
		}
		t.TraceLeaderLost(tctx, l, key, lost)
	}
	switch {
	case ctx.Err() != nil:
		return 0, lockError(key, ctxError(ctx))
	case errors.Is(err, ErrClosed):
		return 0, lockError(key, ErrClosed)
	case errors.Is(err, ErrLockLost):
		l.cfg.logger.Warn("pglocks: leadership lost", "key", key, "err", err)
		return 0, nil
	case err != nil:
		l.cfg.logger.Warn("pglocks: leader's fn failed; resigned", "key", key, "err", err)
		return leadRetry, nil
	}
	l.cfg.logger.Info("pglocks: resigned", "key", key)
	// A term this short, again and again, would spin when no other
	// candidate waits (one that does is elected at once).
	return max(0, leadRetry-time.Since(began)), nil
}

// sinceMark and sinceLayout end the application_name of a leader's session:
// short, so that the name before them keeps as much of the server's 63 bytes
// as it can (maxLeaderAppName).
const (
	sinceMark   = " @"
	sinceLayout = "20060102T150405.000Z"
	// oldSinceMark is what Lead wrote before, with an RFC 3339 time;
	// Holders still reads it, from older pglocks in the fleet.
	oldSinceMark = " since="
)

// maxLeaderAppName is how much of the application_name a leader keeps
// before its election time.
const maxLeaderAppName = maxAppName - len(sinceMark) - len(sinceLayout)

// markLeader sets the application_name of lk's session to say since when it
// leads, by the server's clock. A failure here is a failure of the session,
// which lk then reports.
func (l *Locker) markLeader(lk *Lock) {
	if !l.table.begin() {
		return // Close waits for us before it touches the session
	}
	defer l.table.ops.Done()
	s := l.table.sessionOf(&lk.hold)
	if s == nil {
		return // lost already
	}
	use, ok := l.pool.mark(s)
	if !ok {
		return // on a shared session
	}
	defer use.end()
	base := l.cfg.appName
	if base == "" {
		base = s.orig[setAppName].String
	}
	for len(base) > maxLeaderAppName {
		_, n := utf8.DecodeLastRuneInString(base)
		base = base[:len(base)-n]
	}
	var set string
	err := l.acq.batch.do(context.Background(), s, &req{row: row{q: sqlMarkLeader, args: []any{base + sinceMark, s.pinned}, dest: []any{&set}}, txn: true})
	if err == nil && s.tryEnter() {
		l.pool.watch.hand(s) // the statement stopped the watcher
	}
}

// Observe reports the leader of key, as [Locker.Leader] does, each time it
// changes: the first value is the leader when Observe is called, and a zero
// Holder means no leader. It checks once per heartbeat interval
// ([WithHeartbeat]), so a leader that comes and goes in between may not be
// seen. The channel is closed when ctx ends or the Locker closes (at once
// for a nil ctx, the zero Key or a closed Locker), and as soon as the server
// turns out to be a standby, which cannot tell who leads (call
// [Locker.Leader] to learn why: it returns [ErrStandby]). Other queries that
// fail are retried at the next interval, not reported.
func (l *Locker) Observe(ctx context.Context, key Key) <-chan Holder {
	ch := make(chan Holder)
	if ctx == nil || !key.valid() || l.table.isClosed() || !l.g.start() {
		close(ch)
		return ch
	}
	go func() {
		defer l.g.done()
		defer close(ch)
		t := time.NewTicker(l.cfg.hbInterval)
		defer t.Stop()
		var last Holder
		first := true
		for {
			qctx, cancel := context.WithTimeout(ctx, l.cfg.hbTimeout+l.cfg.hbInterval)
			stop := context.AfterFunc(l.closeCtx, cancel) // Close does not wait for it
			h, err := l.Leader(qctx, key)
			stop()
			cancel()
			if errors.Is(err, ErrStandby) {
				l.cfg.logger.Warn("pglocks: Observe: the server is a standby; stopped", "key", key)
				return
			}
			if err == nil || errors.Is(err, ErrNoLeader) {
				if first || h != last {
					select {
					case ch <- h:
					case <-ctx.Done():
						return
					case <-l.closeCtx.Done():
						return
					}
					last, first = h, false
				}
			}
			select {
			case <-t.C:
			case <-ctx.Done():
				return
			case <-l.closeCtx.Done():
				return
			}
		}
	}()
	return ch
}

// FencingToken returns the fencing token ([Lock.Token]) of the lock that the
// fn run by [Locker.Do], [Locker.TryDo] or [Locker.Lead] holds, given that
// fn's ctx (or one derived from it); 0 without [WithFencingTokens] or for
// another ctx. For Lead it orders the terms of leadership: a resource that
// refuses writes with a token lower than one it has seen refuses a deposed
// leader.
func FencingToken(ctx context.Context) int64 {
	lk, _ := ctx.Value(lockCtxKey{}).(*Lock)
	if lk == nil {
		return 0
	}
	return lk.token
}

type lockCtxKey struct{}
