package cronpglocks_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/robfig/cron/v3"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/cronpglocks"
)

// skewed is a schedule read by a machine whose clock is offset ahead of
// real time: robfig/cron reads time.Now, and has no clock to replace, but
// it fires each entry at its schedule's Next, so a replica on this
// schedule fires each tick offset earlier (offset > 0) or later than real
// time, as one on a skewed clock would.
type skewed struct {
	cron.Schedule
	offset time.Duration
}

func (s skewed) Next(t time.Time) time.Time { return s.Schedule.Next(t.Add(s.offset)).Add(-s.offset) }

// secondsParser parses specs as cron.WithSeconds does.
var secondsParser = cron.NewParser(cron.Second | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

// replicaConfig is one replica of a service: its own pool, Locker, Wrapper
// and cron.Cron.
type replicaConfig struct {
	DSN     string
	Name    string
	Offset  time.Duration // how far the replica's clock is ahead of real time
	MinHold time.Duration // the Wrapper's minimum hold
	Period  time.Duration // whole seconds that divide a minute
	RunFor  time.Duration // how long each run takes
	Jobs    []string
}

// replica is a running replicaConfig.
type replica struct {
	cfg    replicaConfig
	pool   *pgxpool.Pool
	locker *pglocks.Locker
	jobs   *cronpglocks.Wrapper
	log    *recLogger
	cron   *cron.Cron
	once   sync.Once
}

// startReplica starts cfg's scheduler, every job wrapped by the Wrapper;
// each run is recorded in log with the tick it ran for, by the replica's
// own clock.
func startReplica(ctx context.Context, cfg replicaConfig, log *runLog) (*replica, error) {
	r := &replica{cfg: cfg, log: &recLogger{}}
	pcfg, err := pgxpool.ParseConfig(cfg.DSN)
	if err != nil {
		return nil, err
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = cfg.Name
	if r.pool, err = pgxpool.NewWithConfig(ctx, pcfg); err != nil {
		return nil, err
	}
	if r.locker, err = pglocks.New(r.pool); err != nil {
		r.pool.Close()
		return nil, err
	}
	if r.jobs, err = cronpglocks.New(r.locker, cfg.MinHold, cronpglocks.WithLogger(r.log)); err != nil {
		_ = r.locker.Close()
		r.pool.Close()
		return nil, err
	}
	r.cron = cron.New(cron.WithSeconds(), cron.WithChain(cron.Recover(r.log)), cron.WithLogger(cron.DiscardLogger))
	spec := fmt.Sprintf("*/%d * * * * *", int(cfg.Period/time.Second))
	for _, job := range cfg.Jobs {
		j := r.jobs.Func(job, func() {
			tick := time.Now().Add(cfg.Offset).Round(cfg.Period)
			end := log.start(job)
			time.Sleep(cfg.RunFor)
			end(cfg.Name, tick)
		})
		if cfg.Offset == 0 {
			if _, err := r.cron.AddJob(spec, j); err != nil {
				r.stop()
				return nil, err
			}
			continue
		}
		s, err := secondsParser.Parse(spec)
		if err != nil {
			r.stop()
			return nil, err
		}
		r.cron.Schedule(skewed{s, cfg.Offset}, j)
	}
	r.cron.Start()
	return r, nil
}

// stop stops the scheduler and waits for its running jobs, lets the
// minimum holds run out, then closes the Locker and the pool, in the order
// the package documents. It may be called more than once.
func (r *replica) stop() {
	r.once.Do(func() {
		<-r.cron.Stop().Done()
		_ = r.jobs.Drain(context.Background())
		_ = r.locker.Close()
		r.pool.Close()
	})
}

// run is one job run that a replica recorded.
type run struct {
	job, replica string
	tick         time.Time
	at, end      time.Time // real time
}

func (r run) String() string {
	return fmt.Sprintf("%s tick %s on %s at %s", r.job, r.tick.Format("15:04:05"), r.replica, r.at.Format("15:04:05.000"))
}

// runLog collects the runs of replicas in this process, and counts runs of
// a job that overlapped another run of it, on any replica.
type runLog struct {
	mu       sync.Mutex
	runs     []run
	running  map[string]int
	overlaps []string
}

// start records that a run of job began, and returns what records its end.
func (l *runLog) start(job string) (end func(replica string, tick time.Time)) {
	at := time.Now()
	l.mu.Lock()
	if l.running == nil {
		l.running = map[string]int{}
	}
	l.running[job]++
	n := l.running[job]
	l.mu.Unlock()
	return func(replica string, tick time.Time) {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.running[job]--
		r := run{job: job, replica: replica, tick: tick, at: at, end: time.Now()}
		if n > 1 {
			l.overlaps = append(l.overlaps, fmt.Sprintf("%v began while %d other runs of it ran", r, n-1))
		}
		l.runs = append(l.runs, r)
	}
}

func (l *runLog) all() []run {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]run(nil), l.runs...)
}

