package pglocks

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// The multiplexer on the fake server: waits beyond the Locker's sessions,
// tried together on the primary.

// muxWaiters starts a Lock of each key, and waits until one waits in the
// server's queue and the rest are multiplexed (WithMaxConns(2)).
func muxWaiters(t *testing.T, srv *fakeServer, l *Locker, ctx context.Context, keys []Key) []<-chan fakeLockResult {
	t.Helper()
	var res []<-chan fakeLockResult
	for _, k := range keys {
		res = append(res, lockAsync(ctx, l, k))
	}
	fakeWaitFor(t, "one wait in the server's queue, the rest multiplexed", func() bool {
		st := l.Stat()
		return st.WaitingServer() == 1 && st.WaitingMultiplexed() == len(keys)-1
	})
	return res
}

func idKeys(from, n int) []Key {
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = ID(int64(from + i))
	}
	return keys
}

// wantedKeys returns the keys that notifications received by c say are
// wanted ("w ...").
func wantedKeys(c *fakeConn, seen map[Key]bool) map[Key]bool {
	for _, n := range c.takeNotes() {
		if kind, keys, ok := fakeParsePayload(n.Payload); ok && kind == 'w' {
			for _, k := range keys {
				seen[k] = true
			}
		}
	}
	return seen
}

// Fifty waiters for keys held by another session: one waits in the
// server's queue, the others multiplexed, and say which keys they want.
// When the holder lets go (without telling), the poller finds the keys
// free: every waiter gets its lock, the multiplexed ones on the primary.
func TestFakeMuxManyWaiters(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src, WithMaxConns(2))
	ctx := context.Background()
	other := srv.session()
	other.listen(fakeChannel)
	keys := idKeys(1, 50)
	other.mustTry(t, keys...)
	res := muxWaiters(t, srv, l, ctx, keys)
	wanted := map[Key]bool{}
	fakeWaitFor(t, "the multiplexed keys said wanted", func() bool { return len(wantedKeys(other, wanted)) == 49 })
	if st := src.stat(); st.inUse != 2 {
		t.Fatalf("%d sessions for 50 waits; WithMaxConns(2)", st.inUse)
	}
	other.unlock(false, keys...)
	var locks []*Lock
	bySession := map[int32]int{}
	for i, r := range res {
		got := <-r
		if got.err != nil {
			t.Fatalf("%v: %v", keys[i], got.err)
		}
		locks = append(locks, got.lk)
		bySession[srv.heldByPID(keys[i])]++
	}
	if len(bySession) != 2 || !slices.Contains(mapValues(bySession), 49) {
		t.Fatalf("locks by session: %v; want 49 on the primary, 1 on the wait's own", bySession)
	}
	if st := l.Stat(); st.HeldExclusive() != 50 || st.WaitingMultiplexed() != 0 {
		t.Fatalf("Stat: held %d, multiplexed %d", st.HeldExclusive(), st.WaitingMultiplexed())
	}
	for _, lk := range locks {
		if err := lk.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

func mapValues(m map[int32]int) []int {
	var out []int
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// A holder that tells, as another Locker does ("f KEY ..." on the pglocks
// channel), wakes the poller at once, instead of at its next try, which
// backs off up to muxMaxPoll while nothing is granted.
func TestFakeMuxFreedNotificationWakesPoller(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src, WithMaxConns(2))
	ctx := context.Background()
	other := srv.session()
	keys := idKeys(1, 20)
	other.mustTry(t, keys...)
	// The times of the poller's tries.
	var mu sync.Mutex
	var tries []time.Time
	backedOff := make(chan time.Duration, 1)
	srv.onStmt(func(st *fakeStmt) fakeFault {
		if st.kind != "keysTry" {
			return fakeFault{}
		}
		mu.Lock()
		defer mu.Unlock()
		tries = append(tries, time.Now())
		if n := len(tries); n >= 2 {
			if gap := tries[n-1].Sub(tries[n-2]); gap >= 70*time.Millisecond {
				select {
				case backedOff <- gap:
				default:
				}
			}
		}
		return fakeFault{}
	})
	res := muxWaiters(t, srv, l, ctx, keys)
	// Once the poller waits 80 ms or more between tries, its next one is
	// at least twice as far off.
	var gap time.Duration
	select {
	case gap = <-backedOff:
	case <-time.After(3 * time.Second):
		t.Fatal("the poller did not back off")
	}
	mu.Lock()
	last := tries[len(tries)-1]
	mu.Unlock()
	other.unlock(false, keys...)
	other.notify(fakeChannel, fakePayload('f', keys))
	for i, r := range res {
		if got := <-r; got.err != nil {
			t.Fatalf("%v: %v", keys[i], got.err)
		}
	}
	took := time.Since(last)
	t.Logf("the poller's last gap %v; granted %v after its last try", gap, took)
	if took >= gap {
		t.Fatalf("granted %v after the last try: the notification did not wake the poller (its gap was %v)", took, gap)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// Two Lockers on one server: the holder hears that the other's
// multiplexed waiters want its keys, and says so when it lets them go.
func TestFakeMuxTwoLockers(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	holderSrc, waiterSrc := srv.source(4), srv.source(4)
	holding := newFakeLocker(t, holderSrc)
	waiting := newFakeLocker(t, waiterSrc, WithMaxConns(1)) // every wait multiplexed
	ctx := context.Background()
	spy := srv.session()
	spy.listen(fakeChannel)
	keys := idKeys(1, 10)
	var held []*Lock
	for _, k := range keys {
		lk, err := holding.TryLock(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, lk)
	}
	holderPID := srv.heldByPID(keys[0])
	var res []<-chan fakeLockResult
	for _, k := range keys {
		res = append(res, lockAsync(ctx, waiting, k))
	}
	fakeWaitFor(t, "all multiplexed", func() bool { return waiting.Stat().WaitingMultiplexed() == len(keys) })
	wanted := map[Key]bool{}
	fakeWaitFor(t, "the keys said wanted", func() bool { return len(wantedKeys(spy, wanted)) == len(keys) })
	fakeWaitFor(t, "the holder handed the wants on", func() bool { return srv.handled(holderPID) })
	for _, lk := range held {
		if err := lk.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for i, r := range res {
		got := <-r
		if got.err != nil {
			t.Fatalf("%v: %v", keys[i], got.err)
		}
		defer got.lk.Release(ctx)
	}
	told := map[Key]bool{}
	for _, n := range spy.takeNotes() {
		if kind, ks, ok := fakeParsePayload(n.Payload); ok && kind == 'f' && n.PID == uint32(holderPID) {
			for _, k := range ks {
				told[k] = true
			}
		}
	}
	if len(told) != len(keys) {
		t.Fatalf("the holder told %d of the %d wanted keys freed", len(told), len(keys))
	}
}

// A multiplexed wait that gives up leaves nothing held or queued: one
// cancelled while it waits in the process, and one cancelled while the try
// that takes its key is on its way to the server (it lets go of what that
// try got).
func TestFakeMuxCancelledWaiterLeavesNothing(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src, WithMaxConns(2))
	ctx := context.Background()
	other := srv.session()
	keys := idKeys(1, 6)
	other.mustTry(t, keys...)
	cctx := map[Key]context.CancelFunc{}
	var res []<-chan fakeLockResult
	for i, k := range keys {
		c, cancel := context.WithCancel(ctx)
		cctx[k] = cancel
		res = append(res, lockAsync(c, l, k))
		if i == 0 {
			fakeWaitFor(t, "the first in the server's queue", func() bool { return len(srv.queuedOn(k)) == 1 })
		}
	}
	fakeWaitFor(t, "five multiplexed", func() bool { return l.Stat().WaitingMultiplexed() == 5 })
	idle, inFlight := keys[1], keys[2]

	// Cancelled while it waits.
	cctx[idle]()
	if got := <-res[1]; !errors.Is(got.err, context.Canceled) {
		t.Fatalf("%v: %v", idle, got.err)
	}
	if n := l.Stat().WaitingMultiplexed(); n != 4 {
		t.Fatalf("%d multiplexed after one gave up", n)
	}

	// Cancelled while its try is in flight: the key is free by the time
	// the try reaches the server.
	var once sync.Once
	hookErr := make(chan error, 1)
	srv.onStmt(func(st *fakeStmt) fakeFault {
		if st.kind != "keysTry" || !slices.Contains(st.keys, inFlight) {
			return fakeFault{}
		}
		once.Do(func() {
			cctx[inFlight]()
			deadline := time.Now().Add(2 * time.Second)
			for l.Stat().WaitingMultiplexed() != 3 { // it gave up: no longer counted
				if time.Now().After(deadline) {
					hookErr <- errors.New("the waiter did not give up")
					return
				}
				time.Sleep(100 * time.Microsecond)
			}
			other.unlock(false, inFlight)
			hookErr <- nil
		})
		return fakeFault{}
	})
	if err := <-hookErr; err != nil {
		t.Fatal(err)
	}
	if got := <-res[2]; !errors.Is(got.err, context.Canceled) || got.lk != nil {
		t.Fatalf("%v: %v %v", inFlight, got.lk, got.err)
	}
	var ops []string
	for _, e := range srv.eventsOf(inFlight) {
		if e.pid != other.pid() {
			ops = append(ops, e.op)
		}
	}
	if !slices.Contains(ops, "grant") || ops[len(ops)-1] != "unlock" {
		t.Fatalf("the Locker's events on %v: %v; want its grant let go", inFlight, ops)
	}
	if h := srv.holdersOf(inFlight); len(h) != 0 {
		t.Fatalf("%v held by %v after its waiter gave up", inFlight, h)
	}
	// The rest are granted once free; the one cancelled while idle was
	// never taken by the Locker.
	other.unlock(false, keys[0], keys[3], keys[4], keys[5])
	for _, i := range []int{0, 3, 4, 5} {
		got := <-res[i]
		if got.err != nil {
			t.Fatalf("%v: %v", keys[i], got.err)
		}
		if err := got.lk.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range srv.eventsOf(idle) {
		if e.pid != other.pid() && e.op == "grant" {
			t.Fatalf("%v, whose waiter gave up, was granted to session %d", idle, e.pid)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// LockAll waiting multiplexed is all or nothing: its keys are tried in one
// statement, and a try that gets some but not all lets them go at once.
func TestFakeMuxLockAllAllOrNothing(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src, WithMaxConns(1)) // every wait multiplexed
	ctx := context.Background()
	other := srv.session()
	a, b := ID(1), Pair(2, 3)
	other.mustTry(t, a, b)
	var mu sync.Mutex
	var tried [][]Key
	srv.onStmt(func(st *fakeStmt) fakeFault {
		if st.kind == "keysTry" {
			mu.Lock()
			tried = append(tried, st.keys)
			mu.Unlock()
		}
		return fakeFault{}
	})
	done := make(chan error, 1)
	var set *LockSet
	go func() {
		var err error
		set, err = l.LockAll(ctx, []Key{b, a})
		done <- err
	}()
	fakeWaitFor(t, "LockAll multiplexed", func() bool { return l.Stat().WaitingMultiplexed() == 1 })
	other.unlock(false, a)
	other.notify(fakeChannel, "f "+a.String())
	fakeWaitFor(t, "a taken and let go again", func() bool {
		var ops []string
		for _, e := range srv.eventsOf(a) {
			if e.pid != other.pid() {
				ops = append(ops, e.op)
			}
		}
		i := slices.Index(ops, "grant")
		return i >= 0 && i+1 < len(ops) && ops[i+1] == "unlock"
	})
	select {
	case err := <-done:
		t.Fatalf("LockAll returned with one of its keys held elsewhere: %v", err)
	default:
	}
	if h := srv.holdersOf(a); len(h) != 0 {
		t.Fatalf("%v held by %v while LockAll waits for %v", a, h, b)
	}
	other.unlock(false, b)
	other.notify(fakeChannel, "f "+b.String())
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	pa, pb := srv.heldByPID(a), srv.heldByPID(b)
	if pa == 0 || pa != pb {
		t.Fatalf("a held by %d, b by %d: want both on the primary", pa, pb)
	}
	mu.Lock()
	for _, ks := range tried {
		if len(ks) != 2 || !slices.Contains(ks, a) || !slices.Contains(ks, b) {
			t.Errorf("a multiplexed try of %v: want both keys in one statement", ks)
		}
	}
	mu.Unlock()
	if err := set.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// A multiplexed try of several keys that fills the server's lock table
// midway: the keys it took before stay held on the server (session locks
// outlive the failed statement), so the Locker lets them go; the waiter
// fails with ErrLockTableFull, and the session is kept.
//
// (Found by this test: the full-table handler once scanned the unlock's
// text row into an int64, failed, and closed the primary.)
func TestFakeMuxLockTableFullMidStatement(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src, WithMaxConns(1))
	ctx := context.Background()
	other := srv.session()
	keys := []Key{ID(1), ID(2), ID(3)}
	other.mustTry(t, keys...)
	done := make(chan error, 1)
	go func() {
		_, err := l.LockAll(ctx, keys)
		done <- err
	}()
	fakeWaitFor(t, "LockAll multiplexed", func() bool { return l.Stat().WaitingMultiplexed() == 1 })
	// Room for two of the three once the other session lets them go (its
	// three entries held now are counted).
	srv.setLockTable(srv.entries() - 1)
	other.unlock(false, keys...)
	other.notify(fakeChannel, "f 1 2 3")
	err := <-done
	if !errors.Is(err, ErrLockTableFull) {
		t.Fatalf("LockAll: %v, want ErrLockTableFull", err)
	}
	for _, k := range keys {
		if h := srv.holdersOf(k); len(h) != 0 {
			t.Fatalf("%v held by %v after the failed try", k, h)
		}
	}
	if st := src.stat(); st.destroyed != 0 || st.acquired != 1 {
		t.Fatalf("the session was not kept: %+v", st)
	}
	if !strings.Contains(err.Error(), "out of shared memory") {
		t.Fatalf("the server's error is not carried: %v", err)
	}
	srv.setLockTable(0)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}
