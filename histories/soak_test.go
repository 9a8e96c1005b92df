package histories_test

import (
	"context"
	"flag"
	"runtime"
	"sync"
	"testing"
	"time"
)

var soak = flag.Duration("soak", 10*time.Second, "how long BenchmarkSoak runs (RELIABILITY.md's soak: 10m)")

// BenchmarkSoak is the soak: mixed load under faults for -soak (CI runs it
// for its default 10 s; RELIABILITY.md's figures are from -soak 10m), on
// Lockers that live the whole time: pgxpool clients on one key and lib/pq
// clients on 3 slots, their sessions terminated every 60 ms; pgx's stdlib
// clients through PgBouncer (transaction pooling), its server sessions
// terminated every 60 ms; and lib/pq clients through a TCP proxy that cuts
// every connection every 400 ms. Each 3 s window's history is checked as TestHistories checks one. Between windows it
// samples the process's goroutines and heap (after a GC) and the server
// sessions of the run's databases; it fails if goroutines or sessions
// grow by more than a few, or the heap doubles, from the first window's end
// to the last's.
//
//	cd histories && go test -run '^$' -bench Soak -benchtime 1x -soak 10m .
func BenchmarkSoak(b *testing.B) {
	for b.Loop() {
		soakOnce(b)
	}
}

func soakOnce(b *testing.B) {
	runs := []*run{
		newRun(b, drivers[0].open, faults[0], 0), // pgxpool, terminate, exclusive
		newRun(b, drivers[2].open, faults[0], 3), // lib/pq, terminate, 3 slots
		newRun(b, drivers[1].open, faults[2], 0), // stdlib, through PgBouncer, exclusive
		newRun(b, drivers[2].open, faults[3], 0), // lib/pq, through a proxy cut every 400 ms, exclusive
	}
	window := min(3*time.Second, *soak) // as TestHistories: a longer history takes the checker much longer
	type sample struct {
		goroutines int
		heap       uint64
		sessions   int
	}
	take := func() sample {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		var n int
		for _, r := range runs {
			var k int
			if err := srv.Admin.QueryRow(context.Background(), "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", r.db).Scan(&k); err != nil {
				b.Fatal(err)
			}
			n += k
		}
		return sample{runtime.NumGoroutine(), m.HeapInuse, n}
	}
	var first, last sample
	var ops, grants, losses, faultsDone int
	began := time.Now()
	for w := 0; time.Since(began) < *soak; w++ {
		var wg sync.WaitGroup
		figs := make([]figures, len(runs))
		for i, r := range runs {
			wg.Go(func() { figs[i] = r.window(b, window) })
		}
		wg.Wait()
		for _, f := range figs {
			ops, grants, losses, faultsDone = ops+f.ops, grants+f.grants, losses+f.losses, faultsDone+f.injected
		}
		last = take()
		if w == 0 {
			first = last
		}
		b.Logf("window %d: %d goroutines, heap %.1f MB, %d server sessions", w, last.goroutines, float64(last.heap)/1e6, last.sessions)
	}
	b.ReportMetric(float64(ops), "operations")
	b.ReportMetric(float64(grants), "grants")
	b.ReportMetric(float64(losses), "losses")
	b.ReportMetric(float64(faultsDone), "faults")
	b.ReportMetric(float64(last.goroutines-first.goroutines), "goroutines-grown")
	b.ReportMetric(float64(last.heap)/float64(first.heap), "heap-ratio")
	b.ReportMetric(float64(last.sessions-first.sessions), "sessions-grown")
	if last.goroutines > first.goroutines+20 || last.sessions > first.sessions+6 || last.heap > 2*first.heap+8<<20 {
		b.Fatalf("not flat: goroutines %d -> %d, server sessions %d -> %d, heap %.1f -> %.1f MB",
			first.goroutines, last.goroutines, first.sessions, last.sessions, float64(first.heap)/1e6, float64(last.heap)/1e6)
	}
}
