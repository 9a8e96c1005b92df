package pglocks

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks/internal/pgtest"
)

func internalServer(t *testing.T) *pgtest.Server {
	srv, err := pgtest.StartLocal(pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return srv
}

func internalPool(t *testing.T, url string, max int32) *pgxpool.Pool {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = max
	p, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func heldBy(t *testing.T, srv *pgtest.Server, objid int) []int32 {
	rows, err := srv.Admin.Query(context.Background(),
		"SELECT pid FROM pg_locks WHERE locktype='advisory' AND granted AND objid=$1 AND objsubid=1", objid)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var pids []int32
	for rows.Next() {
		var p int32
		_ = rows.Scan(&p)
		pids = append(pids, p)
	}
	return pids
}

// Regression (found in review): mux.move's unwait (or any unuse of a session that is neither in
// holders nor spare) after sessions.close leaks the connection: unuse returns
// early on s.closed, and clear never sees it.
func TestWaitSessionHandedBackAfterCloseIsGivenBack(t *testing.T) {
	srv := internalServer(t)
	pool := internalPool(t, srv.URL, 4)
	l, err := New(pool, WithMaxConns(3))
	if err != nil {
		t.Fatal(err)
	}
	// move(): a session is readied for the oldest multiplexed wait ...
	w, err := l.pool.waitSession(l.closeCtx, false)
	if err != nil || w.s == nil {
		t.Fatalf("waitSession: %v %v", w.s, err)
	}
	// ... meanwhile Close begins: the waiter leaves, ops drain, sessions.close runs
	l.table.close()
	l.closeNow()
	l.table.ops.Wait()
	l.pool.close()
	// ... move finds its request gone and hands the session back.
	l.pool.unwait(w)
	// rest of Close
	l.g.wait()
	if err := l.pool.clear(); err != nil {
		t.Fatal(err)
	}
	l.table.closeAll()
	st := pool.Stat()
	t.Logf("after Close: acquired conns %d", st.AcquiredConns())
	if st.AcquiredConns() != 0 {
		w.s.c.release() // so pool.Close does not hang
		pool.Close()
		t.Fatalf("BUG: Close left %d connection(s) acquired from the pool (pool.Close would block forever)", st.AcquiredConns())
	}
	pool.Close()
}

// Regression (found in review): a grant refused because Close began (table.grant -> ErrClosed)
// is not unlocked on the server; unuse then may give the session back to
// the pool with the advisory lock held.
func TestGrantRefusedAtCloseIsUnlocked(t *testing.T) {
	srv := internalServer(t)
	ctx := context.Background()
	pool := internalPool(t, srv.URL, 3)
	defer pool.Close()
	l, err := New(pool, WithMaxConns(3))
	if err != nil {
		t.Fatal(err)
	}
	// The application uses 2 of the pool's 3 connections.
	a1, _ := pool.Acquire(ctx)
	a2, _ := pool.Acquire(ctx)
	defer a1.Release()
	defer a2.Release()

	if !l.table.begin() {
		t.Fatal("closed")
	}
	_, e, _, err := l.table.claim(ID(77), false, true)
	if err != nil || e == nil {
		t.Fatal(err)
	}
	if err := l.table.reserve([]*entry{e}); err != nil {
		t.Fatal(err)
	}
	// Close's first step lands between the server's grant and table.grant:
	// modelled by closing the table before acquireServer (the wait on a
	// free key is granted at once).
	l.table.close()
	_, err = l.acq.take(ctx, []*entry{e}, lockConfig{own: true}, true)
	t.Logf("take: %v", err)
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("want ErrClosed, got %v", err)
	}
	l.table.ops.Done()
	// the rest of Close
	l.closeNow()
	l.table.ops.Wait()
	l.pool.close()
	l.g.wait()
	_ = l.pool.clear()
	l.table.closeAll()

	pids := heldBy(t, srv, 77)
	t.Logf("after Close: key 77 held by backends %v; pool idle conns %d", pids, pool.Stat().IdleConns())
	if len(pids) > 0 {
		// Clean up: the pooled connection holds it.
		c, _ := pool.Acquire(ctx)
		_, _ = c.Exec(ctx, "SELECT pg_advisory_unlock_all()")
		var pid int32
		_ = c.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid)
		c.Release()
		t.Fatalf("BUG: after Close, key 77 is still held by backend %v, a connection back in the pool (pool conn pid %d)", pids, pid)
	}
}

type reviewSrc struct {
	source
	failListen *atomic.Bool
}

func (s reviewSrc) acquire(ctx context.Context) (conn, error) {
	c, err := s.source.acquire(ctx)
	if err != nil {
		return nil, err
	}
	return reviewConn{c, s.failListen}, nil
}

type reviewConn struct {
	conn
	failListen *atomic.Bool
}

func (c reviewConn) exec(ctx context.Context, q string, args ...any) error {
	if q == sqlListen && c.failListen.Load() {
		return errors.New("injected: LISTEN failed")
	}
	return c.conn.exec(ctx, q, args...)
}

