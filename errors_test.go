package pglocks_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks"
)

// Errors about a key made from a name show the name beside the number: a
// TryLock, a Lock whose deadline passed, a TryLock with Slots (which names
// the key asked for, not a slot), and a transaction lock.
func TestErrorNamesTheKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t, drivers[0])
	l := e.locker(4)
	ctx := t.Context()
	name := t.Name() + ": tick"
	k := pglocks.Name(name)
	raw := e.rawConn(t)
	if _, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(k)); err != nil {
		t.Fatal(err)
	}
	slots := pglocks.Name(name + " slots")
	for i := range 2 {
		a, b, _ := slots.Slot(i).Int32s()
		if _, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1, $2)", a, b); err != nil {
			t.Fatal(err)
		}
	}
	named := `pglocks: lock "` + name + `" (` + k.String() + `): `

	_, err := l.TryLock(ctx, k)
	wantErr(t, err, pglocks.ErrLocked)
	if got, want := err.Error(), named+"held by another session"; got != want {
		t.Errorf("TryLock:\ngot  %s\nwant %s", got, want)
	}

	dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	_, err = l.Lock(dctx, k)
	wantErr(t, err, context.DeadlineExceeded)
	if !strings.HasPrefix(err.Error(), named) {
		t.Errorf("Lock with a deadline: %v", err)
	}

	_, err = l.TryLock(ctx, slots, pglocks.Slots(2))
	wantErr(t, err, pglocks.ErrLocked)
	if got, want := err.Error(), `pglocks: lock "`+name+` slots" (`+slots.String()+`): held by another session`; got != want {
		t.Errorf("TryLock with Slots:\ngot  %s\nwant %s", got, want)
	}

	tx := e.drv.begin(t, e)
	err = tx.lock(ctx, k, false)
	wantErr(t, err, pglocks.ErrLocked)
	if got, want := err.Error(), named+"held by another session"; got != want {
		t.Errorf("TryLockTx:\ngot  %s\nwant %s", got, want)
	}
	if err := tx.rollback(); err != nil {
		t.Fatal(err)
	}

	// A key made from a number is named by its number.
	id := pglocks.ID(mustInt64(k) ^ 1)
	if _, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(id)); err != nil {
		t.Fatal(err)
	}
	_, err = l.TryLock(ctx, id)
	if got, want := err.Error(), "pglocks: lock "+id.String()+": held by another session"; got != want {
		t.Errorf("TryLock of an ID:\ngot  %s\nwant %s", got, want)
	}
	if _, err := raw.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
}

// A deadlock between transaction locks says so once: the wait's error was
// classified where it failed, and not again.
func TestDeadlockSaidOnce(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		a, b := testKey(t, 0), testKey(t, 1)
		tx := e.drv.begin(t, e)
		if err := tx.lock(ctx, a, true); err != nil {
			t.Fatal(err)
		}
		raw := e.rawConn(t)
		if _, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(b)); err != nil {
			t.Fatal(err)
		}
		res := make(chan error, 1)
		go func() { res <- tx.lock(ctx, b, true) }()
		waitFor(t, 10*time.Second, "the transaction to wait for b", func() bool { return e.waiting(bigint(b)) })
		rawRes := make(chan error, 1)
		go func() {
			_, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(a))
			rawRes <- err
		}()
		var err error
		select {
		case err = <-res:
		case <-time.After(30 * time.Second):
			t.Fatal("deadlock not detected within 30 s")
		}
		// The transaction waited first, so its backend runs the deadlock
		// check first, and fails its own wait.
		wantErr(t, err, pglocks.ErrDeadlock)
		if n := strings.Count(err.Error(), "deadlock detected by the server"); n != 1 {
			t.Errorf("the cause is said %d times: %v", n, err)
		}
		if !strings.HasPrefix(err.Error(), `pglocks: lock "`+t.Name()+`#1" (`) {
			t.Errorf("the key is not named: %v", err)
		}
		t.Log(err)
		if err := tx.rollback(); err != nil {
			t.Fatal(err)
		}
		if err := <-rawRes; err != nil {
			t.Fatal(err)
		}
		if _, err := raw.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
			t.Fatal(err)
		}
	})
}

