package pglocks

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
)

// The lock table decides without I/O, so it is tested without a server:
// what PostgreSQL grants is tested against PostgreSQL elsewhere.

// newTestTable is a table whose holds are plain holds.
func newTestTable(max int) *table {
	var losses atomic.Int64
	return newTable(max, tableEvents{newHold: func() *hold { return &hold{} }, lingerEnd: func(*entry) {}, losses: &losses})
}

func grantOne(t *testing.T, tb *table, e *entry, s *session) *hold {
	t.Helper()
	if err := tb.reserve([]*entry{e}); err != nil {
		t.Fatal(err)
	}
	holds, err := tb.record([]*entry{e}, s, []int64{0})
	if err != nil {
		t.Fatal(err)
	}
	return holds[0]
}

// errOf is the hold's Err, as Lock.Err reports it.
func errOf(h *hold) error {
	if h.ctx.Err() == nil {
		return nil
	}
	return context.Cause(h.ctx)
}

func mustClaim(t *testing.T, tb *table, k Key, shared bool) *entry {
	t.Helper()
	lk, e, w, err := tb.claim(k, shared, true)
	if err != nil || lk != nil || w != nil || e == nil || e.state != stateAcquiring {
		t.Fatalf("claim %v: %v %v %v %v", k, lk, e, w, err)
	}
	return e
}

func TestTableExclusiveFIFO(t *testing.T) {
	tb := newTestTable(10)
	h := &session{}
	k := ID(1)
	e := mustClaim(t, tb, k, false)
	lk := grantOne(t, tb, e, h)
	if h.held.Load() != 1 || tb.n.held != 1 {
		t.Fatalf("held %d, counted %d", h.held.Load(), tb.n.held)
	}
	// Busy: a try is refused, waiters queue in order.
	if _, _, _, err := tb.claim(k, false, false); !errors.Is(err, ErrLocked) {
		t.Fatalf("try on a held key: %v", err)
	}
	_, _, w1, _ := tb.claim(k, false, true)
	_, _, w2, _ := tb.claim(k, true, true)
	if w1 == nil || w2 == nil {
		t.Fatal("waiters not queued")
	}
	u, _, err := tb.release(lk)
	if u == nil || err != nil || u.notify {
		t.Fatalf("release: %+v %v", u, err)
	}
	select {
	case <-w1.ready:
		t.Fatal("turn given before the server's unlock finished")
	default:
	}
	tb.released(u)
	if h.held.Load() != 0 || errOf(lk) != ErrReleased {
		t.Fatalf("after released: held %d, Err %v", h.held.Load(), errOf(lk))
	}
	if got := <-w1.ready; got != nil || e.state != stateAcquiring || e.shared {
		t.Fatalf("first waiter: %v, state %v", got, e.state)
	}
	select {
	case <-w2.ready:
		t.Fatal("the second waiter went before the first was done")
	default:
	}
	tb.abandon(e) // the first waiter's acquisition failed: the second goes
	if got := <-w2.ready; got != nil || !e.shared {
		t.Fatalf("second waiter: %v shared=%v", got, e.shared)
	}
	tb.abandon(e)
	if len(tb.keys) != 0 || tb.n.held != 0 {
		t.Fatalf("left: %d keys, %d counted", len(tb.keys), tb.n.held)
	}
}

func TestTableSharedJoin(t *testing.T) {
	tb := newTestTable(10)
	h := &session{}
	k := Pair(1, 2)
	lk1 := grantOne(t, tb, mustClaim(t, tb, k, true), h)
	// A shared claim joins the hold without the server.
	lk2, e, w, err := tb.claim(k, true, false)
	if err != nil || lk2 == nil || e != nil || w != nil {
		t.Fatalf("join: %v %v %v %v", lk2, e, w, err)
	}
	// An exclusive waiter queues; shared claims after it queue too (FIFO).
	_, _, wx, _ := tb.claim(k, false, true)
	_, _, ws, _ := tb.claim(k, true, true)
	if wx == nil || ws == nil {
		t.Fatal("not queued behind the exclusive waiter")
	}
	if u, prove, err := tb.release(lk1); u != nil || err != nil || prove != h {
		t.Fatalf("releasing one of two shared handles unlocks on the server, or proves nothing: %+v %v %v", u, prove, err)
	}
	u, _, _ := tb.release(lk2)
	if u == nil {
		t.Fatal("the last shared handle did not unlock")
	}
	tb.released(u)
	if got := <-wx.ready; got != nil {
		t.Fatal("exclusive waiter got a handle")
	}
	if tb.leave(tb.keys[k], ws) {
		t.Fatal("the shared waiter was given a turn behind the exclusive one")
	}
	tb.abandon(tb.keys[k])
	if len(tb.keys) != 0 {
		t.Fatal("entry not forgotten")
	}
}

func TestTableMaxLocks(t *testing.T) {
	tb := newTestTable(2)
	es := []*entry{mustClaim(t, tb, ID(1), false), mustClaim(t, tb, ID(2), false), mustClaim(t, tb, ID(3), false)}
	if err := tb.reserve(es); !errors.Is(err, ErrTooManyLocks) {
		t.Fatalf("3 of 2: %v", err)
	}
	if err := tb.reserve(es[:2]); err != nil {
		t.Fatal(err)
	}
	if err := tb.reserve(es[2:]); !errors.Is(err, ErrTooManyLocks) {
		t.Fatalf("a third: %v", err)
	}
	tb.abandon(es[0])
	if err := tb.reserve(es[2:]); err != nil {
		t.Fatalf("after one was given back: %v", err)
	}
	tb.abandon(es[1:]...)
	if tb.n.held != 0 {
		t.Fatalf("counted %d", tb.n.held)
	}
}