func (l *runLog) overlapping() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.overlaps...)
}

// byTick groups runs by job, then tick.
func byTick(runs []run) map[string]map[time.Time][]run {
	m := map[string]map[time.Time][]run{}
	for _, r := range runs {
		if m[r.job] == nil {
			m[r.job] = map[time.Time][]run{}
		}
		m[r.job][r.tick] = append(m[r.job][r.tick], r)
	}
	return m
}

// duplicates lists the ticks some job ran more than once for.
func duplicates(runs []run) []string {
	var out []string
	for job, ticks := range byTick(runs) {
		for tick, rs := range ticks {
			if len(rs) > 1 {
				var who []string
				for _, r := range rs {
					who = append(who, fmt.Sprintf("%s at %s", r.replica, r.at.Format("15:04:05.000")))
				}
				out = append(out, fmt.Sprintf("%s tick %s ran %d times: %s", job, tick.Format("15:04:05"), len(rs), strings.Join(who, ", ")))
			}
		}
	}
	sort.Strings(out)
	return out
}

// checkOncePerTick fails t unless every job ran exactly once for each tick
// in [from, to] (real time), and never more than once for any tick. A
// replica's clock is up to -skew ahead, so it fires a tick up to that much
// before the tick's real time: ticks less than -skew after from are not
// counted.
func checkOncePerTick(t *testing.T, runs []run, jobs []string, from, to time.Time) {
	t.Helper()
	from = from.Add(*skew)
	for _, d := range duplicates(runs) {
		t.Error(d)
	}
	m := byTick(runs)
	n := 0
	for tick := from.Truncate(period).Add(period); !tick.After(to); tick = tick.Add(period) {
		n++
		for _, job := range jobs {
			if len(m[job][tick]) == 0 {
				t.Errorf("%s: no run for tick %s", job, tick.Format("15:04:05"))
			}
		}
	}
	if n < 3 {
		t.Fatalf("only %d ticks between %s and %s: too few to tell", n, from.Format("15:04:05.000"), to.Format("15:04:05.000"))
	}
	t.Logf("%d jobs × %d ticks, %d runs", len(jobs), n, len(runs))
}

// ranBy counts runs by replica.
func ranBy(runs []run) map[string]int {
	m := map[string]int{}
	for _, r := range runs {
		m[r.replica]++
	}
	return m
}

// startReplicas starts one replica per offset, each with its own pool, and
// stops them when t ends.
func startReplicas(t *testing.T, base replicaConfig, offsets []time.Duration, log *runLog) []*replica {
	t.Helper()
	var rs []*replica
	t.Cleanup(func() {
		for _, r := range rs {
			r.stop()
		}
	})
	for i, off := range offsets {
		cfg := base
		cfg.Name = fmt.Sprintf("replica-%d", i+1)
		cfg.Offset = off
		r, err := startReplica(context.Background(), cfg, log)
		if err != nil {
			t.Fatal(err)
		}
		rs = append(rs, r)
	}
	return rs
}

// stopReplicas stops rs, and fails t if any advisory lock is left in the
// database of dsn, or if a replica logged anything but skips of a lock
// held elsewhere.
func stopReplicas(t *testing.T, dsn string, rs []*replica) {
	t.Helper()
	for _, r := range rs {
		r.stop()
	}
	if left := held(t, dsn); len(left) != 0 {
		t.Errorf("held after the replicas stopped: %v", left)
	}
	for _, r := range rs {
		for _, e := range r.log.all() {
			if e.level != "info" || e.msg != "skip" || !errors.Is(e.err, pglocks.ErrLocked) {
				t.Errorf("%s logged %v", r.cfg.Name, e)
			}
		}
	}
}

// spread returns n clock offsets from 0 to max, evenly apart.
func spread(n int, max time.Duration) []time.Duration {
	out := make([]time.Duration, n)
	for i := range out {
		out[i] = max * time.Duration(i) / time.Duration(n-1)
	}
	return out
}

