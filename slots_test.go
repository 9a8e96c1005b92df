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
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

func init() { helpers["slots"] = slotsHelper }

// Slot keys follow one rule, which psql can compute: the pair of the high
// and low 32 bits of hashtextextended('pglocks:slot:' || key || ':' || i, 0).
func TestSlotKeys(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		key  pglocks.Key
		i    int
		a, b int32
	}{
		{pglocks.ID(42), 0, 95493686, -2025900452},
		{pglocks.ID(42), 1, -2078623531, 1104712733},
		{pglocks.ID(42), 2, -2059388663, -1860263123},
		{pglocks.Name("nightly-report"), 0, -279508767, 2039122459},
		{pglocks.Pair(1, 2), 2, 1014117449, 2086859603},
	} {
		if got := tt.key.Slot(tt.i); got != pglocks.Pair(tt.a, tt.b) {
			t.Errorf("%v.Slot(%d) = %v, want %d,%d", tt.key, tt.i, got, tt.a, tt.b)
		}
	}
	// The server computes the same, with the SQL the docs give.
	for _, key := range []pglocks.Key{pglocks.ID(-7), pglocks.Name("report"), pglocks.Pair(-3, 9)} {
		for i := range 5 {
			var a, b int32
			err := srv.Admin.QueryRow(t.Context(), `SELECT (h >> 32)::int4, h::bit(32)::int4
				FROM (SELECT hashtextextended('pglocks:slot:' || $1 || ':' || $2, 0) AS h) s`, key.String(), strconv.Itoa(i)).Scan(&a, &b)
			if err != nil {
				t.Fatal(err)
			}
			if key.Slot(i) != pglocks.Pair(a, b) {
				t.Errorf("%v.Slot(%d) = %v, the server says %d,%d", key, i, key.Slot(i), a, b)
			}
		}
	}
	// Slot keys are pairs: never the bigint keys of ID, Name or NameCRC32;
	// nor, among 100,000 keys' first 16 slots, a small pair such as Pair or
	// IDRails make from counters (both halves under 2^20).
	seen := map[pglocks.Key]bool{}
	for n := range 100000 {
		k := pglocks.ID(int64(n))
		if n%2 == 1 {
			k = pglocks.Name(strconv.Itoa(n))
		}
		for i := range 16 {
			s := k.Slot(i)
			a, b, ok := s.Int32s()
			if !ok || (a >= -1<<20 && a < 1<<20 && b >= -1<<20 && b < 1<<20) {
				t.Fatalf("%v.Slot(%d) = %v: not a random-looking pair", k, i, s)
			}
			if seen[s] {
				t.Fatalf("%v.Slot(%d) = %v collides", k, i, s)
			}
			seen[s] = true
		}
	}
	if (pglocks.Key{}).Slot(0) != (pglocks.Key{}) || pglocks.ID(1).Slot(-1) != (pglocks.Key{}) {
		t.Error("Slot of the zero Key or a negative slot is not the zero Key")
	}
}

