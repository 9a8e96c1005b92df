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
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-migrate/migrate/v4/database/postgres"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3/lock"

	"github.com/pglocks/pglocks"
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

// locker is one library's lock on one session: lock waits, unlock releases.
type locker struct{ lock, unlock func() error }

func gooseLocker(b *testing.B, c *sql.Conn, id int64) locker {
	// goose polls pg_try_advisory_lock; 1 s is its shortest period.
	l, err := lock.NewPostgresSessionLocker(lock.WithLockID(id), lock.WithLockTimeout(1, 3600))
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	return locker{func() error { return l.SessionLock(ctx, c) }, func() error { return l.SessionUnlock(ctx, c) }}
}

func migrateLocker(b *testing.B, db *sql.DB) locker {
	d, err := postgres.WithInstance(db, &postgres.Config{})
	if err != nil {
		b.Fatal(err)
	}
	return locker{d.Lock, d.Unlock}
}

func pglocksLocker(b *testing.B, dsn string, key pglocks.Key) locker {
	p, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.Close)
	l, err := pglocks.New(p)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	var lk *pglocks.Lock
	return locker{
		func() (err error) { lk, err = l.Lock(context.Background(), key); return err },
		func() error { return lk.Release(context.Background()) },
	}
}

// B1: one goroutine, lock and unlock one key.
func BenchmarkUncontended(b *testing.B) {
	cases := map[string]func(b *testing.B, dsn string) locker{
		"goose":   func(b *testing.B, dsn string) locker { return gooseLocker(b, sqlConn(b, openDB(b, dsn)), 1) },
		"migrate": func(b *testing.B, dsn string) locker { return migrateLocker(b, openDB(b, dsn)) },
		"pglocks": func(b *testing.B, dsn string) locker { return pglocksLocker(b, dsn, pglocks.ID(1)) },
	}
	for _, name := range []string{"goose", "migrate", "pglocks"} {
		b.Run(name, func(b *testing.B) {
			l := cases[name](b, srv.DB(b))
			for b.Loop() {
				if err := l.lock(); err != nil {
					b.Fatal(err)
				}
				if err := l.unlock(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// B2: 8 sessions hand one key over; fairness and the longest wait.
func BenchmarkHandover(b *testing.B) {
	const workers = 8
	cases := map[string]func(b *testing.B, dsn string) locker{
		"goose":   func(b *testing.B, dsn string) locker { return gooseLocker(b, sqlConn(b, openDB(b, dsn)), 7) },
		"migrate": func(b *testing.B, dsn string) locker { return migrateLocker(b, openDB(b, dsn)) },
		"pglocks": func(b *testing.B, dsn string) locker { return pglocksLocker(b, dsn, pglocks.ID(7)) },
	}
	for _, name := range []string{"goose", "migrate", "pglocks"} {
		b.Run(name, func(b *testing.B) {
			dsn := srv.DB(b)
			ls := make([]locker, workers)
			for i := range ls {
				ls[i] = cases[name](b, dsn)
			}
			var left atomic.Int64
			left.Store(int64(b.N))
			counts := make([]int, workers)
			var mu sync.Mutex
			var longest time.Duration
			var wg sync.WaitGroup
			b.ResetTimer()
			for w := range workers {
				wg.Go(func() {
					for left.Add(-1) >= 0 {
						asked := time.Now()
						if err := ls[w].lock(); err != nil {
							b.Error(err)
							return
						}
						mu.Lock()
						counts[w]++
						longest = max(longest, time.Since(asked))
						mu.Unlock()
						if err := ls[w].unlock(); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(slices.Min(counts))/float64(max(slices.Max(counts), 1)), "fairness")
			b.ReportMetric(float64(longest.Milliseconds()), "longest-wait-ms")
		})
	}
}

// B4: one process takes 10,000 keys and holds them (goose: a locker per
// key on one connection; migrate has one lock per database and cannot).
func BenchmarkManyHeld(b *testing.B) {
	const n = 10000
	b.Run("goose", func(b *testing.B) {
		c := sqlConn(b, openDB(b, srv.DB(b)))
		ls := make([]locker, n)
		for i := range ls {
			ls[i] = gooseLocker(b, c, int64(i))
		}
		for b.Loop() {
			for _, l := range ls {
				if err := l.lock(); err != nil {
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
