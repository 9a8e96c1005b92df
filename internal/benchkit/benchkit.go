// Package benchkit holds the benchmark loops that pglocks and its peers
// (bench/peers, a module of its own) run the same way, so that figures from
// one run compare like with like.
package benchkit

import (
	"context"
	"database/sql"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

// Session is one library's hold of one key from a session of its own: Lock
// waits for the key, Unlock lets it go.
type Session struct {
	Lock, Unlock func(ctx context.Context) error
}

// Raw is hand-written pgx on a connection of its own: pg_advisory_lock and
// pg_advisory_unlock of key.
func Raw(b *testing.B, dsn string, key int64) Session {
	c := connect(b, dsn)
	return Session{
		Lock: func(ctx context.Context) error {
			_, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", key)
			return err
		},
		Unlock: rawUnlock(c, key),
	}
}

// RawTry is hand-written pgx on a connection of its own:
// pg_try_advisory_lock and pg_advisory_unlock of key. A lock not had is
// pglocks.ErrLocked, as the libraries say it.
func RawTry(b *testing.B, dsn string, key int64) Session {
	c := connect(b, dsn)
	return Session{
		Lock: func(ctx context.Context) error {
			var ok bool
			if err := c.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", key).Scan(&ok); err != nil {
				return err
			}
			if !ok {
				return pglocks.ErrLocked
			}
			return nil
		},
		Unlock: rawUnlock(c, key),
	}
}

// RawSQL is hand-written database/sql on a *sql.Conn of its own from db:
// pg_advisory_lock and pg_advisory_unlock of key, through db's driver.
func RawSQL(b *testing.B, db *sql.DB, key int64) Session {
	c, err := db.Conn(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	return Session{
		Lock: func(ctx context.Context) error {
			_, err := c.ExecContext(ctx, "SELECT pg_advisory_lock($1)", key)
			return err
		},
		Unlock: func(ctx context.Context) error {
			var ok bool
			if err := c.QueryRowContext(ctx, "SELECT pg_advisory_unlock($1)", key).Scan(&ok); err != nil {
				return err
			}
			if !ok {
				return errNotHeld
			}
			return nil
		},
	}
}

// PglocksDB is a Locker on db (NewDB) taking key, releasing with Release,
// or ReleaseNoWait if noWait.
func PglocksDB(b *testing.B, db *sql.DB, key pglocks.Key, noWait bool) Session {
	l, err := pglocks.NewDB(db)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = l.Close() })
	var lk *pglocks.Lock
	return Session{
		Lock: func(ctx context.Context) (err error) { lk, err = l.Lock(ctx, key); return err },
		Unlock: func(ctx context.Context) error {
			if noWait {
				return lk.ReleaseNoWait(ctx)
			}
			return lk.Release(ctx)
		},
	}
}

// connect opens a connection of b's own.
func connect(b *testing.B, dsn string) *pgx.Conn {
	c, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// rawUnlock is pg_advisory_unlock of key on c.
func rawUnlock(c *pgx.Conn, key int64) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		var ok bool
		if err := c.QueryRow(ctx, "SELECT pg_advisory_unlock($1)", key).Scan(&ok); err != nil {
			return err
		}
		if !ok {
			return errNotHeld
		}
		return nil
	}
}

var errNotHeld = errors.New("the lock was not held")

// Pglocks is a Locker of its own (see Locker), taking key.
func Pglocks(b *testing.B, dsn string, key pglocks.Key, opts ...pglocks.Option) Session {
	l := Locker(b, dsn, opts...)
	var lk *pglocks.Lock
	return Session{
		Lock:   func(ctx context.Context) (err error) { lk, err = l.Lock(ctx, key); return err },
		Unlock: func(ctx context.Context) error { return lk.Release(ctx) },
	}
}

// PglocksNoWait is Pglocks releasing with Lock.ReleaseNoWait.
func PglocksNoWait(b *testing.B, dsn string, key pglocks.Key, opts ...pglocks.Option) Session {
	l := Locker(b, dsn, opts...)
	var lk *pglocks.Lock
	return Session{
		Lock:   func(ctx context.Context) (err error) { lk, err = l.Lock(ctx, key); return err },
		Unlock: func(ctx context.Context) error { return lk.ReleaseNoWait(ctx) },
	}
}