// Slots(3): three holders at most, each on a distinct slot, seen as such in
// pg_locks; a fourth try is ErrLocked, a waiter gets the first slot freed;
// bad uses are errors.
func TestSlots(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		key := testKey(t, 0)
		ls := []*pglocks.Locker{e.locker(4), e.locker(4), e.locker(4), e.locker(4, pglocks.WithFencingTokens())}
		var held []*pglocks.Lock
		slotsSeen := map[int]bool{}
		for _, l := range ls[:3] {
			lk, err := l.TryLock(ctx, key, pglocks.Slots(3))
			if err != nil {
				t.Fatal(err)
			}
			if lk.Key() != key || lk.Slot() < 0 || lk.Slot() > 2 || slotsSeen[lk.Slot()] {
				t.Fatalf("Key %v, Slot %d (seen %v)", lk.Key(), lk.Slot(), slotsSeen)
			}
			slotsSeen[lk.Slot()] = true
			if pids := e.held("pair " + key.Slot(lk.Slot()).String()); len(pids) != 1 {
				t.Fatalf("slot %d held by %v in pg_locks", lk.Slot(), pids)
			}
			held = append(held, lk)
		}
		_, err := ls[3].TryLock(ctx, key, pglocks.Slots(3))
		wantErr(t, err, pglocks.ErrLocked)
		// The same Locker's second goroutine gets no slot of its own either.
		_, err = ls[0].TryLock(ctx, key, pglocks.Slots(3))
		wantErr(t, err, pglocks.ErrLocked)
		// A plain lock of the key is another lock.
		mustRelease(t, mustLock(t, ls[3], key))

		got := make(chan *pglocks.Lock, 1)
		go func() {
			lk, err := ls[3].Lock(ctx, key, pglocks.Slots(3))
			if err != nil {
				t.Error(err)
			}
			got <- lk
		}()
		waitFor(t, 10*time.Second, "the slot waiter", func() bool { _, m := pglocks.WaitsForTest(ls[3]); return m == 1 })
		freed := held[1].Slot()
		mustRelease(t, held[1])
		lk := <-got
		if lk == nil {
			t.FailNow()
		}
		if lk.Slot() != freed || lk.Token() == 0 {
			t.Errorf("the waiter got slot %d (token %d), want the freed %d", lk.Slot(), lk.Token(), freed)
		}
		mustRelease(t, lk)
		mustRelease(t, held[0])
		mustRelease(t, held[2])

		// Do and TryDo with slots.
		if err := ls[0].Do(ctx, key, func(context.Context) error { return nil }, pglocks.Slots(2)); err != nil {
			t.Error(err)
		}
		if err := ls[0].TryDo(ctx, key, func(context.Context) error { return nil }, pglocks.Slots(2)); err != nil {
			t.Error(err)
		}
		// Bad uses: one clear error, nothing taken.
		for name, call := range map[string]func() error{
			"Slots(0)":       func() error { _, err := ls[0].Lock(ctx, key, pglocks.Slots(0)); return err },
			"Slots(1025)":    func() error { _, err := ls[0].Lock(ctx, key, pglocks.Slots(1025)); return err },
			"Shared+Slots":   func() error { _, err := ls[0].Lock(ctx, key, pglocks.Shared(), pglocks.Slots(2)); return err },
			"LockAll+Slots":  func() error { _, err := ls[0].LockAll(ctx, []pglocks.Key{key}, pglocks.Slots(2)); return err },
			"MinHold(0)":     func() error { _, err := ls[0].Lock(ctx, key, pglocks.MinHold(0)); return err },
			"LockTx+Slots":   func() error { return e.drv.begin(t, e).lock(ctx, key, true, pglocks.Slots(2)) },
			"LockTx+MinHold": func() error { return e.drv.begin(t, e).lock(ctx, key, true, pglocks.MinHold(time.Second)) },
		} {
			if err := call(); err == nil {
				t.Errorf("%s: accepted", name)
			}
		}
		if locks := e.locks(); len(locks) != 0 {
			t.Errorf("left: %v", locks)
		}
	})
}

