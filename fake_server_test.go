package pglocks

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Tests of the fake itself, and that the engine's statements all run on it.

// The fake's lock semantics, driven with SQL as a client would send it.
func TestFakeServerLockSemantics(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	ctx := context.Background()
	a, b, c := srv.session(), srv.session(), srv.session()
	try := func(s *fakeConn, q string, args ...any) bool {
		t.Helper()
		var ok bool
		var tok int64
		if err := s.query(ctx, q, args, &ok, &tok); err != nil {
			t.Fatal(err)
		}
		return ok
	}
	const tryX = "SELECT pg_try_advisory_lock($1::bigint), 0::bigint"
	const tryS = "SELECT pg_try_advisory_lock_shared($1::bigint), 0::bigint"
	for range 2 { // a session may take a lock it holds, and it counts
		if !try(a, tryX, int64(1)) {
			t.Fatal("a session cannot take its own lock again")
		}
	}
	if try(b, tryX, int64(1)) || try(b, tryS, int64(1)) {
		t.Fatal("an exclusive lock does not exclude")
	}
	// b waits; c's try must not jump b's queue once a lets go.
	waited := make(chan error, 1)
	go func() {
		var s1, s2 string
		var tok int64
		waited <- b.query(ctx, "SELECT ''::text, pg_advisory_lock($1::bigint)::text, 0::bigint", []any{int64(1)}, &s1, &s2, &tok)
	}()
	fakeWaitFor(t, "b queued", func() bool { return len(srv.queuedOn(ID(1))) == 1 })
	if try(c, tryS, int64(1)) {
		t.Fatal("a try jumped the queue")
	}
	a.unlock(false, ID(1))
	if got := srv.holdersOf(ID(1)); len(got) != 1 || got[0] != a.pid() {
		t.Fatalf("after one of two unlocks, holders %v", got)
	}
	a.unlock(false, ID(1))
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	if got := srv.holdersOf(ID(1)); len(got) != 1 || got[0] != b.pid() {
		t.Fatalf("holders %v, want b", got)
	}
	// Shared holders share; pairs are another key space.
	if !try(a, tryS, int64(2)) || !try(c, tryS, int64(2)) || try(b, tryX, int64(2)) {
		t.Fatal("shared locks")
	}
	if !try(a, "SELECT pg_try_advisory_lock($1::int4, $2::int4), 0::bigint", int32(0), int32(1)) {
		t.Fatal("Pair(0, 1) is not ID(1)")
	}
	// lock_timeout.
	var s1, s2 string
	var tok int64
	err := c.query(ctx, "SELECT set_config('lock_timeout', $2, true), pg_advisory_lock($1::bigint)::text, 0::bigint",
		[]any{int64(1), "20"}, &s1, &s2, &tok)
	if fakeSQLState(err) != "55P03" {
		t.Fatalf("lock_timeout: %v", err)
	}
	var lt string
	if err := c.query(ctx, "SELECT current_setting('lock_timeout')", nil, &lt); err != nil || lt != "0" {
		t.Fatalf("set_config(…, true) outlived its statement: %q %v", lt, err)
	}
	// A deadlock: b holds 1 and waits for 3, which a holds; a waits for 1.
	a.mustTry(t, ID(3))
	go func() {
		var s1, s2 string
		var tok int64
		waited <- b.query(ctx, "SELECT ''::text, pg_advisory_lock($1::bigint)::text, 0::bigint", []any{int64(3)}, &s1, &s2, &tok)
	}()
	fakeWaitFor(t, "b queued for 3", func() bool { return len(srv.queuedOn(ID(3))) == 1 })
	err = a.query(ctx, "SELECT ''::text, pg_advisory_lock($1::bigint)::text, 0::bigint", []any{int64(1)}, &s1, &s2, &tok)
	if fakeSQLState(err) != "40P01" {
		t.Fatalf("deadlock: %v", err)
	}
	// Cancel b's wait.
	if err := b.cancel(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; fakeSQLState(err) != "57014" {
		t.Fatalf("cancelled wait: %v", err)
	}
	// Notifications, in a batch that fails: not sent.
	a.listen("ch")
	_, berr, _ := b.batch(ctx, []row{
		{q: "SELECT pg_notify('ch', $1)::text", args: []any{"lost"}, dest: []any{&s1}},
		{q: "SELECT pg_advisory_unlock($1::bigint)", args: []any{int64(99)}, dest: []any{new(string)}}, // wrong type: fails
	})
	if berr == nil {
		t.Fatal("a bad scan did not fail the batch")
	}
	srv.mu.Lock()
	srv.violations = nil // that scan was meant to fail
	srv.mu.Unlock()
	if err := b.query(ctx, "SELECT pg_notify('ch', $1)::text", []any{"sent"}, &s1); err != nil {
		t.Fatal(err)
	}
	dctx, cancel := context.WithCancel(ctx)
	cancel()
	n, err := a.waitIdle(dctx)
	if err != nil || n == nil || n.Payload != "sent" || n.PID != uint32(b.pid()) {
		t.Fatalf("waitIdle: %+v %v", n, err)
	}
	if n, err := a.waitIdle(dctx); n != nil || err == nil {
		t.Fatalf("waitIdle with nothing queued and a done ctx: %+v %v", n, err)
	}
	// A read deadline in the past: a timeout that leaves the session usable.
	_ = a.setReadDeadline(time.Now())
	if _, err := a.waitIdle(ctx); !isFakeTimeout(err) {
		t.Fatalf("waitIdle past its deadline: %v", err)
	}
	_ = a.setReadDeadline(time.Time{})
	// Terminated: waitIdle says so at once, and the locks are free.
	srv.terminate(a.pid())
	if _, err := a.waitIdle(ctx); err == nil || isFakeTimeout(err) || fakeSQLState(err) != "57P01" {
		t.Fatalf("waitIdle on a terminated session: %v", err)
	}
	if len(srv.heldBy(a.pid())) != 0 {
		t.Fatal("a terminated session keeps its locks")
	}
}

func isFakeTimeout(err error) bool { return pgconn.Timeout(err) }

// Every API of the engine, on the fake: nothing it sends is unknown to the
// fake (that would be a violation), and everything is let go at Close.
func TestFakeEngineSmoke(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		caps fakeCaps
		opts []Option
	}{
		{"pgx", pgxCaps, nil},
		{"pgx-fenced", pgxCaps, []Option{WithFencingTokens()}},
		{"libpq", libpqCaps, []Option{WithStatementTimeout(200 * time.Millisecond)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := newFakeServer(t)
			src := srv.source(5)
			src.setCaps(tc.caps)
			l := newFakeLocker(t, src, append(tc.opts, WithMaxConns(3), WithApplicationName("smoke"))...)
			ctx := context.Background()
			other := srv.session()

			lk, err := l.Lock(ctx, ID(1))
			if err != nil {
				t.Fatal(err)
			}
			sh, err := l.TryLock(ctx, Pair(1, 2), Shared())
			if err != nil {
				t.Fatal(err)
			}
			set, err := l.LockAll(ctx, []Key{ID(5), ID(3), Pair(0, 4)})
			if err != nil {
				t.Fatal(err)
			}
			slot, err := l.Lock(ctx, ID(9), Slots(3))
			if err != nil {
				t.Fatal(err)
			}
			if hs, err := l.Holders(ctx, ID(1)); err != nil || len(hs) != 1 {
				t.Fatalf("Holders: %v %v", hs, err)
			}
			// A wait in the server's queue, on a session of its own.
			other.mustTry(t, ID(20))
			got := make(chan error, 1)
			go func() {
				lk, err := l.Lock(ctx, ID(20))
				if err == nil {
					err = lk.Release(ctx)
				}
				got <- err
			}()
			fakeWaitFor(t, "a wait queued", func() bool { return len(srv.queuedOn(ID(20))) == 1 })
			other.unlock(false, ID(20))
			if err := <-got; err != nil {
				t.Fatal(err)
			}
			// A leader, for a moment.
			lctx, cancel := context.WithCancel(ctx)
			led := make(chan int64, 1)
			lerr := make(chan error, 1)
			go func() {
				lerr <- l.Lead(lctx, ID(30), func(ctx context.Context) error {
					led <- FencingToken(ctx)
					<-ctx.Done()
					return nil
				})
			}()
			<-led
			fakeWaitFor(t, "the leader's session named", func() bool {
				hs, err := l.Holders(ctx, ID(30))
				return err == nil && len(hs) == 1 && !hs[0].Since.IsZero()
			})
			cancel()
			if err := <-lerr; !errors.Is(err, context.Canceled) {
				t.Fatalf("Lead: %v", err)
			}
			if tc.name == "pgx-fenced" && lk.Token() == 0 {
				t.Fatal("no fencing token")
			}
			for _, r := range []interface{ Release(context.Context) error }{lk, sh, set, slot} {
				if err := r.Release(ctx); err != nil {
					t.Fatal(err)
				}
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			checkFakeClean(t, srv, src)
			srv.mu.Lock()
			t.Logf("statements: %v", srv.stmts)
			srv.mu.Unlock()
			if n := srv.count("other"); n != 0 {
				t.Fatalf("%d statements of unknown kinds", n)
			}
		})
	}
}