func TestTableGrantOnDeadOrClosed(t *testing.T) {
	tb := newTestTable(10)
	h := &session{}
	e := mustClaim(t, tb, ID(1), false)
	if err := tb.reserve([]*entry{e}); err != nil {
		t.Fatal(err)
	}
	h.dead.Store(true)
	if _, err := tb.record([]*entry{e}, h, []int64{0}); !errors.Is(err, errSessionGone) || e.state != stateAcquiring {
		t.Fatalf("grant on a closed session: %v, state %v", err, e.state)
	}
	tb.close()
	if _, err := tb.record([]*entry{e}, &session{}, []int64{0}); !errors.Is(err, ErrClosed) || e.state != stateIdle || tb.n.held != 0 {
		t.Fatalf("grant after close: %v, state %v, counted %d", err, e.state, tb.n.held)
	}
	if _, _, _, err := tb.claim(ID(2), false, true); !errors.Is(err, ErrClosed) {
		t.Fatalf("claim after close: %v", err)
	}
	if tb.begin() {
		t.Fatal("begin after close")
	}
}

func TestTableLost(t *testing.T) {
	tb := newTestTable(10)
	h, other := &session{}, &session{}
	lk1 := grantOne(t, tb, mustClaim(t, tb, ID(1), false), h)
	lk2 := grantOne(t, tb, mustClaim(t, tb, ID(2), false), h)
	lk3 := grantOne(t, tb, mustClaim(t, tb, ID(3), false), other)
	// lk2 is being released when the session goes: its releaser finishes it.
	u, _, _ := tb.release(lk2)
	_, _, w, _ := tb.claim(ID(1), false, true)
	if told, _ := tb.lost(h, errors.New("terminated")); len(told) != 1 || told[0] != lk1 {
		t.Fatalf("lost %v, want lk1 alone", told)
	}
	if !errors.Is(errOf(lk1), ErrLockLost) || errOf(lk3) != nil {
		t.Fatalf("lk1 %v, lk3 %v", errOf(lk1), errOf(lk3))
	}
	if got := <-w.ready; got != nil {
		t.Fatal("the waiter for the lost key got a handle")
	}
	tb.released(u)
	if h.held.Load() != 0 || other.held.Load() != 1 {
		t.Fatalf("held: %d on the lost session, %d on the other", h.held.Load(), other.held.Load())
	}
	if _, _, err := tb.release(lk1); !errors.Is(err, ErrLockLost) {
		t.Fatalf("Release after the loss: %v", err)
	}
}

func TestTableWant(t *testing.T) {
	tb := newTestTable(10)
	h := &session{}
	k := ID(7)
	if tb.want(k) {
		t.Fatal("a key never held was released lately")
	}
	lk := grantOne(t, tb, mustClaim(t, tb, k, false), h)
	if tb.want(k) {
		t.Fatal("a held key was reported released")
	}
	u, _, _ := tb.release(lk)
	if !u.notify {
		t.Fatal("the release of a wanted key does not notify")
	}
	tb.released(u)
	if !tb.want(k) {
		t.Fatal("a key just released is not reported released lately")
	}
	// Once per release: a waiter that heard, tried and failed (the key went
	// to another) and asks again waits for the next release, instead of
	// being told again and again.
	if tb.want(k) {
		t.Fatal("a release was reported twice")
	}
	// Asked for while its unlock is on its way (sent without a notification):
	// released says to tell.
	lk = grantOne(t, tb, mustClaim(t, tb, k, false), h)
	u, _, _ = tb.release(lk)
	if u.notify || tb.want(k) {
		t.Fatal("setup")
	}
	if !tb.released(u) {
		t.Fatal("a want heard during the release is not told")
	}
	// wanted does not outlive the hold.
	lk = grantOne(t, tb, mustClaim(t, tb, k, false), h)
	if u, _, _ := tb.release(lk); u.notify {
		t.Fatal("a new hold inherited the old one's want")
	} else if tb.released(u) {
		t.Fatal("an unwanted release says to tell")
	}
}

func TestRecentKeysBounded(t *testing.T) {
	var r recentKeys
	for i := range recentMax * 2 {
		r.add(ID(int64(i)))
	}
	if len(r.at) > recentMax || len(r.order) > recentMax {
		t.Fatalf("%d keys, %d in order", len(r.at), len(r.order))
	}
	if !r.has(ID(recentMax*2-1)) || r.has(ID(0)) {
		t.Fatal("kept the wrong keys")
	}
}

func TestPayloads(t *testing.T) {
	keys := []Key{ID(-1), Pair(3, -4), ID(1 << 40)}
	for range 1000 {
		keys = append(keys, ID(int64(len(keys))*1e12))
	}
	ps := payloads(wantedMark, keys)
	if len(ps) < 2 {
		t.Fatalf("%d payloads for %d keys", len(ps), len(keys))
	}
	var got []Key
	for _, p := range ps {
		if len(p) > maxPayload {
			t.Fatalf("payload of %d bytes", len(p))
		}
		kind, ks, ok := parsePayload(p)
		if !ok || kind != wantedMark {
			t.Fatalf("parse %q", p[:20])
		}
		got = append(got, ks...)
	}
	if len(got) != len(keys) || got[1] != Pair(3, -4) || got[0] != ID(-1) {
		t.Fatalf("round trip: %v", got[:3])
	}
	for _, bad := range []string{"", "x 1", "w", "w 1,2,3", "f abc", "w  "} {
		if _, _, ok := parsePayload(bad); ok {
			t.Errorf("%q parsed", bad)
		}
	}
}
