package pglocks

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// How a wait in the server's queue, on a session of its own, stops.

// fakeSlack is how late past its due time a wait may end, for a loaded
// machine (the race detector, GOMAXPROCS=1, the tests in parallel).
const fakeSlack = 600 * time.Millisecond

var waitDrivers = []struct {
	name string
	caps fakeCaps
}{
	{"pgx", pgxCaps},     // interruptible, sends cancel requests
	{"libpq", libpqCaps}, // neither: pg_cancel_backend from the primary; runStmt abandons
}

// waitSetup returns a Locker whose Lock of key waits in the server's
// queue behind another session.
func waitSetup(t *testing.T, caps fakeCaps, key Key, opts ...Option) (*fakeServer, *fakeSource, *Locker, *fakeConn) {
	t.Helper()
	srv := newFakeServer(t)
	src := srv.source(4)
	src.setCaps(caps)
	l := newFakeLocker(t, src, append([]Option{WithStatementTimeout(100 * time.Millisecond)}, opts...)...)
	other := srv.session()
	other.mustTry(t, key)
	return srv, src, l, other
}

// nothingLeft checks that the Locker's sessions hold and wait for nothing.
func nothingLeft(t *testing.T, srv *fakeServer, src *fakeSource) {
	t.Helper()
	if h := heldOnPools(srv, src); len(h) != 0 {
		t.Fatalf("held on the Locker's sessions: %v", h)
	}
	if q := queuedFromPools(srv, src); len(q) != 0 {
		t.Fatalf("the Locker's sessions still wait for %v", q)
	}
}

