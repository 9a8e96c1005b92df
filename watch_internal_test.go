package pglocks

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks/internal/pgtest"
)

// A heartbeat probe that ends after the lock it came for was released
// leaves a watcher on a session that becomes a spare. If the server then
// ends that session, the watcher closes it: the spare must be dropped, not
// handed to the next wait (whose discard would close it a second time, which
// pgxpool answers with a panic).
func TestSpareClosedByItsWatcher(t *testing.T) {
	srv, err := pgtest.StartLocal(pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	l, err := New(pool, WithHeartbeat(8*time.Second, time.Second)) // the test plays the heartbeat
	if err != nil {
		t.Fatal(err)
	}
	other, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Release()
	// k1 is held elsewhere, so the Locker waits for it on a session of its own.
	if _, err := other.Exec(ctx, "SELECT pg_advisory_lock(1)"); err != nil {
		t.Fatal(err)
	}
	unlock := make(chan struct{})
	go func() {
		time.Sleep(300 * time.Millisecond)
		_, _ = other.Exec(ctx, "SELECT pg_advisory_unlock(1)")
		close(unlock)
	}()
	lk, err := l.Lock(ctx, ID(1))
	if err != nil {
		t.Fatal(err)
	}
	<-unlock
	h := lk.e.s
	s := l.pool
	use := s.lease(h)                       // the heartbeat picks h for a probe ...
	if err := lk.Release(ctx); err != nil { // ... the release ends first ...
		t.Fatal(err)
	}
	s.probe(h) // ... the probe starts a watcher ...
	use.end()  // ... and h becomes a spare, watched.
	s.mu.Lock()
	spare := slices.Contains(s.st.spare, h)
	s.mu.Unlock()
	if !spare || h.watch.w.Load() == nil {
		t.Fatalf("setup: spare %v, watched %v", spare, h.watch.w.Load() != nil)
	}
	if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", h.pid); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		spare = slices.Contains(s.st.spare, h)
		s.mu.Unlock()
		if !spare {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the spare whose session ended is still kept")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The next wait gets a good session.
	if _, err := other.Exec(ctx, "SELECT pg_advisory_lock(2)"); err != nil {
		t.Fatal(err)
	}
	unlock = make(chan struct{})
	go func() {
		time.Sleep(300 * time.Millisecond)
		_, _ = other.Exec(ctx, "SELECT pg_advisory_unlock(2)")
		close(unlock)
	}()
	lk2, err := l.Lock(ctx, ID(2))
	<-unlock
	if err != nil {
		t.Fatal(err)
	}
	if err := lk2.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}
