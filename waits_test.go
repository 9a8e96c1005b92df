package pglocks_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks"
)

// holdSQL takes keys from a plain session, as psql would, and returns a
// function that frees one.
func holdSQL(t *testing.T, e *env, keys []pglocks.Key) (free func(pglocks.Key)) {
	t.Helper()
	c := e.rawConn(t)
	for _, k := range keys {
		if _, err := c.Exec(context.Background(), "SELECT pg_advisory_lock($1)", mustInt64(k)); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	return func(k pglocks.Key) {
		mu.Lock()
		defer mu.Unlock()
		var ok bool
		if err := c.QueryRow(context.Background(), "SELECT pg_advisory_unlock($1)", mustInt64(k)).Scan(&ok); err != nil || !ok {
			t.Errorf("unlock %v: %v %v", k, ok, err)
		}
	}
}

// waitWaits waits until l has server and multiplexed waits pending.
func waitWaits(t *testing.T, l *pglocks.Locker, server, multiplexed int) {
	t.Helper()
	waitFor(t, 60*time.Second, fmt.Sprintf("%d waits in the server's queue and %d multiplexed", server, multiplexed), func() bool {
		s, m := pglocks.WaitsForTest(l)
		return s == server && m == multiplexed
	})
}

// sessionsOf counts the server sessions whose application_name is app.
func sessionsOf(t *testing.T, e *env, app string) int {
	t.Helper()
	n := 0
	for _, a := range e.appNames() {
		if a == app {
			n++
		}
	}
	return n
}

// sharedPool opens a pool of max connections on e that a Locker (with app
// as its application_name) and the application share.
func sharedPool(t *testing.T, e *env, max int, app string, opts ...pglocks.Option) (*pglocks.Locker, testPool) {
	t.Helper()
	p := e.drv.open(t, e.dsn, max)
	e.onClose(p.close)
	l, err := p.newLocker(append([]pglocks.Option{pglocks.WithApplicationName(app)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	e.onClose(func() { _ = l.Close() })
	return l, p
}

// appUses checks that the application can take n connections of p at once,
// each running a query, within 3 s.
func appUses(t *testing.T, p testPool, n int, while string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	var releases []func()
	defer func() {
		for _, r := range releases {
			r()
		}
	}()
	for i := range n {
		r, err := p.acquire(ctx)
		if err != nil {
			t.Fatalf("%s: the application's connection %d of %d: %v", while, i+1, n, err)
		}
		releases = append(releases, r)
	}
}

// One Locker over a pool of 4 (pgxpool's smallest default), 30 goroutines
// waiting for keys held elsewhere, by another Locker and by plain SQL: the
// Locker takes no more than its 2 connections, the application's own
// queries through the same pool go on, and a key freed reaches its waiter
// whatever the other waits wait for.
func TestWaitsDoNotStarveThePool(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		const app = "waits-pool"
		l, pool := sharedPool(t, e, 4, app)
		other := e.locker(4)
		var keys, bySQL []pglocks.Key
		held := map[pglocks.Key]*pglocks.Lock{}
		for i := range 30 {
			k := testKey(t, i)
			keys = append(keys, k)
			if i%2 == 0 {
				bySQL = append(bySQL, k)
			} else {
				held[k] = mustLock(t, other, k)
			}
		}
		free := holdSQL(t, e, bySQL)
		freeKey := func(k pglocks.Key) string {
			if lk := held[k]; lk != nil {
				mustRelease(t, lk)
				return "another Locker"
			}
			free(k)
			return "plain SQL"
		}

		got := make(map[pglocks.Key]chan error)
		for _, k := range keys {
			got[k] = make(chan error, 1)
			go func() {
				lk, err := l.Lock(ctx, k)
				if err == nil {
					err = lk.Release(ctx)
				}
				got[k] <- err
			}()
		}
		waitWaits(t, l, 1, 29)
		if n := sessionsOf(t, e, app); n > 2 {
			t.Errorf("the Locker has %d connections while 30 goroutines wait, want at most 2", n)
		}
		appUses(t, pool, 2, "while 30 goroutines wait")

		// The last two keys, one of each kind, freed first.
		for _, k := range keys[28:] {
			began := time.Now()
			who := freeKey(k)
			select {
			case err := <-got[k]:
				if err != nil {
					t.Fatalf("freed by %s: %v", who, err)
				}
				t.Logf("freed by %s: its waiter had it %v later", who, time.Since(began).Round(100*time.Microsecond))
			case <-time.After(10 * time.Second):
				t.Fatalf("freed by %s: its waiter did not get it in 10 s", who)
			}
		}
		for _, k := range keys[:28] {
			freeKey(k)
		}
		for _, k := range keys[:28] {
			if err := <-got[k]; err != nil {
				t.Fatalf("%v: %v", k, err)
			}
		}
		appUses(t, pool, 2, "after the waits")
		if n := sessionsOf(t, e, app); n > 2 {
			t.Errorf("the Locker has %d connections after the waits, want at most 2", n)
		}
	})
}

// Thousands of goroutines wait for thousands of keys held by plain SQL, on
// the Locker's 2 connections; 100 keys freed reach their waiters; then the
// rest give up at random moments (a cancellation storm), and nothing of the
// Locker's is left held or queued on the server.
func TestManyWaitsFewConnections(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		const n, freed = 2000, 100
		const app = "many-waits"
		// Keys waited for count against WithMaxLocks (default 1000): were
		// they all granted, the Locker would hold them all.
		l, _ := sharedPool(t, e, 4, app, pglocks.WithMaxLocks(n))
		keys := make([]pglocks.Key, n)
		for i := range keys {
			keys[i] = testKey(t, i)
		}
		free := holdSQL(t, e, keys)
		type result struct {
			k   pglocks.Key
			err error
		}
		results := make(chan result, n)
		cancels := make([]context.CancelFunc, n)
		for i, k := range keys {
			ctx, cancel := context.WithCancel(t.Context())
			cancels[i] = cancel
			go func() {
				lk, err := l.Lock(ctx, k)
				if err == nil {
					err = lk.Release(context.Background())
				}
				results <- result{k, err}
			}()
		}
		waitWaits(t, l, 1, n-1)
		if c := sessionsOf(t, e, app); c > 2 {
			t.Errorf("%d waits use %d connections, want at most 2", n, c)
		}
		began := time.Now()
		for _, k := range keys[n-freed:] {
			free(k)
		}
		for range freed {
			r := <-results
			if r.err != nil || !slices.Contains(keys[n-freed:], r.k) {
				t.Fatalf("%v: %v (freed: %v)", r.k, r.err, slices.Contains(keys[n-freed:], r.k))
			}
		}
		t.Logf("%d freed keys reached their waiters in %v", freed, time.Since(began).Round(time.Millisecond))

		// The storm.
		order := rand.Perm(n - freed)
		for _, i := range order {
			if rand.IntN(3) == 0 {
				time.Sleep(time.Duration(rand.IntN(200)) * time.Microsecond)
			}
			cancels[i]()
		}
		for range n - freed {
			if r := <-results; !errors.Is(r.err, context.Canceled) {
				t.Fatalf("%v after the cancel: %v", r.k, r.err)
			}
		}
		for _, c := range cancels {
			c()
		}
		waitWaits(t, l, 0, 0)
		mine := 0
		for _, r := range e.locks() {
			if r.granted && e.appName(r.pid) == app || !r.granted {
				mine++
			}
		}
		if mine != 0 {
			t.Errorf("after the storm, %d locks of the Locker's, or waits, are on the server", mine)
		}
		for _, k := range keys[:n-freed] {
			free(k)
		}
	})
}

