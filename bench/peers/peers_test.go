// Package peers benchmarks other Go advisory-lock libraries against pglocks
// in the same run, on the same throwaway server. It is a module of its own so
// that pglocks does not depend on them.
//
//	cd bench/peers && go test -run '^$' -bench . -count 5 | tee results.txt
//
// allisson/go-pglock is not here: the module proxy refuses it.
package peers

import (
	"context"
	"database/sql"
	"sync"
	"testing"

	"github.com/golang-migrate/migrate/v4/database/postgres"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3/lock"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/goosepglocks"
	"github.com/pglocks/pglocks/internal/benchkit"
	"github.com/pglocks/pglocks/internal/pgtest"
)

var srv *pgtest.Server

func TestMain(m *testing.M) { pgtest.Main(m, &srv, nil) }

func openDB(b *testing.B, dsn string) *sql.DB {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	return db
}

func sqlConn(b *testing.B, db *sql.DB) *sql.Conn {
	c, err := db.Conn(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

func gooseSession(b *testing.B, c *sql.Conn, id int64) benchkit.Session {
	// goose polls pg_try_advisory_lock; 1 s is its shortest period.
	l, err := lock.NewPostgresSessionLocker(lock.WithLockID(id), lock.WithLockTimeout(1, 3600))
	if err != nil {
		b.Fatal(err)
	}
	return benchkit.Session{
		Lock:   func(ctx context.Context) error { return l.SessionLock(ctx, c) },
		Unlock: func(ctx context.Context) error { return l.SessionUnlock(ctx, c) },
	}
}

// goosePglocksSession is goose's SessionLocker interface served by
// goosepglocks, on the *sql.Conn goose would pass.
func goosePglocksSession(b *testing.B, c *sql.Conn, id int64) benchkit.Session {
	l, err := goosepglocks.NewSessionLocker(goosepglocks.WithKey(pglocks.ID(id)))
	if err != nil {
		b.Fatal(err)
	}
	return benchkit.Session{
		Lock:   func(ctx context.Context) error { return l.SessionLock(ctx, c) },
		Unlock: func(ctx context.Context) error { return l.SessionUnlock(ctx, c) },
	}
}

func migrateSession(b *testing.B, db *sql.DB) benchkit.Session {
	d, err := postgres.WithInstance(db, &postgres.Config{})
	if err != nil {
		b.Fatal(err)
	}
	return benchkit.Session{
		Lock:   func(context.Context) error { return d.Lock() },
		Unlock: func(context.Context) error { return d.Unlock() },
	}
}

// libraries are the ways of holding one key on a session of its own, in the
// order each benchmark runs them: raw pgx first, pglocks last.
var libraries = []struct {
	name    string
	session func(b *testing.B, dsn string, key int64) benchkit.Session
}{
	{"raw", benchkit.Raw},
	{"goose", func(b *testing.B, dsn string, key int64) benchkit.Session {
		return gooseSession(b, sqlConn(b, openDB(b, dsn)), key)
	}},
	{"goosepglocks", func(b *testing.B, dsn string, key int64) benchkit.Session {
		return goosePglocksSession(b, sqlConn(b, openDB(b, dsn)), key)
	}},
	{"migrate", func(b *testing.B, dsn string, _ int64) benchkit.Session { return migrateSession(b, openDB(b, dsn)) }},
	{"pglocks", func(b *testing.B, dsn string, key int64) benchkit.Session {
		return benchkit.Pglocks(b, dsn, pglocks.ID(key))
	}},
}

// B1: one goroutine, lock and unlock one key.
func BenchmarkUncontended(b *testing.B) {
	for _, lib := range libraries {
		b.Run(lib.name, func(b *testing.B) { benchkit.Uncontended(b, lib.session(b, srv.DB(b), 1)) })
	}
}

// B2: 8 sessions hand one key over (see benchkit.Handover).
func BenchmarkHandover(b *testing.B) {
	const workers = 8
	for _, lib := range libraries {
		b.Run(lib.name, func(b *testing.B) {
			dsn := srv.DB(b)
			ss := make([]benchkit.Session, workers)
			for i := range ss {
				ss[i] = lib.session(b, dsn, 7)
			}
			benchkit.Handover(b, ss)
		})
	}
}

// B4: one process takes 10,000 keys and holds them (goose: a locker per
// key on one connection; migrate has one lock per database and cannot).
func BenchmarkManyHeld(b *testing.B) {
	const n = 10000
	b.Run("goose", func(b *testing.B) {
		c := sqlConn(b, openDB(b, srv.DB(b)))
		ls := make([]benchkit.Session, n)
		for i := range ls {
			ls[i] = gooseSession(b, c, int64(i))
		}
		ctx := context.Background()
		for b.Loop() {
			for _, l := range ls {
				if err := l.Lock(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if _, err := c.ExecContext(context.Background(), "SELECT pg_advisory_unlock_all()"); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/lock")
	})
	b.Run("pglocks", func(b *testing.B) {
		p, err := pgxpool.New(context.Background(), srv.DB(b))
		if err != nil {
			b.Fatal(err)
		}
		defer p.Close()
		l, err := pglocks.New(p, pglocks.WithMaxLocks(n))
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		locks := make([]*pglocks.Lock, n)
		for b.Loop() {
			var wg sync.WaitGroup
			for g := range 64 {
				wg.Go(func() {
					for i := g; i < n; i += 64 {
						lk, err := l.Lock(context.Background(), pglocks.ID(int64(i)))
						if err != nil {
							b.Error(err)
						}
						locks[i] = lk
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			for _, lk := range locks {
				_ = lk.Release(context.Background())
			}
			b.StartTimer()
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/lock")
	})
}
