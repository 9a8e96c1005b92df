package gocronpglocks_test

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/gocronpglocks"
	"github.com/pglocks/pglocks/internal/benchkit"
)

// What a job run's lock costs on the replica that runs it (run: take the
// free lock, let it go) and on one that skips it (skip: the lock is held by
// another session), for hand-written pgx on a connection of its own
// (pg_try_advisory_lock, pg_advisory_unlock), a pglocks Locker (TryLock,
// Release) and the gocron adapter over it (Lock, Unlock), in one run:
//
//	go test -run '^$' -bench JobLock -count 1 -benchmem . (6 times, alternating) >> joblock.txt; benchstat -col /lib joblock.txt
func BenchmarkJobLock(b *testing.B) {
	const job = "report"
	key := gocronpglocks.JobKey(job)
	id, _ := key.Int64()
	for _, held := range []bool{false, true} {
		name := "case=run"
		if held {
			name = "case=skip"
		}
		b.Run(name, func(b *testing.B) {
			sessions := map[string]func(dsn string) benchkit.Session{
				"raw": func(dsn string) benchkit.Session { return rawTry(b, dsn, id) },
				"pglocks": func(dsn string) benchkit.Session {
					l := benchLocker(b, dsn)
					var lk *pglocks.Lock
					return benchkit.Session{
						Lock:   func(ctx context.Context) (err error) { lk, err = l.TryLock(ctx, key); return err },
						Unlock: func(ctx context.Context) error { return lk.Release(ctx) },
					}
				},
				"gocronpglocks": func(dsn string) benchkit.Session {
					lk, err := gocronpglocks.NewLocker(benchLocker(b, dsn), 0)
					if err != nil {
						b.Fatal(err)
					}
					var jl interface{ Unlock(context.Context) error }
					return benchkit.Session{
						Lock:   func(ctx context.Context) (err error) { jl, err = lk.Lock(ctx, job); return err },
						Unlock: func(ctx context.Context) error { return jl.Unlock(ctx) },
					}
				},
			}
			for _, lib := range []string{"raw", "pglocks", "gocronpglocks"} {
				b.Run("lib="+lib, func(b *testing.B) {
					dsn := srv.DB(b)
					s := sessions[lib](dsn)
					if !held {
						benchkit.Uncontended(b, s)
						return
					}
					holder, err := pgx.Connect(context.Background(), dsn)
					if err != nil {
						b.Fatal(err)
					}
					defer holder.Close(context.Background())
					if _, err := holder.Exec(context.Background(), "SELECT pg_advisory_lock($1)", id); err != nil {
						b.Fatal(err)
					}
					ctx := context.Background()
					for b.Loop() {
						if err := s.Lock(ctx); !errors.Is(err, pglocks.ErrLocked) {
							b.Fatalf("Lock of a held key = %v, want ErrLocked", err)
						}
					}
				})
			}
		})
	}
}

// rawTry is hand-written pgx on a connection of its own:
// pg_try_advisory_lock and pg_advisory_unlock of key; a lock not had is
// ErrLocked, as the libraries say it.
func rawTry(b *testing.B, dsn string, key int64) benchkit.Session {
	c, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close(context.Background()) })
	return benchkit.Session{
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
		Unlock: func(ctx context.Context) error {
			var ok bool
			if err := c.QueryRow(ctx, "SELECT pg_advisory_unlock($1)", key).Scan(&ok); err != nil {
				return err
			}
			if !ok {
				return errors.New("the lock was not held")
			}
			return nil
		},
	}
}

// benchLocker is a Locker of its own over a pool of 4, as another replica
// would have.
func benchLocker(b *testing.B, dsn string) *pglocks.Locker {
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
	l, err := pglocks.New(p)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = l.Close() })
	return l
}