// A key freed by a Locker in another process reaches a multiplexed waiter
// by notification: with the waiter's poller slowed to once an hour, only
// the notification can bring it. lib/pq cannot read notifications: its
// waiters find freed keys by polling, which TestWaitsDoNotStarveThePool
// shows.
func TestFreedKeyIsTold(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		if e.drv.name == "libpq" {
			t.Log("lib/pq hides its notifications: polling only")
			return
		}
		ctx := t.Context()
		holder := e.locker(4)
		waiter, _ := sharedPool(t, e, 4, "told", pglocks.WithMaxConns(1))
		pglocks.SetPollForTest(waiter, time.Hour, time.Hour)
		for i := range 5 {
			k := testKey(t, i)
			lk := mustLock(t, holder, k)
			got := make(chan error, 1)
			go func() {
				lw, err := waiter.Lock(ctx, k)
				if err == nil {
					err = lw.Release(ctx)
				}
				got <- err
			}()
			waitWaits(t, waiter, 0, 1)
			time.Sleep(time.Duration(i) * 50 * time.Millisecond) // the want told before, or after, the release
			began := time.Now()
			mustRelease(t, lk)
			select {
			case err := <-got:
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("round %d: told and had it %v after the release", i, time.Since(began).Round(10*time.Microsecond))
			case <-time.After(20 * time.Second):
				t.Fatalf("round %d: the waiter was not told the key was freed", i)
			}
		}
	})
}

