package pglocks

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The batch runner on the fake server: many goroutines' statements on one
// session, pipelined, and what a failure in a batch does to the others.

// primaryPID returns the session of the Locker's locks on the primary: the
// one holding lk.
func primaryPID(t *testing.T, srv *fakeServer, lk *Lock) int32 {
	t.Helper()
	pid := srv.heldByPID(lk.Key())
	if pid == 0 {
		t.Fatalf("%v is not held on the fake", lk.Key())
	}
	return pid
}

// holdTries holds up the try of key on the server until the returned
// release is called, so that statements queued meanwhile on the session go
// together in the next round trip.
func holdTries(srv *fakeServer, key Key) (entered <-chan struct{}, release func()) {
	gate := make(chan struct{})
	in := make(chan struct{})
	var once sync.Once
	srv.onStmt(func(st *fakeStmt) fakeFault {
		if st.kind == "try" && len(st.keys) == 1 && st.keys[0] == key {
			once.Do(func() { close(in) })
			<-gate
		}
		return fakeFault{}
	})
	return in, func() { close(gate) }
}

// A lock table that fills up during one statement of a pipelined batch
// fails that caller with ErrLockTableFull; the server skipped what came
// after it in the batch, which is sent again: everyone else gets their
// lock, on the same session, which is kept.
func TestFakeBatchLockTableFullKeepsSession(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src)
	ctx := context.Background()
	first, err := l.TryLock(ctx, ID(1000))
	if err != nil {
		t.Fatal(err)
	}
	pid := primaryPID(t, srv, first)
	full := ID(500)
	srv.faultOnce(func(st *fakeStmt) bool {
		return st.kind == "try" && len(st.keys) == 1 && st.keys[0] == full
	}, fakeFault{err: fakeLockTableFull()})
	entered, release := holdTries(srv, ID(999))
	gated := make(chan error, 1)
	go func() {
		lk, err := l.TryLock(ctx, ID(999))
		if err == nil {
			err = lk.Release(ctx)
		}
		gated <- err
	}()
	<-entered // the session's leader is in a round trip: the rest queue up

	type result struct {
		keys []Key
		err  error
		rel  func() error
	}
	results := make(chan result, 20)
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Go(func() {
			k := ID(int64(i + 1))
			lk, err := l.TryLock(ctx, k)
			r := result{keys: []Key{k}, err: err}
			if err == nil {
				r.rel = func() error { return lk.Release(ctx) }
			}
			results <- r
		})
	}
	for i := range 5 {
		wg.Go(func() {
			keys := []Key{ID(int64(100 + 3*i)), ID(int64(101 + 3*i)), ID(int64(102 + 3*i))}
			if i == 2 {
				keys = []Key{ID(499), full, ID(501)} // the lock table fills up at its second
			}
			set, err := l.TryLockAll(ctx, keys)
			r := result{keys: keys, err: err}
			if err == nil {
				r.rel = func() error { return set.Release(ctx) }
			}
			results <- r
		})
	}
	release()
	wg.Wait()
	close(results)
	if err := <-gated; err != nil {
		t.Fatal(err)
	}
	var rels []func() error
	for r := range results {
		if r.keys[0] == ID(499) {
			if !errors.Is(r.err, ErrLockTableFull) {
				t.Fatalf("the caller whose try found the lock table full: %v", r.err)
			}
			for _, k := range r.keys {
				if h := srv.holdersOf(k); len(h) != 0 {
					t.Fatalf("%v held by %v after its TryLockAll failed", k, h)
				}
			}
			continue
		}
		if r.err != nil {
			t.Fatalf("%v: %v", r.keys, r.err)
		}
		for _, k := range r.keys {
			if got := srv.holdersOf(k); len(got) != 1 || got[0] != pid {
				t.Fatalf("%v held by %v, want the primary %d", k, got, pid)
			}
		}
		rels = append(rels, r.rel)
	}
	// The failed statement was in the middle of a pipelined batch, with
	// statements after it.
	mid := false
	for _, b := range srv.batchList() {
		mid = mid || b.failed >= 1 && b.n > b.failed+1
	}
	if !mid {
		t.Fatalf("no batch failed in its middle: %+v", srv.batchList())
	}
	if st := src.stat(); st.destroyed != 0 || st.acquired != 1 {
		t.Fatalf("the session was not kept: %+v", st)
	}
	if first.Err() != nil {
		t.Fatalf("a lock on the kept session: %v", first.Err())
	}
	for _, rel := range rels {
		if err := rel(); err != nil {
			t.Fatal(err)
		}
	}
	if err := first.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// Many goroutines taking and releasing locks on one session, some of whose
