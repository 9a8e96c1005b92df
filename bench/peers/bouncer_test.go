package peers

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pressly/goose/v3/lock"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/benchkit"
)

// Through PgBouncer in transaction pooling (issue 21): hand-written pgx
// holding a session lock inside an explicit transaction on one pinned
// connection, goose's table locker (the peers' answer to poolers: a lease
// row and a heartbeat), and pglocks, which pins its sessions itself.

// bouncerDSN is a database of b's own reached through a PgBouncer in
// transaction pooling of its own.
func bouncerDSN(b *testing.B) string {
	dsn := srv.DB(b)
	pb, err := srv.StartPgBouncer("transaction")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(pb.Stop)
	return pb.DB(dsn)
}

// rawPinned is hand-written pgx through a transaction pooler: one
// connection kept in an explicit transaction, pg_advisory_lock and
// pg_advisory_unlock inside it.
func rawPinned(b *testing.B, dsn string, key int64) benchkit.Session {
	c, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close(context.Background()) })
	if _, err := c.Exec(context.Background(), "BEGIN"); err != nil {
		b.Fatal(err)
	}
	return benchkit.Session{
		Lock: func(ctx context.Context) error {
			_, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", key)
			return err
		},
		Unlock: func(ctx context.Context) error {
			_, err := c.Exec(ctx, "SELECT pg_advisory_unlock($1)", key)
			return err
		},
	}
}

// gooseTable is goose's table locker on a *sql.DB of its own, retrying
// every 10 ms (its default is 5 s), with its default 30 s lease.
func gooseTable(b *testing.B, dsn string, key int64) benchkit.Session {
	l, err := lock.NewPostgresTableLocker(lock.WithTableLockID(key),
		lock.WithTableLockTimeout(10*time.Millisecond, 1_000_000))
	if err != nil {
		b.Fatal(err)
	}
	db := openDB(b, dsn)
	return benchkit.Session{
		Lock:   func(ctx context.Context) error { return l.Lock(ctx, db) },
		Unlock: func(ctx context.Context) error { return l.Unlock(ctx, db) },
	}
}

var bouncerLibraries = []struct {
	name    string
	session func(b *testing.B, dsn string, key int64) benchkit.Session
}{
	{"raw", rawPinned},
	{"goose-table", gooseTable},
	{"pglocks", func(b *testing.B, dsn string, key int64) benchkit.Session {
		return benchkit.Pglocks(b, dsn, pglocks.ID(key))
	}},
}

// B1 through PgBouncer: one goroutine, lock and unlock one key.
func BenchmarkBouncerUncontended(b *testing.B) {
	for _, lib := range bouncerLibraries {
		b.Run(lib.name, func(b *testing.B) { benchkit.Uncontended(b, lib.session(b, bouncerDSN(b), 1)) })
	}
}

// B2 through PgBouncer: 8 sessions hand one key over.
func BenchmarkBouncerHandover(b *testing.B) {
	const workers = 8
	for _, lib := range bouncerLibraries {
		b.Run(lib.name, func(b *testing.B) {
			dsn := bouncerDSN(b)
			ss := make([]benchkit.Session, workers)
			for i := range ss {
				ss[i] = lib.session(b, dsn, 7)
			}
			benchkit.Handover(b, ss)
		})
	}
}
