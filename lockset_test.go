package pglocks_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

// heldKeys returns which of keys e's database shows held, and the sessions
// that hold them.
func (e *env) heldKeys(keys ...pglocks.Key) (held []string, pids map[int]bool) {
	pids = map[int]bool{}
	want := map[string]bool{}
	for _, k := range keys {
		want[keyRow(k)] = true
	}
	for _, r := range e.locks() {
		if r.granted && want[r.key] {
			held = append(held, r.key)
			pids[r.pid] = true
		}
	}
	return held, pids
}

// keyRow is how e.locks names k.
func keyRow(k pglocks.Key) string {
	if a, b, ok := k.Int32s(); ok {
		return fmt.Sprintf("pair %d,%d", a, b)
	}
	return bigint(k)
}

func TestLockAll(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		ctx := t.Context()
		k := []pglocks.Key{testKey(t, 0), testKey(t, 1), pglocks.Pair(7, -3), testKey(t, 3)}

		// Unordered, with duplicates: merged, and held together on one session.
		s, err := l.TryLockAll(ctx, []pglocks.Key{k[3], k[2], k[0], k[3], k[1], k[0]})
		if err != nil {
			t.Fatal(err)
		}
		got := []pglocks.Key{}
		for _, lk := range s.Locks() {
			got = append(got, lk.Key())
		}
		want := slices.Clone(k)
		slices.SortFunc(want, func(a, b pglocks.Key) int { // bigint keys by value, then pairs
			ai, aok := a.Int64()
			bi, bok := b.Int64()
			switch {
			case aok && bok:
				return cmpInt(ai, bi)
			case aok:
				return -1
			case bok:
				return 1
			}
			return 0
		})
		if !slices.Equal(got, want) {
			t.Fatalf("Locks() = %v, want %v (merged, in the global order)", got, want)
		}
		held, pids := e.heldKeys(k...)
		if len(held) != 4 || len(pids) != 1 {
			t.Fatalf("want the 4 keys held on one session, got %v on %v", held, pids)
		}
		if s.Err() != nil {
			t.Fatal(s.Err())
		}
		if err := s.Release(ctx); err != nil {
			t.Fatal(err)
		}
		select {
		case <-s.Done():
		default:
			t.Fatal("Done not closed when Release returned")
		}
		wantErr(t, s.Err(), pglocks.ErrReleased)
		if held, _ := e.heldKeys(k...); len(held) != 0 {
			t.Fatalf("still held after Release: %v", held)
		}

		// One key held by another session: TryLockAll holds none.
		raw := e.rawConn(t)
		if _, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1::int4, $2::int4)", 7, -3); err != nil {
			t.Fatal(err)
		}
		_, err = l.TryLockAll(ctx, k)
		wantErr(t, err, pglocks.ErrLocked)
		if !strings.Contains(err.Error(), k[2].String()) {
			t.Errorf("error does not name the key held elsewhere: %v", err)
		}
		if held, _ := e.heldKeys(k...); len(held) != 1 {
			t.Fatalf("TryLockAll left something held: %v", held)
		}

		// LockAll with a deadline gives up and holds none.
		dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		_, err = l.LockAll(dctx, k)
		cancel()
		wantErr(t, err, context.DeadlineExceeded)
		if held, _ := e.heldKeys(k...); len(held) != 1 {
			t.Fatalf("LockAll left something held: %v", held)
		}

		// LockAll waits, then holds all on one session.
		type result struct {
			s   *pglocks.LockSet
			err error
		}
		res := make(chan result, 1)
		go func() {
			s, err := l.LockAll(ctx, k)
			res <- result{s, err}
		}()
		waitFor(t, 10*time.Second, "LockAll to wait", func() bool { return e.waiting(keyRow(k[2])) })
		if _, err := raw.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
			t.Fatal(err)
		}
		r := <-res
		if r.err != nil {
			t.Fatal(r.err)
		}
		if held, pids := e.heldKeys(k...); len(held) != 4 || len(pids) != 1 {
			t.Fatalf("want the 4 keys held on one session, got %v on %v", held, pids)
		}
		// Another goroutine of the Locker is excluded too.
		_, err = l.TryLock(ctx, k[1])
		wantErr(t, err, pglocks.ErrLocked)
		// A lock of the set released on its own ends the set.
		done := r.s.Done()
		if r.s.Err() != nil {
			t.Fatal(r.s.Err())
		}
		mustRelease(t, r.s.Locks()[0])
		wantErr(t, r.s.Err(), pglocks.ErrReleased)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("the set's Done is open after one of its locks was released")
		}
		err = r.s.Release(ctx)
		wantErr(t, err, pglocks.ErrReleased) // the one released above
		if held, _ := e.heldKeys(k...); len(held) != 0 {
			t.Fatalf("still held after Release: %v", held)
		}

		// A key held by another goroutine of this Locker: nothing taken.
		lk := mustLock(t, l, k[3])
		_, err = l.TryLockAll(ctx, k)
		wantErr(t, err, pglocks.ErrLocked)
		if held, _ := e.heldKeys(k...); len(held) != 1 {
			t.Fatalf("TryLockAll left something held: %v", held)
		}
		mustRelease(t, lk)

		// Bad input: one clear error, nothing held.
		_, err = l.LockAll(ctx, nil)
		if err == nil {
			t.Fatal("LockAll(nil) did not fail")
		}
		_, err = l.LockAll(ctx, []pglocks.Key{k[0], {}})
		wantErr(t, err, pglocks.ErrInvalidKey)
		if held, _ := e.heldKeys(k...); len(held) != 0 {
			t.Fatalf("held after bad input: %v", held)
		}

		// DoAll runs fn under all the keys and releases them.
		err = l.DoAll(ctx, k, func(ctx context.Context) error {
			if held, _ := e.heldKeys(k...); len(held) != 4 {
				return fmt.Errorf("in DoAll, held: %v", held)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Shared sets join shared holds the Locker already has, and MaxLocks counts
// a set as the keys it takes on the server.
func TestLockAllSharedAndMax(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4, pglocks.WithMaxLocks(3))
		ctx := t.Context()
		k0, k1, k2, k3 := testKey(t, 0), testKey(t, 1), testKey(t, 2), testKey(t, 3)
		lk := mustLock(t, l, k0, pglocks.Shared())
		s, err := l.LockAll(ctx, []pglocks.Key{k0, k1}, pglocks.Shared())
		if err != nil {
			t.Fatal(err)
		}
		// k0 is shared with lk; 2 keys on the server, so 2 more do not fit.
		_, err = l.LockAll(ctx, []pglocks.Key{k2, k3})
		wantErr(t, err, pglocks.ErrTooManyLocks)
		if held, _ := e.heldKeys(k2, k3); len(held) != 0 {
			t.Fatalf("held after ErrTooManyLocks: %v", held)
		}
		mustRelease(t, lk)
		if held, _ := e.heldKeys(k0); len(held) != 1 {
			t.Fatal("k0 should stay held by the set")
		}
		if err := s.Release(ctx); err != nil {
			t.Fatal(err)
		}
		s, err = l.TryLockAll(ctx, []pglocks.Key{k1, k2, k3})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Release(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

// A client that takes the same keys in the other order deadlocks with
// LockAll; the server detects it, and LockAll reports ErrDeadlock holding
// nothing (or the other client fails and LockAll goes on).
// LockAll waiting in the server's queue, in a cycle with another client,
// fails with ErrDeadlock and holds nothing. The server ends one wait of a
// cycle, found by the deadlock check that a waiting backend runs once,
// deadlock_timeout after its wait began: LockAll's backend checks after
// 5 s and the other client's after a minute, so that LockAll's check comes
// first however long the other client takes to start its wait (it used to
// be 1 s each: under load the other client's wait could begin more than a
// second after LockAll's, whose check then found no cycle, and the other
// client's wait was ended instead; LockAll went on waiting for a key the
// other client still held, and the test for a LockAll that never
// returned). If the server still ends the other client's wait, that client
// lets go, and LockAll must then hold both keys.
func TestLockAllDeadlock(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		if _, err := srv.Admin.Exec(ctx, "ALTER DATABASE "+pgx.Identifier{e.db}.Sanitize()+" SET deadlock_timeout = '5s'"); err != nil {
			t.Fatal(err)
		}
		l := e.locker(4)
		a, b := testKey(t, 0), testKey(t, 1)
		if compareKey(a, b) > 0 {
			a, b = b, a // LockAll takes a first
		}
		raw := e.rawConn(t)
		if _, err := raw.Exec(ctx, "SET deadlock_timeout = '1min'"); err != nil {
			t.Fatal(err)
		}
		if _, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(b)); err != nil {
			t.Fatal(err)
		}
		res := make(chan error, 1)
		var s *pglocks.LockSet
		go func() {
			var err error
			s, err = l.LockAll(ctx, []pglocks.Key{b, a})
			res <- err
		}()
		waitFor(t, 10*time.Second, "LockAll to wait for b", func() bool { return e.waiting(bigint(b)) })
		if held, _ := e.heldKeys(a); len(held) != 1 {
			t.Fatal("LockAll should hold a while it waits for b")
		}
		_, rawErr := raw.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(a))
		if rawErr != nil {
			// The server ended the other client's wait: it lets go of b,
			// which LockAll waits for.
			if !strings.Contains(rawErr.Error(), "40P01") {
				t.Fatalf("the other client's wait: %v", rawErr)
			}
			if _, err := raw.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
				t.Fatal(err)
			}
		}
		var err error
		select {
		case err = <-res:
		case <-time.After(30 * time.Second):
			t.Fatal("LockAll did not return within 30 s")
		}
		switch {
		case rawErr == nil:
			wantErr(t, err, pglocks.ErrDeadlock)
			if n := strings.Count(err.Error(), pglocks.ErrDeadlock.Error()); n != 1 {
				t.Errorf("the cause is said %d times: %v", n, err)
			}
			// LockAll holds nothing: the other client got a.
			held, pids := e.heldKeys(a, b)
			if len(held) != 2 || len(pids) != 1 {
				t.Fatalf("want a and b held by the other client only: %v %v", held, pids)
			}
		case err != nil:
			t.Fatalf("both sides failed: %v / %v", err, rawErr)
		default:
			t.Logf("the server ended the other client's wait; LockAll got both")
			if held, pids := e.heldKeys(a, b); len(held) != 2 || len(pids) != 1 {
				t.Fatalf("want a and b held by LockAll: %v %v", held, pids)
			}
			if err := s.Release(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := raw.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
			t.Fatal(err)
		}
	})
}

