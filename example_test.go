package pglocks_test

import (
	"context"
	"errors"
	"fmt"
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

func ExampleSlots() {
	var locker *pglocks.Locker // from pglocks.New
	ctx := context.Background()
	// At most 3 exports at once across every replica: each takes one of the
	// 3 slots of "exports", waiting for the first to free.
	err := locker.Do(ctx, pglocks.Name("exports"), func(ctx context.Context) error {
		return nil // the export
	}, pglocks.Slots(3))
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

func ExampleMinHold() {
	var locker *pglocks.Locker // from pglocks.New
	ctx := context.Background()
	// Every replica runs this every 5 minutes, with clocks a few seconds
	// apart. The first takes the lock and keeps it for at least 4 minutes,
	// however soon the report is done: the others find it held, and skip.
	err := locker.TryDo(ctx, pglocks.Name("nightly-report"), func(ctx context.Context) error {
		return nil // the report
	}, pglocks.MinHold(4*time.Minute))
	if errors.Is(err, pglocks.ErrLocked) {
		fmt.Println("done this window by another replica")
	}
}
