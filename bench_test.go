package pglocks_test

import (
	"context"
	"database/sql"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/benchkit"
)

// The benchmarks measure pglocks against hand-written pgx doing the same
// work, in the same run, on the test harness's server:
//
//	go test -run '^$' -bench . -count 6 . | tee new.txt && benchstat new.txt
//
// Each reports what the issue asks for as extra metrics.

func benchPool(b *testing.B, dsn string, max int32) *pgxpool.Pool {
	b.Helper()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		b.Fatal(err)
	}
	cfg.MaxConns = max
	p, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.Close)
	return p
}

func benchLocker(b *testing.B, p *pgxpool.Pool, opts ...pglocks.Option) *pglocks.Locker {
	b.Helper()
	l, err := pglocks.New(p, opts...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = l.Close() })
	return l
}

// backendsOf counts the server sessions connected to database db.
func backendsOf(b *testing.B, db string) int {
	var n int
	if err := srv.Admin.QueryRow(context.Background(),
		"SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'", db).Scan(&n); err != nil {
		b.Fatal(err)
	}
	return n
}

func dbOf(dsn string) string { return dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")] }

// B1: one goroutine, Lock+Release of one key.
func BenchmarkUncontended(b *testing.B) {
	b.Run("raw", func(b *testing.B) { benchkit.Uncontended(b, benchkit.Raw(b, srv.DB(b), 1)) })
	b.Run("pglocks", func(b *testing.B) { benchkit.Uncontended(b, benchkit.Pglocks(b, srv.DB(b), pglocks.ID(1))) })
	b.Run("pglocks-nowait", func(b *testing.B) {
		benchkit.Uncontended(b, benchkit.PglocksNoWait(b, srv.DB(b), pglocks.ID(1)))
	})
}

// B1 through database/sql: NewDB beside raw ExecContext on a *sql.Conn, each
// through the same driver (pgx's stdlib, lib/pq).
func BenchmarkUncontendedSQL(b *testing.B) {
	for _, drv := range []struct{ name, driver string }{{"stdlib", "pgx"}, {"libpq", "postgres"}} {
		open := func(b *testing.B) *sql.DB {
			db, err := sql.Open(drv.driver, srv.DB(b))
			if err != nil {
				b.Fatal(err)
			}
			db.SetMaxOpenConns(4)
			b.Cleanup(func() { _ = db.Close() })
			return db
		}
		b.Run(drv.name+"/raw", func(b *testing.B) { benchkit.Uncontended(b, benchkit.RawSQL(b, open(b), 1)) })
		b.Run(drv.name+"/pglocks", func(b *testing.B) {
			benchkit.Uncontended(b, benchkit.PglocksDB(b, open(b), pglocks.ID(1), false))
		})
		b.Run(drv.name+"/pglocks-nowait", func(b *testing.B) {
			benchkit.Uncontended(b, benchkit.PglocksDB(b, open(b), pglocks.ID(1), true))
		})
	}
}

// B2 through database/sql: 8 Lockers on NewDB beside 8 raw *sql.Conns,
// each through the same driver.
func BenchmarkHandoverSQL(b *testing.B) {
	const workers = 8
	for _, drv := range []struct{ name, driver string }{{"stdlib", "pgx"}, {"libpq", "postgres"}} {
		run := func(b *testing.B, newSession func(db *sql.DB) benchkit.Session) {
			dsn := srv.DB(b)
			sessions := make([]benchkit.Session, workers)
			for i := range sessions {
				db, err := sql.Open(drv.driver, dsn)
				if err != nil {
					b.Fatal(err)
				}
				db.SetMaxOpenConns(4)
				b.Cleanup(func() { _ = db.Close() })
				sessions[i] = newSession(db)
			}
			benchkit.Handover(b, sessions)
		}
		b.Run(drv.name+"/raw", func(b *testing.B) {
			run(b, func(db *sql.DB) benchkit.Session { return benchkit.RawSQL(b, db, 7) })
		})
		b.Run(drv.name+"/pglocks", func(b *testing.B) {
			run(b, func(db *sql.DB) benchkit.Session { return benchkit.PglocksDB(b, db, pglocks.ID(7), false) })
		})
	}
}

// B2: 8 sessions hand one key over (see benchkit.Handover).
func BenchmarkHandover(b *testing.B) {
	const workers = 8
	run := func(b *testing.B, newSession func(dsn string) benchkit.Session) {
		dsn := srv.DB(b)
		sessions := make([]benchkit.Session, workers)
		for i := range sessions {
			sessions[i] = newSession(dsn)
		}
		benchkit.Handover(b, sessions)
	}
	b.Run("raw", func(b *testing.B) { run(b, func(dsn string) benchkit.Session { return benchkit.Raw(b, dsn, 7) }) })
	b.Run("pglocks", func(b *testing.B) {
		run(b, func(dsn string) benchkit.Session { return benchkit.Pglocks(b, dsn, pglocks.ID(7)) })
	})
}

// The curve: throughput of g goroutines, each on its own key, for g from 1
// to 512: pglocks on one Locker over a pool of 4 beside raw pgx with a pool
// sized to the goroutines (at most scaleRawMax: the test server allows 500
// connections), each cycle taking a connection, locking and unlocking. It
// reports locks/s and the server sessions used.
func BenchmarkScaling(b *testing.B) {
	for _, g := range []int{1, 8, 32, 128, 512} {
		b.Run(fmt.Sprintf("g=%d/raw", g), func(b *testing.B) {
			dsn := srv.DB(b)
			p := benchPool(b, dsn, int32(min(g, scaleRawMax)))
			scale(b, dsn, g, func(ctx context.Context, k int) error {
				c, err := p.Acquire(ctx)
				if err != nil {
					return err
				}
				defer c.Release()
				if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(k)); err != nil {
					return err
				}
				_, err = c.Exec(ctx, "SELECT pg_advisory_unlock($1)", int64(k))
				return err
			})
		})
		b.Run(fmt.Sprintf("g=%d/pglocks", g), func(b *testing.B) {
			dsn := srv.DB(b)
			l := benchLocker(b, benchPool(b, dsn, 4), pglocks.WithMaxConns(4))
			scale(b, dsn, g, func(ctx context.Context, k int) error {
				lk, err := l.Lock(ctx, pglocks.ID(int64(k)))
				if err != nil {
					return err
				}
				return lk.Release(ctx)
			})
		})
	}
}

