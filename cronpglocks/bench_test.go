package cronpglocks_test

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/robfig/cron/v3"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/cronpglocks"
	"github.com/pglocks/pglocks/internal/benchkit"
)

// What a job run's lock costs on the replica that runs it (run: take the
// free lock, run a no-op job, let it go) and on one that skips it (skip:
// the lock is held by another session), for hand-written pgx on a
// connection of its own (pg_try_advisory_lock, pg_advisory_unlock), a
// pglocks Locker (TryLock, Release) and the robfig/cron wrapper over it (a
// wrapped job's Run, which does both), in one run:
//
//	go test -run '^$' -bench JobRun -count 1 -benchmem . (6 times, alternating) >> jobrun.txt; benchstat -col /lib jobrun.txt
func BenchmarkJobRun(b *testing.B) {
	const job = "report"
	key := cronpglocks.JobKey(job)
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
				"cronpglocks": func(dsn string) benchkit.Session {
					w, err := cronpglocks.New(benchkit.Locker(b, dsn), 0, cronpglocks.WithLogger(cron.DiscardLogger))
					if err != nil {
						b.Fatal(err)
					}
					ran := false
					j := w.Func(job, func() { ran = true })
					// A run takes and releases the lock: Lock is the whole run.
					return benchkit.Session{
						Lock: func(context.Context) error {
							ran = false
							j.Run()
							if !ran {
								return pglocks.ErrLocked
							}
							return nil
						},
						Unlock: func(context.Context) error { return nil },
					}
				},
			}
			for _, lib := range []string{"raw", "pglocks", "cronpglocks"} {
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