// Locker is a Locker of b's own, over a pool of 4, as another process would
// have.
func Locker(b *testing.B, dsn string, opts ...pglocks.Option) *pglocks.Locker {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		b.Fatal(err)
	}
	cfg.MaxConns = 4
	p, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.Close)
	l, err := pglocks.New(p, opts...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = l.Close() })
	return l
}

// ProcessCPU is the CPU time this process has used (user and system).
func ProcessCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the CPU this process used per op since began, as
// cpu-µs/op: the client's cost, whatever its wall time.
func reportCPU(b *testing.B, began time.Duration) {
	b.ReportMetric(float64((ProcessCPU(b)-began).Microseconds())/float64(b.N), "cpu-µs/op")
}

// Uncontended is B1: one goroutine takes and lets go of one key. It
// reports the process's CPU per cycle.
func Uncontended(b *testing.B, s Session) {
	ctx := context.Background()
	began := ProcessCPU(b)
	defer func() { reportCPU(b, began) }()
	for b.Loop() {
		if err := s.Lock(ctx); err != nil {
			b.Fatal(err)
		}
		if err := s.Unlock(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// waitOnce makes each session wait for the key once, in turn, while the
// one before holds it, untimed: a library that opens a connection for its
// first wait (pglocks) has it open before the timed loop, as a raw session
// has from the start.
func waitOnce(b *testing.B, sessions []Session) {
	ctx := context.Background()
	if err := sessions[len(sessions)-1].Lock(ctx); err != nil {
		b.Fatal(err)
	}
	for i, s := range sessions {
		got := make(chan error, 1)
		go func() { got <- s.Lock(ctx) }()
		time.Sleep(20 * time.Millisecond) // in the server's queue by now
		holder := sessions[(i+len(sessions)-1)%len(sessions)]
		if err := holder.Unlock(ctx); err != nil {
			b.Fatal(err)
		}
		if err := <-got; err != nil {
			b.Fatal(err)
		}
	}
	if err := sessions[len(sessions)-1].Unlock(ctx); err != nil {
		b.Fatal(err)
	}
}

// Handover is B2: the sessions, one goroutine each, hand one key over b.N
// times in all. Every session first waits for the key once (see waitOnce)
// and takes it twice, untimed, so that connections are open and readied. It reports the hand-over latency (from
// the holder's Unlock being called to the next holder's Lock returning,
// p50 and p99), the process's CPU per hand-over, fairness (the fewest acquisitions of a session over the
// most) and the longest single wait.
func Handover(b *testing.B, sessions []Session) {
	ctx := context.Background()
	waitOnce(b, sessions)
	var warm sync.WaitGroup
	for _, s := range sessions {
		warm.Go(func() {
			for range 2 {
				if err := s.Lock(ctx); err != nil {
					b.Error(err)
					return
				}
				if err := s.Unlock(ctx); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	warm.Wait()
	var (
		released atomic.Int64 // UnixNano of the last Unlock call
		mu       sync.Mutex
		handover []time.Duration
		counts   = make([]int, len(sessions))
		longest  time.Duration
		left     atomic.Int64
	)
	left.Store(int64(b.N))
	began := ProcessCPU(b)
	b.ResetTimer()
	var wg sync.WaitGroup
	for w, s := range sessions {
		wg.Go(func() {
			for left.Add(-1) >= 0 {
				asked := time.Now()
				if err := s.Lock(ctx); err != nil {
					b.Error(err)
					return
				}
				got := time.Now()
				mu.Lock()
				if r := released.Load(); r != 0 {
					handover = append(handover, got.Sub(time.Unix(0, r)))
				}
				counts[w]++
				longest = max(longest, got.Sub(asked))
				mu.Unlock()
				released.Store(time.Now().UnixNano())
				if err := s.Unlock(ctx); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	reportCPU(b, began)
	slices.Sort(handover)
	if len(handover) > 0 {
		b.ReportMetric(float64(handover[len(handover)/2].Microseconds()), "p50-handover-µs")
		b.ReportMetric(float64(handover[len(handover)*99/100].Microseconds()), "p99-handover-µs")
	}
	if hi := slices.Max(counts); hi > 0 {
		b.ReportMetric(float64(slices.Min(counts))/float64(hi), "fairness")
	}
	b.ReportMetric(float64(longest.Milliseconds()), "longest-wait-ms")
}
