package pglocks_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

func ExampleName() {
	// The same lock as SELECT pg_advisory_lock(hashtextextended('some lock', 0)).
	fmt.Println(pglocks.Name("some lock"))
	// The same lock as django-pglocks' advisory_lock('some lock').
	fmt.Println(pglocks.NameCRC32("some lock"))
	// Two key spaces: these are different locks.
	fmt.Println(pglocks.ID(1), pglocks.Pair(0, 1), pglocks.ID(1) == pglocks.Pair(0, 1))
	// Output:
	// 1837249113968243424
	// -205618829
	// 1 0,1 false
}

func ExampleLocker_Do() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	locker, err := pglocks.New(pool)
	if err != nil {
		panic(err)
	}
	defer locker.Close()

	// Wait at most a minute for the lock; the server enforces the deadline.
	lctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	err = locker.Do(lctx, pglocks.Name("nightly-report"), func(ctx context.Context) error {
		// Only one process runs this at a time. ctx is cancelled if the lock
		// is lost.
		return nil
	})
	if err != nil {
		fmt.Println(err)
	}
}

func ExampleLocker_TryDo() {
	var locker *pglocks.Locker // from pglocks.New
	err := locker.TryDo(context.Background(), pglocks.Pair(42, 7), func(ctx context.Context) error {
		return nil // tenant 42, job 7
	})
	if errors.Is(err, pglocks.ErrLocked) {
		fmt.Println("another process is on it; skipping")
	}
}

func ExampleLocker_Lock() {
	var locker *pglocks.Locker // from pglocks.New
	ctx := context.Background()
	lk, err := locker.Lock(ctx, pglocks.ID(123))
	if err != nil {
		panic(err)
	}
	defer lk.Release(ctx)
	select {
	case <-lk.Done(): // lost: stop working
		fmt.Println(lk.Err())
	default:
	}
}

func ExampleLockTx() {
	var pool *pgxpool.Pool // from pgxpool.New
	ctx := context.Background()
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		// Held until the transaction ends.
		if err := pglocks.LockTx(ctx, tx, pglocks.Name("order-123")); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "UPDATE orders SET state = 'shipped' WHERE id = 123")
		return err
	})
	if err != nil {
		fmt.Println(err)
	}
}

func ExampleKey_Slot() {
	// The slots of "exports", as psql computes them:
	//   SELECT (h >> 32)::int4, h::bit(32)::int4
	//   FROM (SELECT hashtextextended('pglocks:slot:' || hashtextextended('exports', 0) || ':0', 0) AS h) s;
	key := pglocks.Name("exports")
	fmt.Println(key.Slot(0), key.Slot(1))
	// Output:
	// -1306874080,1454835381 -2004245526,1298116869
}

// The examples below are README.md's code, between the README markers (see
// DEVELOPERS.md); what comes before sets up what that code is handed.

// Taking locks, in a function that returns an error (README.md, "Use").
func Example() {
	dsn, done := exampleDB(
		"CREATE TABLE orders (id int PRIMARY KEY, state text)",
		"INSERT INTO orders VALUES (123, 'new')")
	defer done()
	err := func(ctx context.Context) error {
		// README:begin
		pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
		if err != nil {
			return err
		}
		defer pool.Close()
		locker, err := pglocks.New(pool) // one per process; pglocks.NewDB(db) for database/sql
		if err != nil {
			return err
		}
		defer locker.Close()

		// Run the report holding the lock, and release it. The wait for the
		// lock ends with ctx (the server enforces its deadline), and the
		// report's ctx is cancelled if the lock is lost.
		err = locker.Do(ctx, pglocks.Name("nightly-report"), runReport)
		if err != nil {
			return err
		}

		// Or skip the report if someone else is on it.
		err = locker.TryDo(ctx, pglocks.Pair(42, 7), runReport)
		if err != nil && !errors.Is(err, pglocks.ErrLocked) {
			return err
		}

		// Transaction locks end with the transaction: DoTx begins one, takes
		// the lock in it, runs fn and commits (pglocks.LockTx takes one in
		// a transaction of yours).
		err = locker.DoTx(ctx, pglocks.Name("order-123"), func(ctx context.Context, tx pgx.Tx) error {
			_, err := tx.Exec(ctx, "UPDATE orders SET state = 'shipped' WHERE id = 123")
			return err
		})
		if err != nil {
			return err
		}

		// Or hold a lock across calls, until Release. Done is closed if it is
		// lost (its server session ended), and Err says why.
		lk, err := locker.Lock(ctx, pglocks.ID(123), pglocks.Shared())
		if err != nil {
			return err
		}
		defer lk.Release(ctx) // on every path; releasing twice is harmless
		for part := range 3 {
			select {
			case <-lk.Done(): // lost: stop
				return lk.Err()
			default:
			}
			if err := exportPart(ctx, part); err != nil {
				return err
			}
		}
		return lk.Release(ctx) // an error if the lock was lost meanwhile
		// README:end
	}(context.Background())
	fmt.Println(err)
	fmt.Println("order 123:", exampleQuery(dsn, "SELECT state FROM orders WHERE id = 123"))
	// Output:
	// report
	// report
	// exported part 0
	// exported part 1
	// exported part 2
	// <nil>
	// order 123: shipped
}