func compareKey(a, b pglocks.Key) int {
	x, _ := a.Int64()
	y, _ := b.Int64()
	return cmpInt(x, y)
}

func mustInt64(k pglocks.Key) int64 {
	v, ok := k.Int64()
	if !ok {
		panic("not a bigint key")
	}
	return v
}

// Several processes take random subsets of a few keys, listed in random
// order, with LockAll and TryLockAll. None deadlocks, sections over a key
// never overlap (checked in a table the sections write), and a failed
// TryLockAll leaves nothing held (checked in pg_locks by each process).
func TestLockAllProcesses(t *testing.T) {
	t.Parallel()
	dsn := srv.DB(t)
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, fmt.Sprintf(`CREATE TABLE occupancy (k int PRIMARY KEY, holder int NOT NULL DEFAULT 0);
		INSERT INTO occupancy (k) SELECT generate_series(0, %d)`, helperKeys-1)); err != nil {
		t.Fatal(err)
	}
	const procs = 4
	dur := 5 * time.Second
	var wg sync.WaitGroup
	outs := make([]string, procs)
	errs := make([]error, procs)
	for p := range procs {
		wg.Go(func() {
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "PGLOCKS_HELPER=lockall", "PGLOCKS_HELPER_DSN="+dsn,
				"PGLOCKS_HELPER_ID="+strconv.Itoa(p+1), "PGLOCKS_HELPER_FOR="+dur.String())
			out, err := cmd.CombinedOutput()
			outs[p], errs[p] = string(out), err
		})
	}
	wg.Wait()
	total := 0
	for p := range procs {
		t.Logf("process %d: %s", p+1, strings.TrimSpace(outs[p]))
		if errs[p] != nil {
			t.Errorf("process %d: %v", p+1, errs[p])
			continue
		}
		var n, tries, busy int
		if _, err := fmt.Sscanf(outs[p], "sections %d tries %d busy %d", &n, &tries, &busy); err != nil {
			t.Errorf("process %d: %v", p+1, err)
		}
		if n < 20 {
			t.Errorf("process %d ran only %d sections", p+1, n)
		}
		total += n
	}
	t.Logf("%d sections in %v by %d processes", total, dur, procs)
	var left int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&left); err != nil {
		t.Fatal(err)
	}
	if left != 0 {
		t.Errorf("%d advisory locks left", left)
	}
}