// Ten processes with Slots(3) run short sections for a few seconds: never
// more than three at once (each section counts the rows of an occupancy
// table after adding its own, and each process checks pg_locks), every
// process gets in, nothing is left after.
func TestSlotsProcesses(t *testing.T) {
	t.Parallel()
	dsn := srv.DB(t)
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, `CREATE TABLE occupancy (proc int PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	const procs = 10
	dur := 4 * time.Second
	var wg sync.WaitGroup
	outs := make([]string, procs)
	errs := make([]error, procs)
	var most atomic.Int64 // the most slot holders pg_locks showed at once
	stop := make(chan struct{})
	go func() {
		key := pglocks.Name("report-builders")
		var slots []string
		for i := range 3 {
			a, b, _ := key.Slot(i).Int32s()
			slots = append(slots, fmt.Sprintf("(%d,%d)", uint32(a), uint32(b)))
		}
		q := `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
			AND (classid, objid) IN (` + strings.Join(slots, ",") + `)`
		for {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			var n int64
			if err := srv.Admin.QueryRow(context.Background(), q).Scan(&n); err == nil && n > most.Load() {
				most.Store(n)
			}
		}
	}()
	for p := range procs {
		wg.Go(func() {
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "PGLOCKS_HELPER=slots", "PGLOCKS_HELPER_DSN="+dsn,
				"PGLOCKS_HELPER_ID="+strconv.Itoa(p+1), "PGLOCKS_HELPER_FOR="+dur.String())
			out, err := cmd.CombinedOutput()
			outs[p], errs[p] = string(out), err
		})
	}
	wg.Wait()
	close(stop)
	total := 0
	for p := range procs {
		if errs[p] != nil {
			t.Errorf("process %d: %v: %s", p+1, errs[p], outs[p])
			continue
		}
		var n, cancelled int
		if _, err := fmt.Sscanf(outs[p], "sections %d cancelled %d", &n, &cancelled); err != nil {
			t.Errorf("process %d: %v: %q", p+1, err, outs[p])
		}
		if n == 0 {
			t.Errorf("process %d never got a slot", p+1)
		}
		total += n
	}
	t.Logf("%d sections in %v by %d processes on 3 slots; pg_locks showed at most %d slots held at once", total, dur, procs, most.Load())
	if most.Load() > 3 {
		t.Errorf("pg_locks showed %d slots held", most.Load())
	}
	var left int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&left); err != nil {
		t.Fatal(err)
	}
	if left != 0 {
		t.Errorf("%d advisory locks left", left)
	}
}

// slotsHelper is one process of TestSlotsProcesses: it takes one of three
// slots of "report-builders", checks the occupancy, and sometimes gives up
// waiting (a cancellation).
func slotsHelper() error {
	ctx := context.Background()
	id, _ := strconv.Atoi(os.Getenv("PGLOCKS_HELPER_ID"))
	dur, _ := time.ParseDuration(os.Getenv("PGLOCKS_HELPER_FOR"))
	pool, err := pgxpool.New(ctx, os.Getenv("PGLOCKS_HELPER_DSN"))
	if err != nil {
		return err
	}
	defer pool.Close()
	// Ten of these beside the rest of the suite under -race: a statement
	// can take longer than the default 1 s heartbeat timeout, which closes
	// its connection (seen once in CI); this test is about the slots, not
	// about that bound.
	l, err := pglocks.New(pool, pglocks.WithHeartbeat(time.Second, 5*time.Second))
	if err != nil {
		return err
	}
	defer l.Close()
	key := pglocks.Name("report-builders")
	sections, cancelled := 0, 0
	for end := time.Now().Add(dur); time.Now().Before(end); {
		lctx, cancel := context.WithTimeout(ctx, time.Duration(50+rand.IntN(500))*time.Millisecond)
		lk, err := l.Lock(lctx, key, pglocks.Slots(3))
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			cancelled++
			continue
		}
		if err != nil {
			return err
		}
		if _, err := pool.Exec(ctx, "INSERT INTO occupancy VALUES ($1)", id); err != nil {
			return err
		}
		var n int
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM occupancy").Scan(&n); err != nil {
			return err
		}
		if n > 3 {
			return fmt.Errorf("%d sections at once on 3 slots", n)
		}
		time.Sleep(time.Duration(rand.IntN(20)) * time.Millisecond)
		if _, err := pool.Exec(ctx, "DELETE FROM occupancy WHERE proc = $1", id); err != nil {
			return err
		}
		if err := lk.Release(ctx); err != nil {
			return err
		}
		sections++
	}
	fmt.Printf("sections %d cancelled %d\n", sections, cancelled)
	return nil
}

// A storm of cancellations among goroutines waiting for slots leaves
// nothing held or queued: 100 goroutines of two Lockers wait for 4 slots
// held elsewhere, give up at random moments while slots free and refill.
func TestSlotsCancelStorm(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		key := testKey(t, 0)
		holder := e.locker(4)
		var held []*pglocks.Lock
		for range 4 {
			held = append(held, mustLock(t, holder, key, pglocks.Slots(4)))
		}
		ls := []*pglocks.Locker{e.locker(4), e.locker(4)}
		var wg sync.WaitGroup
		var got, gaveUp atomic.Int32
		for g := range 100 {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(t.Context(), time.Duration(rand.IntN(800))*time.Millisecond)
				defer cancel()
				lk, err := ls[g%2].Lock(ctx, key, pglocks.Slots(4))
				if err != nil {
					if !errors.Is(err, context.DeadlineExceeded) {
						t.Error(err)
					}
					gaveUp.Add(1)
					return
				}
				got.Add(1)
				time.Sleep(time.Duration(rand.IntN(5)) * time.Millisecond)
				if err := lk.Release(context.Background()); err != nil {
					t.Error(err)
				}
			})
		}
		time.Sleep(200 * time.Millisecond)
		for _, lk := range held[:2] {
			mustRelease(t, lk)
		}
		wg.Wait()
		t.Logf("%d got a slot, %d gave up", got.Load(), gaveUp.Load())
		if got.Load() == 0 || gaveUp.Load() == 0 {
			t.Error("the storm did not exercise both outcomes")
		}
		for _, lk := range held[2:] {
			mustRelease(t, lk)
		}
		for _, l := range ls {
			waitWaits(t, l, 0, 0)
		}
		if locks := e.locks(); len(locks) != 0 {
			t.Errorf("left after the storm: %v", locks)
		}
	})
}

// Goroutines of one Locker that TryLock the free slots at the same moment
// all get one: a try that finds the others' tries claiming every free slot
// waits for them to end rather than answer ErrLocked while slots are free.
func TestSlotsConcurrentTry(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		key := testKey(t, 0)
		l := e.locker(4)
		const n = 4
		for round := range 20 {
			var wg sync.WaitGroup
			start := make(chan struct{})
			locks := make([]*pglocks.Lock, n)
			errs := make([]error, n)
			for g := range n {
				wg.Go(func() {
					<-start
					locks[g], errs[g] = l.TryLock(t.Context(), key, pglocks.Slots(n))
				})
			}
			close(start)
			wg.Wait()
			seen := map[int]bool{}
			for g := range n {
				if errs[g] != nil {
					t.Fatalf("round %d: %d free slots, %d concurrent tries: %v", round, n, n, errs[g])
				}
				if seen[locks[g].Slot()] {
					t.Fatalf("round %d: slot %d given twice", round, locks[g].Slot())
				}
				seen[locks[g].Slot()] = true
			}
			// All held now: a fifth try says ErrLocked.
			_, err := l.TryLock(t.Context(), key, pglocks.Slots(n))
			wantErr(t, err, pglocks.ErrLocked)
			for _, lk := range locks {
				mustRelease(t, lk)
			}
		}
		if locks := e.locks(); len(locks) != 0 {
			t.Errorf("left: %v", locks)
		}
	})
}

// MinHold: the lock stays held on the server until d after the grant,
// though Release returned at once; then it goes. A lost session still
// reports the loss during a minimum hold, and Close ends one.
func TestMinHold(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		key := testKey(t, 0)
		a, b := e.locker(4), e.locker(4)
		const d = 1500 * time.Millisecond
		lk, err := a.Lock(ctx, key, pglocks.MinHold(d))
		if err != nil {
			t.Fatal(err)
		}
		granted := time.Now()
		began := time.Now()
		mustRelease(t, lk)
		if time.Since(began) > d/2 {
			t.Errorf("Release waited %v for the minimum hold", time.Since(began))
		}
		wantErr(t, lk.Err(), pglocks.ErrReleased)
		var free time.Duration
		for {
			lb, err := b.TryLock(ctx, key)
			if err == nil {
				free = time.Since(granted)
				mustRelease(t, lb)
				break
			}
			wantErr(t, err, pglocks.ErrLocked)
			if time.Since(granted) > d+10*time.Second {
				t.Fatal("the minimum hold did not end")
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("another Locker had the key %v after the grant (MinHold %v)", free.Round(time.Millisecond), d)
		if free < d {
			t.Errorf("another Locker had the key %v after the grant, before MinHold's %v", free, d)
		}

		// Do's fn returns at once; Do does too, and the key stays held.
		began = time.Now()
		if err := a.Do(ctx, key, func(context.Context) error { return nil }, pglocks.MinHold(10*time.Second)); err != nil {
			t.Fatal(err)
		}
		if time.Since(began) > 5*time.Second {
			t.Errorf("Do waited %v for the minimum hold", time.Since(began))
		}
		_, err = b.TryLock(ctx, key)
		wantErr(t, err, pglocks.ErrLocked)

		// A goroutine of the same Locker waits out the hold too.
		_, err = a.TryLock(ctx, key)
		wantErr(t, err, pglocks.ErrLocked)

		// A loss during a minimum hold is reported.
		k2 := testKey(t, 2)
		l2, err := a.Lock(ctx, k2, pglocks.MinHold(time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", e.held(bigint(k2))[0]); err != nil {
			t.Fatal(err)
		}
		select {
		case <-l2.Done():
			wantErr(t, l2.Err(), pglocks.ErrLockLost)
		case <-time.After(10 * time.Second):
			t.Fatal("a loss during a minimum hold was not reported")
		}

		// Close ends the hold of key. (If key was on the terminated
		// session, the server frees it as that backend exits, which may
		// come a moment after the loss was reported: hence the retries.)
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		var lb *pglocks.Lock
		waitFor(t, 5*time.Second, "the minimum hold to end after Close", func() bool {
			lb, err = b.TryLock(ctx, key)
			return err == nil
		})
		mustRelease(t, lb)
		if slices.ContainsFunc(e.locks(), func(r lockRow) bool { return r.granted }) {
			t.Errorf("left: %v", e.locks())
		}
	})
}
