package gocronpglocks_test

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"

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
				"raw": func(dsn string) benchkit.Session { return benchkit.RawTry(b, dsn, id) },
				"pglocks": func(dsn string) benchkit.Session {
					l := benchkit.Locker(b, dsn)
					var lk *pglocks.Lock
					return benchkit.Session{
						Lock:   func(ctx context.Context) (err error) { lk, err = l.TryLock(ctx, key); return err },
						Unlock: func(ctx context.Context) error { return lk.Release(ctx) },
					}
				},
				"gocronpglocks": func(dsn string) benchkit.Session {
					lk, err := gocronpglocks.NewLocker(benchkit.Locker(b, dsn), 0)
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