// With WithMaxConns(1), a Locker that holds a lock waits for another key,
// freed 1 s later, on its one session (multiplexed), and holds both there.
func TestOneConnectionWaits(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		const app = "one-conn"
		l, pool := sharedPool(t, e, 1, app)
		k0, k1, k2 := testKey(t, 0), testKey(t, 1), testKey(t, 2)
		free := holdSQL(t, e, []pglocks.Key{k1})
		lk0 := mustLock(t, l, k0)
		freed := make(chan struct{})
		go func() {
			defer close(freed)
			time.Sleep(time.Second)
			free(k1)
		}()
		lk1, err := l.Lock(ctx, k1)
		<-freed
		if err != nil {
			t.Fatalf("waiting for a key freed after 1 s: %v", err)
		}
		p0, p1 := e.held(bigint(k0)), e.held(bigint(k1))
		if len(p0) != 1 || !slices.Equal(p0, p1) {
			t.Errorf("held on sessions %v and %v, want one", p0, p1)
		}
		// LockAll and Lead wait multiplexed too.
		other := e.locker(4)
		lo := mustLock(t, other, k2)
		set := make(chan error, 1)
		go func() {
			s, err := l.LockAll(ctx, []pglocks.Key{k2, testKey(t, 3)})
			if err == nil {
				err = s.Release(ctx)
			}
			set <- err
		}()
		waitWaits(t, l, 0, 1)
		mustRelease(t, lo)
		if err := <-set; err != nil {
			t.Fatalf("LockAll: %v", err)
		}
		lead := make(chan error, 1)
		lo = mustLock(t, other, k2)
		go func() {
			lead <- l.Lead(ctx, k2, func(context.Context) error { cancel(); return nil })
		}()
		waitWaits(t, l, 0, 1)
		mustRelease(t, lo)
		if err := <-lead; !errors.Is(err, context.Canceled) {
			t.Fatalf("Lead: %v", err)
		}
		mustRelease(t, lk0)
		mustRelease(t, lk1)
		_ = pool
	})
}

// A multiplexed wait moves into the server's queue when a session frees, so
// that tries, which never jump the queue, cannot starve it: here a
// plain-SQL client queues for the key too, and the moved wait is granted in
// queue order after it.
func TestMultiplexedWaitMovesIntoQueue(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		l, _ := sharedPool(t, e, 4, "moves")
		k1, k2 := testKey(t, 1), testKey(t, 2)
		free := holdSQL(t, e, []pglocks.Key{k1, k2})
		first := make(chan *pglocks.Lock, 1)
		go func() {
			lk, err := l.Lock(ctx, k1) // the Locker's one wait session
			if err != nil {
				t.Error(err)
			}
			first <- lk
		}()
		waitWaits(t, l, 1, 0)
		second := make(chan error, 1)
		go func() {
			lk, err := l.Lock(ctx, k2) // multiplexed
			if err == nil {
				err = lk.Release(ctx)
			}
			second <- err
		}()
		waitWaits(t, l, 1, 1)
		free(k1)
		lk1 := <-first
		if lk1 == nil {
			t.FailNow()
		}
		// The wait session holds k1; once k1 is let go, it is free for the
		// multiplexed wait, which moves into the server's queue.
		mustRelease(t, lk1)
		waitWaits(t, l, 1, 0)
		waitFor(t, 10*time.Second, "the moved wait in pg_locks", func() bool { return e.waiting(bigint(k2)) })
		free(k2)
		if err := <-second; err != nil {
			t.Fatal(err)
		}
	})
}

// Idle sessions kept ready go back to the pool at once when the
// application needs them: after contended locks, a pool of 4 shared with a
// Locker lets the application take 4 connections.
func TestReadySessionsGiveWay(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		const app = "give-way"
		l, pool := sharedPool(t, e, 4, app)
		other := e.locker(4)
		for i := range 3 {
			k := testKey(t, i)
			lo := mustLock(t, other, k)
			got := make(chan *pglocks.Lock, 1)
			go func() {
				lk, err := l.Lock(ctx, k)
				if err != nil {
					t.Error(err)
				}
				got <- lk
			}()
			waitWaits(t, l, 1, 0)
			mustRelease(t, lo)
			mustRelease(t, <-got)
		}
		if n := pglocks.SessionsForTest(l); n == 0 || n > 2 {
			t.Fatalf("the idle Locker keeps %d connections, want 1 or 2", n)
		}
		var taken atomic.Int32
		ctx3, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		var releases []func()
		for range 4 {
			r, err := pool.acquire(ctx3)
			if err != nil {
				t.Fatalf("the application's connection %d of 4 next to an idle Locker: %v", taken.Load()+1, err)
			}
			taken.Add(1)
			releases = append(releases, r)
		}
		for _, r := range releases {
			r()
		}
	})
}