// One replica at a time runs the relay (README.md, "Leader election").
func ExampleLocker_Lead() {
	locker, done := exampleLocker(pglocks.WithFencingTokens())
	defer done()
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	// The leader's work; here the replica stops once it has begun.
	relay := func(ctx context.Context, token int64) error {
		fmt.Println("relaying, with a token:", token > 0)
		stop()
		<-ctx.Done()
		return nil
	}
	err := func() error {
		// README:begin
		// Runs relay on one replica at a time, until ctx ends. relay's ctx is
		// cancelled the moment leadership is lost; when relay returns, leadership
		// passes to the replica that waited longest, and this one campaigns again.
		err := locker.Lead(ctx, pglocks.Name("outbox-relay"), func(ctx context.Context) error {
			return relay(ctx, pglocks.FencingToken(ctx)) // with WithFencingTokens: higher each term
		})
		if ctx.Err() != nil {
			return nil // ctx ended: this replica stops
		}
		return err // Lead gave up: ErrClosed, ErrStandby, ...
		// README:end
	}()
	fmt.Println(err)
	// Output:
	// relaying, with a token: true
	// <nil>
}

// Who leads, asked from any replica (README.md, "Leader election").
func ExampleLocker_Leader() {
	locker, done := exampleLocker()
	defer done()
	// A leader, elected before the README's code asks.
	leading, resign := context.WithCancel(context.Background())
	elected := make(chan struct{}, 1)
	led := make(chan error, 1)
	go func() {
		led <- locker.Lead(leading, pglocks.Name("outbox-relay"), func(ctx context.Context) error {
			select {
			case elected <- struct{}{}:
			default:
			}
			<-ctx.Done()
			return nil
		})
	}()
	<-elected
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	// What the code does with a leader; here it stops after two.
	shown := 0
	showLeader := func(h pglocks.Holder) {
		fmt.Println("someone leads:", h.PID != 0)
		if shown++; shown == 2 {
			stop()
		}
	}
	err := func() error {
		// README:begin
		// Who leads now (pid, application name, address, since when): a zero
		// Holder, and ErrNoLeader, when nobody does.
		h, err := locker.Leader(ctx, pglocks.Name("outbox-relay"))
		if err != nil && !errors.Is(err, pglocks.ErrNoLeader) {
			return err
		}
		showLeader(h)

		// Or each change of leader, until ctx ends: first the leader now.
		for h := range locker.Observe(ctx, pglocks.Name("outbox-relay")) {
			showLeader(h)
		}
		// README:end
		return nil
	}()
	fmt.Println(err)
	resign()
	<-led
	// Output:
	// someone leads: true
	// someone leads: true
	// <nil>
}

// Several keys at once (README.md, "Several keys at once").
func ExampleLocker_DoAll() {
	locker, done := exampleLocker()
	defer done()
	ctx := context.Background()
	from, to := int64(1), int64(2)
	err := func() error {
		// README:begin
		// All or nothing; keys are taken in one global order whatever the order
		// given, so two LockAll callers never deadlock each other.
		keys := []pglocks.Key{pglocks.ID(from), pglocks.ID(to)}
		err := locker.DoAll(ctx, keys, func(ctx context.Context) error {
			return transfer(ctx, from, to)
		})
		if err != nil {
			return err
		}

		// Or as a LockSet (Done, Err and Release, as a Lock has), from LockAll
		// or, only if every key is free, from TryLockAll: one round trip for
		// all the tries (pgx).
		set, err := locker.TryLockAll(ctx, keys)
		if errors.Is(err, pglocks.ErrLocked) {
			return nil // one of them is held elsewhere; none is held here
		}
		if err != nil {
			return err
		}
		err = transfer(ctx, from, to)
		return errors.Join(err, set.Release(ctx)) // Release: an error if a lock was lost
		// README:end
	}()
	fmt.Println(err)
	// Output:
	// transfer 1 -> 2
	// transfer 1 -> 2
	// <nil>
}

// At most 3 exports at once, fleet-wide (README.md, "At most N at a time").
func ExampleSlots() {
	locker, done := exampleLocker()
	defer done()
	ctx := context.Background()
	err := func() error {
		// README:begin
		// At most 3 exports at once, across every replica: each takes one of the
		// 3 slots of "exports", and waits for the first to free.
		err := locker.Do(ctx, pglocks.Name("exports"), export, pglocks.Slots(3))
		if err != nil {
			return err
		}

		// Or only if a slot is free.
		lk, err := locker.TryLock(ctx, pglocks.Name("exports"), pglocks.Slots(3))
		if errors.Is(err, pglocks.ErrLocked) {
			return nil // all 3 are held
		}
		if err != nil {
			return err
		}
		log.Printf("exporting in slot %d", lk.Slot()) // 0, 1 or 2
		err = export(ctx)
		return errors.Join(err, lk.Release(ctx))
		// README:end
	}()
	fmt.Println(err)
	// Output:
	// export
	// exporting in slot 0
	// export
	// <nil>
}

// Once per window, whatever the replicas' clocks (README.md, "Once per
// window"): run twice in the window, the report runs once.
func ExampleMinHold() {
	locker, done := exampleLocker()
	defer done()
	ctx := context.Background()
	cron := func() error {
		// README:begin
		// The report runs once per 5-minute window, though every replica's cron
		// starts it and their clocks differ by seconds: the lock stays held for 4
		// minutes after it was taken, however soon the report is done.
		err := locker.TryDo(ctx, pglocks.Name("nightly-report"), runReport, pglocks.MinHold(4*time.Minute))
		if errors.Is(err, pglocks.ErrLocked) {
			log.Print("nightly-report: done this window already")
			return nil
		}
		return err
		// README:end
	}
	fmt.Println(cron())
	fmt.Println(cron())
	// Output:
	// report
	// <nil>
	// nightly-report: done this window already
	// <nil>
}