// waitRun waits until replica has run every job for tick, or deadline.
func waitRun(t *testing.T, log *runLog, jobs []string, tick time.Time, replica string, deadline time.Time) {
	t.Helper()
	for {
		m := byTick(log.all())
		n := 0
		for _, job := range jobs {
			for _, r := range m[job][tick] {
				if r.replica == replica {
					n++
					break
				}
			}
		}
		if n == len(jobs) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s has not run every job for tick %s by %s: %v", replica, tick.Format("15:04:05"),
				deadline.Format("15:04:05.000"), log.all())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestReplicasRunEachTickOnce: three cron.Cron replicas, each with its own
// pool and Locker, on clocks up to -skew apart, run the same two jobs every
// second through Wrappers with a minimum hold: each job runs exactly once
// per tick, no run overlaps another of the same job, and nothing is left
// held. Without the hold the same replicas run jobs twice, which is why it
// is there.
func TestReplicasRunEachTickOnce(t *testing.T) {
	if *skew <= 0 || *skew >= period/2-100*time.Millisecond {
		t.Fatalf("-skew %v: must be in (0, %v) for a %v period", *skew, period/2-100*time.Millisecond, period)
	}
	jobs := []string{"report", "cleanup"}
	t.Run("with minimum hold", func(t *testing.T) {
		dsn := srv.DB(t)
		var log runLog
		// The hold covers the clocks' spread with room either side.
		base := replicaConfig{DSN: dsn, MinHold: period / 2, Period: period, Jobs: jobs}
		rs := startReplicas(t, base, spread(3, *skew), &log)
		from := time.Now()
		time.Sleep(time.Duration(*ticks+1) * period)
		to := time.Now().Add(-period)
		stopReplicas(t, dsn, rs)
		runs := log.all()
		checkOncePerTick(t, runs, jobs, from, to)
		for _, o := range log.overlapping() {
			t.Error(o)
		}
		t.Logf("runs by replica: %v (skew %v)", ranBy(runs), *skew)
	})
	// Runs that take longer than the clocks' spread keep the others off
	// while they run, hold or none: the replicas that fire later skip.
	t.Run("runs longer than the spread, without minimum hold", func(t *testing.T) {
		dsn := srv.DB(t)
		var log runLog
		base := replicaConfig{DSN: dsn, Period: period, RunFor: *skew + 200*time.Millisecond, Jobs: jobs}
		rs := startReplicas(t, base, spread(3, *skew), &log)
		time.Sleep(time.Duration(*ticks+1) * period)
		stopReplicas(t, dsn, rs)
		runs := log.all()
		for _, o := range log.overlapping() {
			t.Error(o)
		}
		if len(runs) < 2*len(jobs) {
			t.Fatalf("only %d runs", len(runs))
		}
		// The other replicas fired while a run held the lock, and skipped:
		// two skips a run, but for the ticks at either end.
		skips := 0
		for _, r := range rs {
			skips += len(r.log.all())
		}
		if skips < len(runs) {
			t.Errorf("%d runs but %d skips: the other replicas did not fire during the runs", len(runs), skips)
		}
		t.Logf("%d runs, none overlapping, %d skips; runs by replica: %v", len(runs), skips, ranBy(runs))
	})
	// A replica that stops just after it ran a tick keeps the hold with
	// Drain; closing its pglocks.Locker without Drain ends the hold, and a
	// replica whose clock is behind runs the tick again.
	for _, drain := range []bool{true, false} {
		t.Run(fmt.Sprintf("replica stops after a tick, drain %v", drain), func(t *testing.T) {
			dsn := srv.DB(t)
			var log runLog
			base := replicaConfig{DSN: dsn, MinHold: period / 2, Period: period, Jobs: jobs}
			rs := startReplicas(t, base, []time.Duration{*skew, 0}, &log) // replica-1 is ahead
			tick := time.Now().Truncate(period).Add(2 * period)
			time.Sleep(time.Until(tick.Add(-*skew)))
			waitRun(t, &log, jobs, tick, "replica-1", tick)
			if drain {
				rs[0].stop()
			} else {
				<-rs[0].cron.Stop().Done()
				_ = rs[0].locker.Close()
			}
			time.Sleep(time.Until(tick.Add(2*period + period/2)))
			m := byTick(log.all())
			dups := duplicates(log.all())
			for _, job := range jobs {
				if rs := m[job][tick]; len(rs) == 0 || rs[0].replica != "replica-1" {
					t.Fatalf("%s tick %s: %v, want replica-1 to run it before it stops", job, tick.Format("15:04:05"), rs)
				}
				if next := m[job][tick.Add(period)]; len(next) != 1 || next[0].replica != "replica-2" {
					t.Errorf("%s: the tick after replica-1 stopped ran on %v, want replica-2 once", job, next)
				}
			}
			switch {
			case drain && len(dups) > 0:
				t.Errorf("with Drain: %v", dups)
			case !drain && len(dups) == 0:
				t.Errorf("without Drain no tick ran twice: the test cannot tell what Drain does")
			case !drain:
				t.Logf("without Drain: %v", dups)
			}
		})
	}
	t.Run("without minimum hold", func(t *testing.T) {
		dsn := srv.DB(t)
		var log runLog
		base := replicaConfig{DSN: dsn, Period: period, Jobs: jobs}
		rs := startReplicas(t, base, spread(3, *skew), &log)
		time.Sleep(4 * period)
		stopReplicas(t, dsn, rs)
		dups := duplicates(log.all())
		if len(dups) == 0 {
			t.Fatalf("no job ran twice on clocks %v apart without a minimum hold: the test cannot tell what the hold does", *skew)
		}
		for _, o := range log.overlapping() {
			t.Error(o)
		}
		t.Logf("%d job-ticks ran more than once, e.g. %s", len(dups), dups[0])
	})
}