// tries find the lock table full: only those fail, pipelined batches carry
// the rest, and the session is never given up.
func TestFakeBatchManyGoroutinesOneSession(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src)
	ctx := context.Background()
	var tries, injected atomic.Int32
	srv.onStmt(func(st *fakeStmt) fakeFault {
		if st.kind == "try" && len(st.keys) == 1 && st.keys[0] != ID(999) && tries.Add(1)%7 == 0 {
			injected.Add(1)
			return fakeFault{err: fakeLockTableFull()}
		}
		return fakeFault{}
	})
	// The session's leader is held up at first, so that the goroutines'
	// first tries queue up together whatever the scheduling.
	entered, release := holdTries(srv, ID(999))
	gated := make(chan error, 1)
	go func() {
		lk, err := l.TryLock(ctx, ID(999))
		if err == nil {
			err = lk.Release(ctx)
		}
		gated <- err
	}()
	<-entered
	time.AfterFunc(10*time.Millisecond, release) // the goroutines below queue meanwhile
	var full atomic.Int32
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() {
			for i := range 30 {
				k := Pair(int32(g), int32(i%3))
				lk, err := l.TryLock(ctx, k)
				switch {
				case errors.Is(err, ErrLockTableFull):
					full.Add(1)
					continue
				case err != nil:
					t.Errorf("%v: %v", k, err)
					return
				}
				if err := lk.Release(ctx); err != nil {
					t.Errorf("%v: release: %v", k, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err := <-gated; err != nil {
		t.Fatal(err)
	}
	pipelined := 0
	for _, b := range srv.batchList() {
		if b.n > 1 {
			pipelined++
		}
	}
	t.Logf("%d batches of several statements; %d tries failed by injection", pipelined, injected.Load())
	if pipelined == 0 {
		t.Fatal("nothing was pipelined")
	}
	if full.Load() != injected.Load() {
		t.Fatalf("%d callers saw ErrLockTableFull, %d tries were failed", full.Load(), injected.Load())
	}
	if st := src.stat(); st.destroyed != 0 || st.acquired != 1 {
		t.Fatalf("the session was not kept: %+v", st)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// A failure that is not the server's (the socket cut) in a pipelined batch
// ends the session: every lock on it is reported lost, and the session is
// closed, never given back. The TryLockAll whose batch it was is retried
// once on a fresh session. (No watcher: the batch's own failure must tell.)
func TestFakeBatchCutSocketLosesLocks(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	caps := pgxCaps
	caps.watchable = false
	src.setCaps(caps)
	l := newFakeLocker(t, src)
	ctx := context.Background()
	var held []*Lock
	for _, k := range []Key{ID(1), ID(2), Pair(3, 4)} {
		lk, err := l.TryLock(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, lk)
	}
	pid := primaryPID(t, srv, held[0])
	srv.faultOnce(func(st *fakeStmt) bool {
		return st.kind == "try" && st.row == 1 && len(st.keys) == 1 && st.keys[0] == ID(600)
	}, fakeFault{cut: true})
	set, err := l.TryLockAll(ctx, []Key{ID(599), ID(600), ID(601)})
	if err != nil {
		t.Fatalf("TryLockAll, retried on a fresh session: %v", err)
	}
	for _, lk := range held {
		select {
		case <-lk.Done():
		default:
			t.Fatalf("%v: Done not closed", lk.Key())
		}
		if !errors.Is(lk.Err(), ErrLockLost) {
			t.Fatalf("%v: %v", lk.Key(), lk.Err())
		}
	}
	if n := l.Stat().Losses(); n != 3 {
		t.Fatalf("Stat counts %d losses, want 3", n)
	}
	if st := src.stat(); st.destroyed != 1 {
		t.Fatalf("the cut session was not closed: %+v", st)
	}
	if n := srv.lateStatements(pid); n != 0 {
		t.Fatalf("%d statements sent on the cut session after its batch failed", n)
	}
	if h := srv.heldBy(pid); len(h) != 0 {
		t.Fatalf("the cut session holds %v", h)
	}
	for _, k := range []Key{ID(599), ID(600), ID(601)} {
		if got := srv.holdersOf(k); len(got) != 1 || got[0] == pid {
			t.Fatalf("%v held by %v; the cut session was %d", k, got, pid)
		}
	}
	if err := set.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := held[0].Release(ctx); !errors.Is(err, ErrLockLost) {
		t.Fatalf("Release of a lost lock: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// An unlock that the server answers false (the lock was not held: something
// else let it go on the session) means the session cannot be trusted: it is
// closed, and the other locks on it are reported lost. Alone and in a batch.
func TestFakeBatchUnlockNotHeldClosesSession(t *testing.T) {
	t.Parallel()
	for _, many := range []bool{false, true} {
		t.Run(fmt.Sprintf("batch=%v", many), func(t *testing.T) {
			t.Parallel()
			srv := newFakeServer(t)
			src := srv.source(4)
			l := newFakeLocker(t, src)
			ctx := context.Background()
			keep, err := l.TryLock(ctx, ID(9))
			if err != nil {
				t.Fatal(err)
			}
			set, err := l.TryLockAll(ctx, []Key{ID(1), ID(2), ID(3)})
			if err != nil {
				t.Fatal(err)
			}
			pid := primaryPID(t, srv, keep)
			srv.connOf(pid).unlock(false, ID(2)) // behind the Locker's back
			if many {
				err = set.Release(ctx)
			} else {
				err = set.Locks()[1].Release(ctx)
			}
			if err == nil || !strings.Contains(err.Error(), "connection was closed") {
				t.Fatalf("Release of a lock the server says was not held: %v", err)
			}
			fakeWaitFor(t, "the other lock reported lost", func() bool { return errors.Is(keep.Err(), ErrLockLost) })
			if st := src.stat(); st.destroyed != 1 || st.released != 0 {
				t.Fatalf("the session was not closed: %+v", st)
			}
			if h := srv.heldBy(pid); len(h) != 0 {
				t.Fatalf("the closed session holds %v", h)
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			checkFakeClean(t, srv, src)
		})
	}
}

// A notification queued in a pipelined batch before a statement that fails
// is not sent (the batch's transaction aborted): the batch runner sends it
// again, so the other Locker hears once that the key is free.
func TestFakeBatchNotificationResentAfterFailure(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src)
	ctx := context.Background()
	spy := srv.session() // another Locker's listening session
	spy.listen(fakeChannel)
	// Whether the failing try lands after the notification in one batch
	// depends on the order two goroutines queue in: try until it did.
	exercised := false
	for attempt := int64(0); attempt < 20 && !exercised; attempt++ {
		k, fail, hold := ID(100+attempt), ID(200+attempt), ID(300+attempt)
		lk, err := l.TryLock(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		pid := primaryPID(t, srv, lk)
		// The other Locker wants k: its release will notify.
		spy.notify(fakeChannel, "w "+k.String())
		fakeWaitFor(t, "the want handed on", func() bool { return srv.handled(pid) })
		entered, release := holdTries(srv, hold)
		gated := make(chan error, 1)
		go func() {
			lk, err := l.TryLock(ctx, hold)
			if err == nil {
				err = lk.Release(ctx)
			}
			gated <- err
		}()
		<-entered // the rest queue up behind it
		srv.faultOnce(func(st *fakeStmt) bool {
			return st.kind == "try" && len(st.keys) == 1 && st.keys[0] == fail
		}, fakeFault{err: fakeLockTableFull()})
		released := make(chan error, 1)
		go func() { released <- lk.Release(ctx) }()
		time.Sleep(time.Millisecond) // most often queued first; either order is checked
		tried := make(chan error, 1)
		go func() {
			_, err := l.TryLock(ctx, fail)
			tried <- err
		}()
		time.Sleep(time.Millisecond)
		release()
		if err := <-released; err != nil {
			t.Fatal(err)
		}
		if err := <-tried; !errors.Is(err, ErrLockTableFull) {
			t.Fatalf("the try that found the lock table full: %v", err)
		}
		if err := <-gated; err != nil {
			t.Fatal(err)
		}
		var freed []string
		for _, n := range spy.takeNotes() {
			if strings.HasPrefix(n.Payload, "f ") {
				freed = append(freed, n.Payload)
			}
		}
		if want := "f " + k.String(); len(freed) != 1 || freed[0] != want {
			t.Fatalf("notifications of keys freed: %q, want one %q", freed, want)
		}
		for _, b := range srv.batchList() {
			if b.failed > 0 && slices.Contains(b.kinds[:b.failed], "notify") {
				exercised = true
			}
		}
	}
	if !exercised {
		t.Fatal("no batch had its notification undone by a later failure")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}