// A wait whose server session is terminated fails with ErrSessionEnded (not
// a bare FATAL, nor ErrLockLost: nothing was held), naming the key; nothing
// of it is left on the server, and the Locker goes on.
func TestTerminatedWait(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		ctx := t.Context()
		k := testKey(t, 0)
		raw := e.rawConn(t)
		if _, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(k)); err != nil {
			t.Fatal(err)
		}
		res := make(chan error, 1)
		go func() {
			lk, err := l.Lock(ctx, k)
			if err == nil {
				_ = lk.Release(ctx)
			}
			res <- err
		}()
		// lib/pq hides the server's FATAL behind driver.ErrBadConn, which a
		// session that had ended before the wait began (a ready session,
		// after a server restart) gives as well: that wait is tried once
		// more, on another session, and must be terminated again.
		terminated := map[int]bool{}
		var err error
		for {
			var waiter int
			waitFor(t, 30*time.Second, "a wait, or the end of Lock", func() bool {
				for _, r := range e.locks() {
					if r.key == bigint(k) && !r.granted && !terminated[r.pid] {
						waiter = r.pid
					}
				}
				return waiter != 0 || len(res) > 0
			})
			if len(res) > 0 {
				err = <-res
				break
			}
			if len(terminated) == 2 {
				t.Fatal("the wait was tried again after two terminations")
			}
			terminated[waiter] = true
			if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", waiter); err != nil {
				t.Fatal(err)
			}
		}
		if len(terminated) != 1 && e.drv.name != "libpq" {
			t.Errorf("the wait was tried again after its session was terminated")
		}
		t.Logf("after %d terminations: %v", len(terminated), err)
		wantErr(t, err, pglocks.ErrSessionEnded)
		if errors.Is(err, pglocks.ErrLockLost) {
			t.Errorf("a failed wait matches ErrLockLost: %v", err)
		}
		if !strings.HasPrefix(err.Error(), `pglocks: lock "`+t.Name()+`#0" (`+k.String()+`): the server session ended: `) {
			t.Errorf("got %v", err)
		}
		// Only the other client's hold is left.
		waitFor(t, 10*time.Second, "the wait to leave pg_locks", func() bool {
			rows := 0
			for _, r := range e.locks() {
				if r.key == bigint(k) && (!r.granted || terminated[r.pid]) {
					rows++
				}
			}
			return rows == 0
		})
		if _, err := raw.Exec(ctx, "SELECT pg_advisory_unlock($1)", mustInt64(k)); err != nil {
			t.Fatal(err)
		}
		mustRelease(t, mustLock(t, l, k))
	})
}

// A held lock whose session the server ends is reported lost once, naming
// the key and the server's word, and matches both ErrLockLost and
// ErrSessionEnded.
func TestLossSaidOnce(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4, pglocks.WithHeartbeat(500*time.Millisecond, time.Second))
		ctx := t.Context()
		k := testKey(t, 0)
		lk := mustLock(t, l, k)
		pids := e.held(bigint(k))
		if len(pids) != 1 {
			t.Fatalf("holders: %v", pids)
		}
		if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", pids[0]); err != nil {
			t.Fatal(err)
		}
		select {
		case <-lk.Done():
		case <-time.After(30 * time.Second):
			t.Fatal("loss not reported within 30 s")
		}
		err := lk.Err()
		t.Log(err)
		wantErr(t, err, pglocks.ErrLockLost)
		msg := err.Error()
		if !strings.HasPrefix(msg, `pglocks: lock "`+t.Name()+`#0" (`+k.String()+`): lock lost: its server session ended: `) {
			t.Errorf("got %s", msg)
		}
		for _, phrase := range []string{"session ended", "ended the session", "lock lost", "pglocks: "} {
			if n := strings.Count(msg, phrase); n > 1 {
				t.Errorf("%q said %d times: %s", phrase, n, msg)
			}
		}
		wantErr(t, err, pglocks.ErrSessionEnded)
		if err := lk.Release(ctx); err == nil || err.Error() != msg {
			t.Errorf("Release of the lost lock: %v", err)
		}
	})
}

// WithMaxLocks counts the keys waited for: a Locker that holds one key and
// waits for another, with a cap of two, refuses a third, and says that it
// counts waits.
func TestMaxLocksCountsWaits(t *testing.T) {
	t.Parallel()
	e := newEnv(t, drivers[0])
	l := e.locker(4, pglocks.WithMaxLocks(2))
	ctx := t.Context()
	waited, held, third := testKey(t, 0), testKey(t, 1), testKey(t, 2)
	raw := e.rawConn(t)
	if _, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(waited)); err != nil {
		t.Fatal(err)
	}
	res := make(chan error, 1)
	go func() {
		lk, err := l.Lock(ctx, waited)
		if err == nil {
			err = lk.Release(ctx)
		}
		res <- err
	}()
	waitFor(t, 10*time.Second, "the wait", func() bool { return e.waiting(bigint(waited)) })
	lk := mustLock(t, l, held)
	_, err := l.TryLock(ctx, third)
	wantErr(t, err, pglocks.ErrTooManyLocks)
	want := `pglocks: lock "` + t.Name() + `#2" (` + third.String() + `): ` +
		"the Locker holds or waits for as many locks as WithMaxLocks allows (2): 1 held, 1 being taken or waited for"
	if err.Error() != want {
		t.Errorf("got  %v\nwant %s", err, want)
	}
	mustRelease(t, lk)
	if _, err := raw.Exec(ctx, "SELECT pg_advisory_unlock($1)", mustInt64(waited)); err != nil {
		t.Fatal(err)
	}
	if err := <-res; err != nil {
		t.Fatal(err)
	}
}

// A Do whose fn returns its ctx's cause (the loss), or wraps it, reports
// the loss once, not joined with itself.
func TestDoSaysLossOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, drivers[0])
	l := e.locker(4)
	k := testKey(t, 0)
	err := l.Do(t.Context(), k, func(ctx context.Context) error {
		// Not on ctx: the loss may be heard (and ctx cancelled) before the
		// terminate's answer is read.
		if _, err := srv.Admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", e.held(bigint(k))[0]); err != nil {
			return err
		}
		<-ctx.Done()
		return fmt.Errorf("report: %w", context.Cause(ctx))
	})
	wantErr(t, err, pglocks.ErrLockLost)
	msg := err.Error()
	if !strings.HasPrefix(msg, `report: pglocks: lock "`+t.Name()+`#0" (`) || strings.Count(msg, "lock lost") != 1 {
		t.Errorf("got %s", msg)
	}
}
