package pglocks

import (
	"context"
	"errors"
	"testing"
	"time"
)

// Losses on the fake server: a session that ends takes its locks with it,
// and every handle on it says so.

// lost waits until every lock of locks reports ErrLockLost, within d.
func lost(t *testing.T, d time.Duration, locks ...*Lock) time.Duration {
	t.Helper()
	began := time.Now()
	for _, lk := range locks {
		select {
		case <-lk.Done():
		case <-time.After(d - time.Since(began)):
			t.Fatalf("%v: not reported lost within %v", lk.Key(), d)
		}
		if !errors.Is(lk.Err(), ErrLockLost) {
			t.Fatalf("%v: Err %v, want ErrLockLost", lk.Key(), lk.Err())
		}
	}
	return time.Since(began)
}

// The server terminates sessions holding locks: with a driver whose idle
// socket can be read, the watcher hears it at once (the heartbeat is 5s
// here); every handle on the session reports ErrLockLost, and only those.
func TestFakeLossTerminatedWatched(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src, WithMaxConns(3), WithHeartbeat(5*time.Second, time.Second))
	ctx := context.Background()
	var onPrimary []*Lock
	for _, k := range []Key{ID(1), ID(2), Pair(3, 3)} {
		lk, err := l.TryLock(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		onPrimary = append(onPrimary, lk)
	}
	shared, err := l.TryLock(ctx, ID(4), Shared())
	if err != nil {
		t.Fatal(err)
	}
	joined, err := l.TryLock(ctx, ID(4), Shared()) // the same hold, two handles
	if err != nil {
		t.Fatal(err)
	}
	onPrimary = append(onPrimary, shared, joined)
	other := srv.session()
	other.mustTry(t, ID(9))
	res := lockAsync(ctx, l, ID(9))
	fakeWaitFor(t, "the wait queued", func() bool { return len(srv.queuedOn(ID(9))) == 1 })
	other.unlock(false, ID(9))
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	own := r.lk // on a session of its own
	primary, ownPID := srv.heldByPID(ID(1)), srv.heldByPID(ID(9))
	fakeWaitFor(t, "both sessions watched", func() bool {
		w := srv.watched()
		return slicesContain(w, primary) && slicesContain(w, ownPID)
	})
	srv.terminate(primary)
	took := lost(t, 500*time.Millisecond, onPrimary...)
	t.Logf("the primary's locks reported lost %v after the server ended it", took)
	if own.Err() != nil {
		t.Fatalf("a lock on another session: %v", own.Err())
	}
	srv.terminate(ownPID)
	lost(t, 500*time.Millisecond, own)
	if n := l.Stat().Losses(); n != 6 {
		t.Fatalf("Stat counts %d losses, want 6", n)
	}
	// The loss is reported first, then the session closed.
	fakeWaitFor(t, "the ended sessions closed", func() bool { return src.stat().destroyed == 2 })
	if st := src.stat(); st.released != 0 {
		t.Fatalf("an ended session was given back: %+v", st)
	}
	// The Locker goes on, on a new session.
	lk, err := l.TryLock(ctx, ID(1))
	if err != nil {
		t.Fatal(err)
	}
	if err := lk.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// Without a readable idle socket (lib/pq), the heartbeat finds the ended
// session: its locks are lost within an interval and a timeout.
func TestFakeLossTerminatedHeartbeat(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	src.setCaps(libpqCaps)
	l := newFakeLocker(t, src, WithHeartbeat(50*time.Millisecond, 100*time.Millisecond),
		WithStatementTimeout(100*time.Millisecond))
	ctx := context.Background()
	a, err := l.TryLock(ctx, ID(1))
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.TryLock(ctx, ID(2))
	if err != nil {
		t.Fatal(err)
	}
	probes := srv.count("pid")
	srv.terminate(srv.heldByPID(ID(1)))
	took := lost(t, time.Second, a, b)
	t.Logf("reported lost %v after the server ended the session", took)
	if srv.count("pid") == probes {
		t.Fatal("no heartbeat probe found the loss")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// Do's fn sees its ctx cancelled with the loss as its cause, and Do
// returns an error matching ErrLockLost.
func TestFakeLossDo(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src)
	ctx := context.Background()
	running := make(chan struct{})
	var cause error
	done := make(chan error, 1)
	go func() {
		done <- l.Do(ctx, ID(1), func(ctx context.Context) error {
			close(running)
			<-ctx.Done()
			cause = context.Cause(ctx)
			return nil
		})
	}()
	<-running
	fakeWaitFor(t, "the primary watched", func() bool { return len(srv.watched()) == 1 })
	srv.connOf(srv.heldByPID(ID(1))).cutNetwork()
	select {
	case err := <-done:
		if !errors.Is(err, ErrLockLost) || !errors.Is(cause, ErrLockLost) {
			t.Fatalf("Do: %v; fn's ctx cause: %v", err, cause)
		}
	case <-time.After(time.Second):
		t.Fatal("Do's fn was not told of the loss")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// A session that the server ends during a statement: that statement fails
// (a try is retried on a fresh session), and the session's other locks are
// reported lost.
func TestFakeLossDiesMidStatement(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src)
	ctx := context.Background()
	held, err := l.TryLock(ctx, ID(1))
	if err != nil {
		t.Fatal(err)
	}
	pid := srv.heldByPID(ID(1))
	srv.faultOnce(func(st *fakeStmt) bool { return st.kind == "try" }, fakeFault{die: true})
	lk, err := l.TryLock(ctx, ID(2))
	if err != nil {
		t.Fatalf("TryLock, retried on a fresh session: %v", err)
	}
	if p := srv.heldByPID(ID(2)); p == pid || p == 0 {
		t.Fatalf("2 held by %v; the session that died was %d", srv.holdersOf(ID(2)), pid)
	}
	lost(t, 500*time.Millisecond, held)
	if n := srv.lateStatements(pid); n != 0 {
		t.Fatalf("%d statements sent on the session after it died", n)
	}
	if err := lk.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// A statement that never returns on a session holding locks (the server
// silent): the heartbeat closes the socket under it once it has run longer
// than the heartbeat timeout, the statement fails, and the session's locks
// are reported lost.
func TestFakeLossHungStatementCut(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	src := srv.source(4)
	l := newFakeLocker(t, src, WithHeartbeat(50*time.Millisecond, 100*time.Millisecond))
	ctx := context.Background()
	a, err := l.TryLock(ctx, ID(1))
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.TryLock(ctx, ID(2))
	if err != nil {
		t.Fatal(err)
	}
	srv.faultOnce(func(st *fakeStmt) bool { return st.kind == "unlock" }, fakeFault{silent: true})
	began := time.Now()
	done := make(chan error, 1)
	go func() { done <- a.Release(ctx) }()
	select {
	case err = <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Release on a silent server did not return")
	}
	took := time.Since(began)
	t.Logf("Release returned after %v: %v", took, err)
	if err == nil || took < 100*time.Millisecond {
		t.Fatalf("Release: %v after %v; want a failure once the heartbeat cut the socket", err, took)
	}
	lost(t, 500*time.Millisecond, b)
	if st := src.stat(); st.destroyed != 1 {
		t.Fatalf("the cut session was not closed: %+v", st)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}
