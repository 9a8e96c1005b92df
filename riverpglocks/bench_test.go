package riverpglocks_test

import (
	"context"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/riverpglocks"
)

// Jobs per second that one River client (50 workers) works, with no
// middleware (river), with the middleware taking a key of each job's own
// (riverpglocks, key=job: what the lock costs, one TryLock and one Release
// per job, no contention), and with every job of the kind taking one of 50
// slots (key=kind-slots50: a slot try per job, none waiting). Each round
// inserts 200 empty jobs in one statement and waits until River reports
// them all completed:
//
//	go test -run '^$' -bench Jobs -count 6 . > jobs.txt; benchstat -col /lib jobs.txt
func BenchmarkJobs(b *testing.B) {
	const (
		batch      = 200
		maxWorkers = 50
	)
	for _, tc := range []struct {
		name string
		opts []riverpglocks.Option // nil: no middleware
	}{
		{"lib=river", nil},
		{"lib=riverpglocks/key=job", []riverpglocks.Option{riverpglocks.WithKey(func(job *rivertype.JobRow) (pglocks.Key, error) {
			return pglocks.ID(job.ID), nil
		})}},
		{"lib=riverpglocks/key=kind-slots50", []riverpglocks.Option{riverpglocks.Slots(maxWorkers)}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			dsn := riverDB(b)
			var mw func(*pglocks.Locker) rivertype.Middleware
			if tc.opts != nil {
				mw = func(l *pglocks.Locker) rivertype.Middleware { return newMiddleware(b, l, tc.opts...) }
			}
			r := startReplica(b, dsn, maxWorkers, mw, func(w *river.Workers, _ *pglocks.Locker) {
				river.AddWorker(w, river.WorkFunc(func(context.Context, *river.Job[workArgs]) error { return nil }))
			})
			done, stop := r.client.Subscribe(river.EventKindJobCompleted, river.EventKindJobFailed, river.EventKindJobSnoozed)
			defer stop()
			jobs := sameKeyJobs(batch)
			ctx := context.Background()
			snoozes := 0
			for b.Loop() {
				if _, err := r.client.InsertManyFast(ctx, jobs); err != nil {
					b.Fatal(err)
				}
				for left := batch; left > 0; {
					select {
					case ev := <-done:
						switch ev.Kind {
						case river.EventKindJobCompleted:
							left--
						case river.EventKindJobSnoozed:
							snoozes++
						default:
							b.Fatalf("job %d: %s", ev.Job.ID, ev.Kind)
						}
					case <-time.After(patience):
						b.Fatalf("%d jobs of %d not completed after %v", left, batch, patience)
					}
				}
			}
			b.ReportMetric(float64(batch*b.N)/b.Elapsed().Seconds(), "jobs/s")
			b.ReportMetric(float64(snoozes)/float64(batch*b.N), "snoozes/job")
		})
	}
}