// Regression (found in review): when LISTEN fails on a freshly readied primary, primaryHolder
// registers the dead, closed session as the primary anyway (counted); every
// later try fails on it for as long as the Locker holds a lock elsewhere or
// has multiplexed waits.
func TestListenFailureDropsThePrimary(t *testing.T) {
	srv := internalServer(t)
	ctx := context.Background()
	pool := internalPool(t, srv.URL, 4)
	defer pool.Close()
	l, err := New(pool, WithMaxConns(3))
	if err != nil {
		t.Fatal(err)
	}
	var fail atomic.Bool
	l.pool.open.src = reviewSrc{l.pool.open.src, &fail}

	// Hold key 1 on a session of its own (waited): held elsewhere first.
	other, _ := pool.Acquire(ctx)
	if _, err := other.Exec(ctx, "SELECT pg_advisory_lock(1)"); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(200 * time.Millisecond)
		_, _ = other.Exec(ctx, "SELECT pg_advisory_unlock(1)")
		other.Release()
	}()
	lk1, err := l.Lock(ctx, ID(1))
	if err != nil {
		t.Fatal(err)
	}
	// The primary's session ends; its watcher reports it.
	l.pool.mu.Lock()
	p := l.pool.st.primary
	l.pool.mu.Unlock()
	if p == nil || p == lk1.e.s {
		t.Fatalf("setup: primary %p, lock on %p", p, lk1.e.s)
	}
	if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", p.pid); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		l.pool.mu.Lock()
		gone := l.pool.st.primary == nil
		l.pool.mu.Unlock()
		if gone {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("primary not dropped")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The next primary's LISTEN fails once.
	fail.Store(true)
	_, err = l.TryLock(ctx, ID(2))
	fail.Store(false)
	t.Logf("TryLock with LISTEN failing: %v", err)
	// From now on LISTEN works, key 2 is free: TryLock should succeed.
	time.Sleep(3 * time.Second) // three heartbeats
	l.pool.mu.Lock()
	p = l.pool.st.primary
	n := l.pool.st.n
	l.pool.mu.Unlock()
	lk2, err := l.TryLock(ctx, ID(2))
	t.Logf("3s later: primary dead=%v, n=%d, TryLock(2) err=%v", p != nil && p.dead.Load(), n, err)
	if lk2 != nil {
		_ = lk2.Release(ctx)
	}
	_ = lk1.Release(ctx)
	_ = l.Close()
	if err != nil {
		t.Fatalf("BUG: a dead primary is kept: TryLock of a free key fails: %v", err)
	}
}

// Regression (found in review): watchIdle checks h.dead before it takes the session, not after;
// a session given back to the pool in between gets a watcher that reads the
// socket of a connection the application now uses.
func TestNoWatcherOnGivenBackConn(t *testing.T) {
	srv := internalServer(t)
	ctx := context.Background()
	pool := internalPool(t, srv.URL, 2)
	defer pool.Close()
	l, err := New(pool)
	if err != nil {
		t.Fatal(err)
	}
	a1, _ := pool.Acquire(ctx) // the application uses one of the pool's two
	w, err := l.pool.waitSession(ctx, false)
	if err != nil || w.s == nil {
		t.Fatalf("waitSession: %v %v", w.s, err)
	}
	h := w.s
	// The idle timer fires: watchIdle passes its checks, and is descheduled
	// (modelled by holding pipe.mu, which it takes next).
	h.pipe.mu.Lock()
	go l.pool.watch.watchIdle(h)
	time.Sleep(50 * time.Millisecond)
	// Meanwhile the session is done with and given back (pool exhausted).
	l.pool.unwait(w)
	if !h.dead.Load() {
		t.Fatal("setup: h was kept, not given back")
	}
	h.pipe.mu.Unlock()
	time.Sleep(50 * time.Millisecond)
	watched := h.watch.w.Load() != nil
	t.Logf("given back to the pool; watcher running on it: %v", watched)
	// The application takes the pool's connections and uses them.
	a1.Release()
	c1, _ := pool.Acquire(ctx)
	c2, _ := pool.Acquire(ctx)
	_, err1 := c1.Exec(ctx, "SELECT 1")
	_, err2 := c2.Exec(ctx, "SELECT 1")
	t.Logf("application's queries: %v / %v", err1, err2)
	c1.Release()
	c2.Release()
	_ = l.Close()
	if watched {
		t.Fatal("BUG: a watcher reads a connection that is back in the pool")
	}
}

// Regression (found in review): h.listening is written by listen under h.sem and read by
// idleWatch without it (a promoted holder is used by other goroutines).
func TestListeningFlagRace(t *testing.T) {
	srv := internalServer(t)
	ctx := context.Background()
	pool := internalPool(t, srv.URL, 3)
	defer pool.Close()
	l, err := New(pool, WithMaxConns(3))
	if err != nil {
		t.Fatal(err)
	}
	w, err := l.pool.waitSession(ctx, false)
	if err != nil || w.s == nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { l.pool.watch.idle(w.s); close(done) }() // a Release's send on h
	_ = l.pool.listen(w.s)                              // primary promoting h
	<-done
	l.pool.unwait(w)
	_ = l.Close()
}