// scaleRawMax bounds raw's pool in BenchmarkScaling.
const scaleRawMax = 256

// scale runs b.N cycles over g goroutines, goroutine k on key k, and
// reports locks/s and the most server sessions seen.
func scale(b *testing.B, dsn string, g int, cycle func(ctx context.Context, k int) error) {
	var left atomic.Int64
	left.Store(int64(b.N))
	var peak atomic.Int64
	var wg sync.WaitGroup
	ctx := context.Background()
	b.ResetTimer()
	began := time.Now()
	for k := range g {
		wg.Go(func() {
			for i := 0; left.Add(-1) >= 0; i++ {
				if err := cycle(ctx, k); err != nil {
					b.Error(err)
					return
				}
				if k == 0 && i%64 == 0 {
					if n := int64(backendsOf(b, dbOf(dsn))); n > peak.Load() {
						peak.Store(n)
					}
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(began).Seconds(), "locks/s")
	b.ReportMetric(float64(peak.Load()), "connections")
}

// B3: 32 goroutines, each on its own key: raw pins a connection each;
// pglocks shares one Locker over a pool of at most 4.
func BenchmarkParallelKeys(b *testing.B) {
	const goroutines = 32
	run := func(b *testing.B, dsn string, cycle func(ctx context.Context, g int) error) {
		var left atomic.Int64
		left.Store(int64(b.N))
		peak := 0
		var wg sync.WaitGroup
		ctx := context.Background()
		b.ResetTimer()
		for g := range goroutines {
			wg.Go(func() {
				for i := 0; left.Add(-1) >= 0; i++ {
					if err := cycle(ctx, g); err != nil {
						b.Error(err)
						return
					}
					if g == 0 && i%64 == 0 {
						peak = max(peak, backendsOf(b, dbOf(dsn)))
					}
				}
			})
		}
		wg.Wait()
		b.StopTimer()
		b.ReportMetric(float64(peak), "connections")
	}
	b.Run("raw", func(b *testing.B) {
		dsn := srv.DB(b)
		p := benchPool(b, dsn, goroutines)
		conns := make([]*pgxpool.Conn, goroutines)
		for i := range conns {
			c, err := p.Acquire(context.Background())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Release()
			conns[i] = c
		}
		run(b, dsn, func(ctx context.Context, g int) error {
			c := conns[g]
			if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(g)); err != nil {
				return err
			}
			_, err := c.Exec(ctx, "SELECT pg_advisory_unlock($1)", int64(g))
			return err
		})
	})
	b.Run("pglocks", func(b *testing.B) {
		dsn := srv.DB(b)
		l := benchLocker(b, benchPool(b, dsn, 4))
		run(b, dsn, func(ctx context.Context, g int) error {
			lk, err := l.Lock(ctx, pglocks.ID(int64(g)))
			if err != nil {
				return err
			}
			return lk.Release(ctx)
		})
	})
}

// B4: one Locker takes 10,000 distinct keys and holds them all; ns/lock is
// the time to take them (releasing is not timed).
func BenchmarkManyHeld(b *testing.B) {
	const n = 10000
	b.Run("raw-one-round-trip-each", func(b *testing.B) {
		c, err := benchPool(b, srv.DB(b), 1).Acquire(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Release()
		ctx := context.Background()
		for b.Loop() {
			for i := range n {
				if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(i)); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if _, err := c.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/lock")
	})
	b.Run("pglocks", func(b *testing.B) {
		dsn := srv.DB(b)
		l := benchLocker(b, benchPool(b, dsn, 4), pglocks.WithMaxLocks(n))
		ctx := context.Background()
		locks := make([]*pglocks.Lock, n)
		var conns int
		var perLock float64
		for b.Loop() {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			// Many goroutines, as a server handling requests would.
			var wg sync.WaitGroup
			for g := range 64 {
				wg.Go(func() {
					for i := g; i < n; i += 64 {
						lk, err := l.Lock(ctx, pglocks.ID(int64(i)))
						if err != nil {
							b.Error(err)
							return
						}
						locks[i] = lk
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			runtime.GC()
			runtime.ReadMemStats(&after)
			perLock = float64(after.HeapAlloc-before.HeapAlloc) / n
			conns = backendsOf(b, dbOf(dsn))
			for g := range 64 {
				wg.Go(func() {
					for i := g; i < n; i += 64 {
						if err := locks[i].Release(ctx); err != nil {
							b.Error(err)
						}
					}
				})
			}
			wg.Wait()
			clear(locks)
			b.StartTimer()
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/lock")
		b.ReportMetric(float64(conns), "connections")
		b.ReportMetric(perLock, "heap-B/lock")
	})
}

// B6: take 10 keys together and release them: raw pgx one statement per
// key, raw pgx batching the tries and the unlocks (what a careful hand
// would write), and TryLockAll + Release.
func BenchmarkLockAll10(b *testing.B) {
	const n = 10
	ctx := context.Background()
	raw := func(b *testing.B, batch bool) {
		p := benchPool(b, srv.DB(b), 4)
		c, err := p.Acquire(ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Release()
		oks := make([]bool, n)
		for b.Loop() {
			if batch {
				bt := &pgx.Batch{}
				for k := range n {
					bt.Queue("SELECT pg_try_advisory_lock($1)", int64(k))
				}
				br := c.SendBatch(ctx, bt)
				for k := range n {
					if err := br.QueryRow().Scan(&oks[k]); err != nil || !oks[k] {
						b.Fatal(oks[k], err)
					}
				}
				if err := br.Close(); err != nil {
					b.Fatal(err)
				}
				bt = &pgx.Batch{}
				for k := range n {
					bt.Queue("SELECT pg_advisory_unlock($1)", int64(k))
				}
				br = c.SendBatch(ctx, bt)
				for k := range n {
					if err := br.QueryRow().Scan(&oks[k]); err != nil || !oks[k] {
						b.Fatal(oks[k], err)
					}
				}
				if err := br.Close(); err != nil {
					b.Fatal(err)
				}
				continue
			}
			for k := range n {
				if err := c.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", int64(k)).Scan(&oks[k]); err != nil || !oks[k] {
					b.Fatal(oks[k], err)
				}
			}
			for k := range n {
				if err := c.QueryRow(ctx, "SELECT pg_advisory_unlock($1)", int64(k)).Scan(&oks[k]); err != nil || !oks[k] {
					b.Fatal(oks[k], err)
				}
			}
		}
	}
	b.Run("raw", func(b *testing.B) { raw(b, false) })
	b.Run("raw-batch", func(b *testing.B) { raw(b, true) })
	b.Run("pglocks", func(b *testing.B) {
		l := benchLocker(b, benchPool(b, srv.DB(b), 4))
		keys := make([]pglocks.Key, n)
		for k := range n {
			keys[k] = pglocks.ID(int64(n - k)) // in reverse: LockAll orders them
		}
		for b.Loop() {
			s, err := l.TryLockAll(ctx, keys)
			if err != nil {
				b.Fatal(err)
			}
			if err := s.Release(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// B7: 1,000 goroutines of one process wait for 1,000 keys that another
// process holds, through a pool of 4 that the application's own queries
// share; then the keys are freed. It reports the connections the waiters
// take while they wait, the application's query latency meanwhile (a
// query that does not run within a second counts as 1,000 ms), and the time
// from the release to the last waiter's acquisition.
//
//   - raw: what every lock library does, a pool connection per waiter in
//     pg_advisory_lock; freed by plain SQL.
//   - pglocks: one Locker over the pool; freed by plain SQL (found by the
//     poll), and by another Locker (which tells).
func BenchmarkManyWaiters(b *testing.B) {
	const n = 1000
	type waiters struct {
		pool    *pgxpool.Pool
		wait    func(ctx context.Context, k int64) error // takes and releases k
		waiting func() bool                              // all n wait (or queue for a connection)
	}
	run := func(b *testing.B, byLocker bool, newWaiters func(dsn string, started *atomic.Int64) waiters) {
		dsn := srv.DB(b)
		var started atomic.Int64
		w := newWaiters(dsn, &started)
		keys := make([]pglocks.Key, n)
		ids := make([]int64, n)
		for i := range keys {
			ids[i] = int64(1000 + i)
			keys[i] = pglocks.ID(ids[i])
		}
		holderPool := benchPool(b, dsn, 2)
		holder := benchLocker(b, holderPool, pglocks.WithMaxLocks(n))
		ctx := context.Background()
		var conns, lastMS, appMS []float64
		for b.Loop() {
			b.StopTimer()
			var free func()
			if byLocker {
				set, err := holder.TryLockAll(ctx, keys)
				if err != nil {
					b.Fatal(err)
				}
				free = func() {
					if err := set.Release(ctx); err != nil {
						b.Error(err)
					}
				}
			} else {
				c, err := holderPool.Acquire(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Exec(ctx, "SELECT pg_advisory_lock(k) FROM unnest($1::bigint[]) k", ids); err != nil {
					b.Fatal(err)
				}
				free = func() {
					if _, err := c.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
						b.Error(err)
					}
					c.Release()
				}
			}
			started.Store(0)
			var wg sync.WaitGroup
			var last atomic.Int64
			for _, id := range ids {
				wg.Go(func() {
					started.Add(1)
					if err := w.wait(ctx, id); err != nil {
						b.Error(err)
					}
					last.Store(max(last.Load(), time.Now().UnixNano()))
				})
			}
			for !w.waiting() {
				time.Sleep(5 * time.Millisecond)
			}
			conns = append(conns, float64(w.pool.Stat().AcquiredConns())) // by the waiters: none is the application's yet
			for range 3 {
				qctx, cancel := context.WithTimeout(ctx, time.Second)
				began := time.Now()
				_, err := w.pool.Exec(qctx, "SELECT 1")
				cancel()
				d := time.Since(began)
				if err != nil {
					d = time.Second
				}
				appMS = append(appMS, float64(d.Microseconds())/1000)
			}
			b.StartTimer()
			released := time.Now()
			free()
			wg.Wait()
			b.StopTimer()
			lastMS = append(lastMS, float64(time.Unix(0, last.Load()).Sub(released).Microseconds())/1000)
			b.StartTimer()
		}
		median := func(xs []float64) float64 {
			slices.Sort(xs)
			return xs[len(xs)/2]
		}
		b.ReportMetric(median(conns), "conns-while-waiting")
		b.ReportMetric(median(appMS), "app-query-ms")
		b.ReportMetric(median(lastMS), "release-to-last-ms")
	}
	b.Run("raw", func(b *testing.B) {
		run(b, false, func(dsn string, started *atomic.Int64) waiters {
			p := benchPool(b, dsn, 4)
			return waiters{
				pool: p,
				wait: func(ctx context.Context, k int64) error {
					c, err := p.Acquire(ctx)
					if err != nil {
						return err
					}
					defer c.Release()
					if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", k); err != nil {
						return err
					}
					_, err = c.Exec(ctx, "SELECT pg_advisory_unlock($1)", k)
					return err
				},
				waiting: func() bool {
					if started.Load() < n {
						return false
					}
					var w int
					_ = srv.Admin.QueryRow(context.Background(), `SELECT count(*) FROM pg_locks l JOIN pg_database d
						ON d.oid = l.database WHERE d.datname = $1 AND NOT l.granted`, dbOf(dsn)).Scan(&w)
					return w == 4 // the pool's every connection; the others queue for one
				},
			}
		})
	})
	for _, by := range []string{"sql", "locker"} {
		b.Run("pglocks-freed-by-"+by, func(b *testing.B) {
			run(b, by == "locker", func(dsn string, started *atomic.Int64) waiters {
				p := benchPool(b, dsn, 4)
				l := benchLocker(b, p, pglocks.WithMaxLocks(n))
				return waiters{
					pool: p,
					wait: func(ctx context.Context, k int64) error {
						lk, err := l.Lock(ctx, pglocks.ID(k))
						if err != nil {
							return err
						}
						return lk.Release(ctx)
					},
					waiting: func() bool {
						s, m := pglocks.WaitsForTest(l)
						return s+m == n
					},
				}
			})
		})
	}
}

// B8 (issue 13): what a slot costs. Lock+Release with Slots(n), n = 1, 4,
// 16, beside the plain key: uncontended (one goroutine: the first slot is
// free, one statement tries the free ones and stops at the first it gets),
// and contended (8 Lockers, as B2: a slot wait is multiplexed, woken by the
// releaser's notification, where a plain key waits in the server's queue).
func BenchmarkSlots(b *testing.B) {
	variants := []struct {
		name string
		opts []pglocks.LockOption
	}{{"key", nil}, {"slots-1", []pglocks.LockOption{pglocks.Slots(1)}},
		{"slots-4", []pglocks.LockOption{pglocks.Slots(4)}}, {"slots-16", []pglocks.LockOption{pglocks.Slots(16)}}}
	session := func(b *testing.B, dsn string, opts []pglocks.LockOption) benchkit.Session {
		l := benchLocker(b, benchPool(b, dsn, 4))
		var lk *pglocks.Lock
		return benchkit.Session{
			Lock:   func(ctx context.Context) (err error) { lk, err = l.Lock(ctx, pglocks.ID(8), opts...); return err },
			Unlock: func(ctx context.Context) error { return lk.Release(ctx) },
		}
	}
	for _, v := range variants {
		b.Run("uncontended/"+v.name, func(b *testing.B) { benchkit.Uncontended(b, session(b, srv.DB(b), v.opts)) })
	}
	for _, v := range variants {
		b.Run("contended-8/"+v.name, func(b *testing.B) {
			dsn := srv.DB(b)
			ss := make([]benchkit.Session, 8)
			for i := range ss {
				ss[i] = session(b, dsn, v.opts)
			}
			benchkit.Handover(b, ss)
		})
	}
}

// B5: hashing names.
func BenchmarkName(b *testing.B) {
	for _, size := range []int{16, 1024} {
		name := strings.Repeat("x", size)
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_ = pglocks.Name(name)
			}
		})
	}
}

// An idle Locker costs (almost) nothing: the CPU this process uses per
// second of doing nothing, beside a pool alone, with the Locker holding a
// lock, lingering after a release (its sessions kept ready for a while),
// and with nothing at all. Reported as cpu-ms/s; each op is one second.
func BenchmarkIdleCPU(b *testing.B) {
	idle := func(b *testing.B) {
		runtime.GC()
		b.ResetTimer()
		began, t0 := time.Now(), benchkit.ProcessCPU(b)
		for range b.N {
			time.Sleep(time.Second)
		}
		cpu := benchkit.ProcessCPU(b) - t0
		b.StopTimer()
		b.ReportMetric(float64(cpu.Microseconds())/1000/time.Since(began).Seconds(), "cpu-ms/s")
	}
	b.Run("pool", func(b *testing.B) {
		p := benchPool(b, srv.DB(b), 4)
		if err := p.Ping(b.Context()); err != nil {
			b.Fatal(err)
		}
		idle(b)
	})
	for _, state := range []string{"nothing", "holding", "lingering"} {
		b.Run("pglocks-"+state, func(b *testing.B) {
			l := benchLocker(b, benchPool(b, srv.DB(b), 4))
			switch state {
			case "holding":
				lk, err := l.Lock(b.Context(), pglocks.ID(1))
				if err != nil {
					b.Fatal(err)
				}
				defer lk.Release(context.Background())
			case "lingering":
				lk, err := l.Lock(b.Context(), pglocks.ID(1))
				if err != nil {
					b.Fatal(err)
				}
				if err := lk.Release(b.Context()); err != nil {
					b.Fatal(err)
				}
			}
			idle(b)
		})
	}
}