// A cancelled ctx stops the wait on the server: Lock returns an error
// matching context.Canceled, and nothing of it is held or queued; the wait's
// session is closed, not given back.
func TestFakeWaitCancelled(t *testing.T) {
	t.Parallel()
	for _, d := range waitDrivers {
		t.Run(d.name, func(t *testing.T) {
			t.Parallel()
			srv, src, l, _ := waitSetup(t, d.caps, ID(1))
			ctx, cancel := context.WithCancel(context.Background())
			res := lockAsync(ctx, l, ID(1))
			fakeWaitFor(t, "the wait queued", func() bool { return len(srv.queuedOn(ID(1))) == 1 })
			cancel()
			r := <-res
			if !errors.Is(r.err, context.Canceled) || r.lk != nil {
				t.Fatalf("Lock: %v %v", r.lk, r.err)
			}
			nothingLeft(t, srv, src)
			if st := l.Stat(); st.WaitingServer() != 0 || st.Cancelled() != 1 {
				t.Fatalf("Stat: waiting %d, cancelled %d", st.WaitingServer(), st.Cancelled())
			}
			fakeWaitFor(t, "the wait's session closed", func() bool { return src.stat().destroyed == 1 })
			if d.name == "libpq" && srv.count("cancel") == 0 {
				t.Fatal("no pg_cancel_backend for a driver without cancel requests")
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			checkFakeClean(t, srv, src)
		})
	}
}

// A deadline is the server's lock_timeout: the wait ends there with an
// error matching context.DeadlineExceeded, without a cancel request or a
// cut socket.
func TestFakeWaitDeadlineIsLockTimeout(t *testing.T) {
	t.Parallel()
	for _, d := range waitDrivers {
		t.Run(d.name, func(t *testing.T) {
			t.Parallel()
			srv, src, l, _ := waitSetup(t, d.caps, ID(1))
			began := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Millisecond)
			defer cancel()
			_, err := l.Lock(ctx, ID(1))
			took := time.Since(began)
			if !errors.Is(err, context.DeadlineExceeded) || fakeSQLState(err) != "55P03" {
				t.Fatalf("Lock: %v; want DeadlineExceeded from lock_timeout (55P03)", err)
			}
			srv.mu.Lock()
			timeouts, cancels := srv.timeouts, srv.cancels
			srv.mu.Unlock()
			if timeouts != 1 || cancels != 0 {
				t.Fatalf("lock timeouts %d, cancel requests %d; want 1 and 0", timeouts, cancels)
			}
			if took < 60*time.Millisecond || took > 60*time.Millisecond+fakeSlack {
				t.Fatalf("Lock took %v for a 60ms deadline (grace 100ms)", took)
			}
			nothingLeft(t, srv, src)
			if st := l.Stat(); st.Timeouts() != 1 {
				t.Fatalf("Stat counts %d timeouts", st.Timeouts())
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			checkFakeClean(t, srv, src)
		})
	}
}

// A cancel that races the grant: whichever way it goes, Lock either returns
// the lock (held on the server by the Locker) or fails and holds nothing.
// Two orders are forced: the grant answered before the cancel arrives, and
// the cancel arriving after the grant but before its answer (the server
// then reports 57014 with the lock held); then both race freely.
func TestFakeWaitCancelRacesGrant(t *testing.T) {
	t.Parallel()
	for _, d := range waitDrivers {
		t.Run(d.name+"/grant answered first", func(t *testing.T) {
			t.Parallel()
			srv, src, l, other := waitSetup(t, d.caps, ID(1))
			ctx, cancel := context.WithCancel(context.Background())
			res := lockAsync(ctx, l, ID(1))
			fakeWaitFor(t, "the wait queued", func() bool { return len(srv.queuedOn(ID(1))) == 1 })
			waitPID := srv.queuedOn(ID(1))[0]
			var once sync.Once
			srv.onCancel(func(pid int32) {
				once.Do(func() {
					other.unlock(false, ID(1)) // granted, and answered, just as the cancel is sent
					for i := 0; i < 2000 && slicesContain(srv.runningOn(), waitPID); i++ {
						time.Sleep(100 * time.Microsecond)
					}
				})
			})
			cancel()
			checkRaceOutcome(t, srv, src, <-res)
		})
		t.Run(d.name+"/cancel after the grant", func(t *testing.T) {
			t.Parallel()
			srv, src, l, other := waitSetup(t, d.caps, ID(1))
			never := make(chan struct{})
			srv.onStmt(func(st *fakeStmt) fakeFault {
				if st.kind == "wait" {
					return fakeFault{gate: never} // granted, but not answered until cancelled
				}
				return fakeFault{}
			})
			var once sync.Once
			srv.onCancel(func(pid int32) { once.Do(func() { other.unlock(false, ID(1)) }) })
			ctx, cancel := context.WithCancel(context.Background())
			res := lockAsync(ctx, l, ID(1))
			fakeWaitFor(t, "the wait queued", func() bool { return len(srv.queuedOn(ID(1))) == 1 })
			waitPID := srv.queuedOn(ID(1))[0]
			cancel()
			r := <-res
			if r.err == nil {
				t.Fatal("Lock succeeded, though the server failed the wait (57014)")
			}
			checkRaceOutcome(t, srv, src, r)
			var ops []string
			for _, e := range srv.eventsOf(ID(1)) {
				if e.pid == waitPID {
					ops = append(ops, e.op)
				}
			}
			if fmt.Sprint(ops) != "[queue grant free]" {
				t.Fatalf("the wait's session on 1: %v; want queued, granted, then freed", ops)
			}
		})
		t.Run(d.name+"/free race", func(t *testing.T) {
			t.Parallel()
			srv, src, l, other := waitSetup(t, d.caps, ID(1))
			won := 0
			for i := range 20 {
				if i > 0 {
					other.mustTry(t, ID(1))
				}
				ctx, cancel := context.WithCancel(context.Background())
				res := lockAsync(ctx, l, ID(1))
				fakeWaitFor(t, "the wait queued", func() bool { return len(srv.queuedOn(ID(1))) == 1 })
				var wg sync.WaitGroup
				wg.Go(func() { other.unlock(false, ID(1)) })
				wg.Go(cancel)
				wg.Wait()
				r := <-res
				checkRaceOutcome(t, srv, src, r)
				if r.lk != nil {
					won++
					if err := r.lk.Release(context.Background()); err != nil {
						t.Fatal(err)
					}
				}
				fakeWaitFor(t, "1 free", func() bool { return len(srv.holdersOf(ID(1))) == 0 })
			}
			t.Logf("the lock won %d of 20 races", won)
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			checkFakeClean(t, srv, src)
		})
	}
}

// lockWithin runs a Lock that must fail, failing t if it has not returned
// within d (the fake's cleanup then cuts what it waits for).
func lockWithin(t *testing.T, l *Locker, ctx context.Context, key Key, d time.Duration) error {
	t.Helper()
	select {
	case r := <-lockAsync(ctx, l, key):
		if r.lk != nil {
			t.Fatalf("Lock of %v succeeded", key)
		}
		return r.err
	case <-time.After(d):
		t.Fatalf("Lock of %v did not return within %v", key, d)
	}
	return nil
}

func slicesContain(s []int32, v int32) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// checkRaceOutcome: the lock was returned and is held by the Locker, or
// Lock failed with ctx's error and the Locker holds and waits for nothing.
func checkRaceOutcome(t *testing.T, srv *fakeServer, src *fakeSource, r fakeLockResult) {
	t.Helper()
	if r.err == nil {
		pid := srv.heldByPID(ID(1))
		if pid == 0 || srv.connOf(pid) == nil || !slicesContain(src.sessionsInUse(), pid) {
			t.Fatalf("Lock returned the lock, but the server says 1 is held by %v", srv.holdersOf(ID(1)))
		}
		return
	}
	if !errors.Is(r.err, context.Canceled) {
		t.Fatalf("Lock: %v", r.err)
	}
	nothingLeft(t, srv, src)
}

// A server that never answers the wait (a silent network): with an
// interruptible driver the socket is cut at the deadline plus the grace
// (WithStatementTimeout), or, for a cancelled ctx, once cancel requests have
// gone unanswered for the grace; Lock returns then.
func TestFakeWaitSilentServerInterruptible(t *testing.T) {
	t.Parallel()
	for _, deadline := range []bool{true, false} {
		t.Run(fmt.Sprintf("deadline=%v", deadline), func(t *testing.T) {
			t.Parallel()
			srv, src, l, _ := waitSetup(t, pgxCaps, ID(1))
			srv.faultOnce(func(st *fakeStmt) bool { return st.kind == "wait" }, fakeFault{silent: true})
			const wait, grace = 50 * time.Millisecond, 100 * time.Millisecond
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			if !deadline {
				ctx, cancel = context.WithCancel(context.Background())
				time.AfterFunc(wait, cancel)
			}
			defer cancel()
			began := time.Now()
			err := lockWithin(t, l, ctx, ID(1), 2*time.Second)
			took := time.Since(began)
			want := context.Canceled
			if deadline {
				want = context.DeadlineExceeded
			}
			if !errors.Is(err, want) {
				t.Fatalf("Lock: %v, want %v", err, want)
			}
			t.Logf("Lock returned after %v", took)
			if took < wait+grace-10*time.Millisecond || took > wait+grace+fakeSlack {
				t.Fatalf("Lock returned after %v; the socket is to be cut at %v + %v", took, wait, grace)
			}
			fakeWaitFor(t, "the silent session closed", func() bool { return src.stat().destroyed == 1 })
			nothingLeft(t, srv, src)
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			checkFakeClean(t, srv, src)
		})
	}
}

// With a driver that cannot interrupt a statement (lib/pq on a silent
// network), the wait is abandoned: Lock returns within the deadline and
// twice the grace, the session no longer counts against WithMaxConns, and
// it is closed once the driver comes back.
func TestFakeWaitSilentServerAbandoned(t *testing.T) {
	t.Parallel()
	srv, src, l, _ := waitSetup(t, libpqCaps, ID(1))
	var waitConn *fakeConn
	var mu sync.Mutex
	srv.faultOnce(func(st *fakeStmt) bool {
		if st.kind == "wait" {
			mu.Lock()
			waitConn = st.conn
			mu.Unlock()
			return true
		}
		return false
	}, fakeFault{silent: true})
	const wait, grace = 50 * time.Millisecond, 100 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	began := time.Now()
	err := lockWithin(t, l, ctx, ID(1), 2*time.Second)
	took := time.Since(began)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock: %v", err)
	}
	t.Logf("Lock returned after %v", took)
	if took > wait+2*grace+fakeSlack {
		t.Fatalf("Lock returned after %v; it is to give up within %v + 2×%v", took, wait, grace)
	}
	mu.Lock()
	c := waitConn
	mu.Unlock()
	if !slicesContain(srv.runningOn(), c.pid()) {
		t.Fatal("setup: the abandoned statement is not running")
	}
	if st := l.Stat(); st.Sessions() != 1 || st.WaitingServer() != 0 {
		t.Fatalf("Stat: sessions %d, waiting %d; the abandoned session must not count", st.Sessions(), st.WaitingServer())
	}
	if st := src.stat(); st.destroyed != 0 {
		t.Fatalf("closed while its statement runs: %+v", st)
	}
	c.heal() // the statement reaches the server, and its lock_timeout ends it
	fakeWaitFor(t, "the abandoned session closed", func() bool { return src.stat().destroyed == 1 })
	nothingLeft(t, srv, src)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	checkFakeClean(t, srv, src)
}

// Close while a wait is in the server's queue: the wait ends with
// ErrClosed, and nothing of it stays held or queued.
func TestFakeWaitClosed(t *testing.T) {
	t.Parallel()
	for _, d := range waitDrivers {
		t.Run(d.name, func(t *testing.T) {
			t.Parallel()
			srv, src, l, _ := waitSetup(t, d.caps, ID(1))
			res := lockAsync(context.Background(), l, ID(1))
			fakeWaitFor(t, "the wait queued", func() bool { return len(srv.queuedOn(ID(1))) == 1 })
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			if r := <-res; !errors.Is(r.err, ErrClosed) || r.lk != nil {
				t.Fatalf("Lock at Close: %v %v", r.lk, r.err)
			}
			nothingLeft(t, srv, src)
			checkFakeClean(t, srv, src)
		})
	}
}