// helperKeys is how many keys the processes of TestLockAllProcesses share.
const helperKeys = 6

// lockAllHelper is one process of TestLockAllProcesses.
func lockAllHelper() error {
	ctx := context.Background()
	id, _ := strconv.Atoi(os.Getenv("PGLOCKS_HELPER_ID"))
	dur, _ := time.ParseDuration(os.Getenv("PGLOCKS_HELPER_FOR"))
	pool, err := pgxpool.New(ctx, os.Getenv("PGLOCKS_HELPER_DSN"))
	if err != nil {
		return err
	}
	defer pool.Close()
	app := fmt.Sprintf("lockall-helper-%d", id)
	l, err := pglocks.New(pool, pglocks.WithApplicationName(app))
	if err != nil {
		return err
	}
	defer l.Close()
	ours := func() (int, error) { // advisory locks held by this process's Locker
		var n int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
			WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1`, app).Scan(&n)
		return n, err
	}
	sections, tries, busy := 0, 0, 0
	for end := time.Now().Add(dur); time.Now().Before(end); {
		n := 2 + rand.IntN(3)
		var keys []pglocks.Key
		var ks []int32
		for _, i := range rand.Perm(helperKeys)[:n] {
			keys = append(keys, pglocks.Pair(9000, int32(i)))
			ks = append(ks, int32(i))
		}
		if rand.IntN(4) == 0 {
			keys = append(keys, keys[0]) // a duplicate
		}
		var s *pglocks.LockSet
		if rand.IntN(3) == 0 {
			tries++
			s, err = l.TryLockAll(ctx, keys)
			if errors.Is(err, pglocks.ErrLocked) {
				busy++
				if n, err := ours(); err != nil || n != 0 {
					return fmt.Errorf("after a failed TryLockAll, %d locks held (%v)", n, err)
				}
				continue
			}
		} else {
			lctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			s, err = l.LockAll(lctx, keys)
			cancel()
		}
		if err != nil {
			return fmt.Errorf("LockAll(%v): %w", keys, err)
		}
		tag, err := pool.Exec(ctx, "UPDATE occupancy SET holder = $1 WHERE k = ANY($2) AND holder = 0", id, ks)
		if err != nil {
			return err
		}
		if int(tag.RowsAffected()) != n {
			return fmt.Errorf("keys %v: only %d of %d free: sections overlap", ks, tag.RowsAffected(), n)
		}
		if got, err := ours(); err != nil || got != n {
			return fmt.Errorf("holding %d locks for a set of %d (%v)", got, n, err)
		}
		time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
		tag, err = pool.Exec(ctx, "UPDATE occupancy SET holder = 0 WHERE k = ANY($1) AND holder = $2", ks, id)
		if err != nil || int(tag.RowsAffected()) != n {
			return fmt.Errorf("leaving: %d rows (%v): sections overlap", tag.RowsAffected(), err)
		}
		if err := s.Release(ctx); err != nil {
			return err
		}
		sections++
	}
	fmt.Printf("sections %d tries %d busy %d\n", sections, tries, busy)
	return nil
}
