package gocronpglocks_test

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/gocronpglocks"
)

// skewedClock is the real clock, read as a machine whose clock is off by
// offset would read it: gocron schedules by Now, so a replica on it fires
// each cron tick offset earlier (offset > 0) or later than real time.
type skewedClock struct {
	clockwork.Clock
	offset time.Duration
}

func (c skewedClock) Now() time.Time                  { return time.Now().Add(c.offset) }
func (c skewedClock) Since(t time.Time) time.Duration { return c.Now().Sub(t) }
func (c skewedClock) Until(t time.Time) time.Duration { return t.Sub(c.Now()) }

// replicaConfig is one replica of a service: its own pool, Locker and
// gocron scheduler. Child processes get it as JSON.
type replicaConfig struct {
	DSN           string
	Name          string
	Elect         bool          // gocron.WithDistributedElector, else WithDistributedLocker
	Offset        time.Duration // how far the replica's clock is ahead of real time
	MinHold       time.Duration // the Locker's minimum hold
	TakeoverDelay time.Duration // the Elector's
	Period        time.Duration // whole seconds that divide a minute
	Jobs          []string
}

// electionKey is what the replicas' Electors campaign for.
var electionKey = pglocks.Name("gocron-test:leader")

// replica is a running replicaConfig.
type replica struct {
	cfg     replicaConfig
	pool    *pgxpool.Pool
	locker  *pglocks.Locker
	jobs    *gocronpglocks.Locker
	elector *gocronpglocks.Elector
	sched   gocron.Scheduler
	once    sync.Once
}

// startReplica starts cfg's scheduler; each job run calls record with the
// job's name and the tick it ran for, by the replica's own clock.
func startReplica(ctx context.Context, cfg replicaConfig, record func(job string, tick time.Time)) (*replica, error) {
	r := &replica{cfg: cfg}
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
	clock := skewedClock{clockwork.NewRealClock(), cfg.Offset}
	opts := []gocron.SchedulerOption{gocron.WithClock(clock)}
	if cfg.Elect {
		r.elector, err = gocronpglocks.NewElector(r.locker, electionKey, gocronpglocks.WithTakeoverDelay(cfg.TakeoverDelay))
		if err == nil {
			opts = append(opts, gocron.WithDistributedElector(r.elector))
		}
	} else {
		if r.jobs, err = gocronpglocks.NewLocker(r.locker, cfg.MinHold); err == nil {
			opts = append(opts, gocron.WithDistributedLocker(r.jobs))
		}
	}
	if err == nil {
		r.sched, err = gocron.NewScheduler(opts...)
	}
	secs := int(cfg.Period / time.Second)
	for _, job := range cfg.Jobs {
		if err != nil {
			break
		}
		_, err = r.sched.NewJob(gocron.CronJob(fmt.Sprintf("*/%d * * * * *", secs), true),
			gocron.NewTask(func() { record(job, clock.Now().Round(cfg.Period)) }),
			gocron.WithName(job))
	}
	if err != nil {
		r.stop()
		return nil, err
	}
	r.sched.Start()
	return r, nil
}

// stop shuts the scheduler down, lets the minimum holds run out, then
// closes the elector, the Locker and the pool, in the order the package
// documents. It may be called more than once.
func (r *replica) stop() {
	r.once.Do(func() {
		if r.sched != nil {
			_ = r.sched.Shutdown()
		}
		if r.jobs != nil {
			_ = r.jobs.Drain(context.Background())
		}
		if r.elector != nil {
			_ = r.elector.Close()
		}
		_ = r.locker.Close()
		r.pool.Close()
	})
}

// run is one job run that a replica recorded.
type run struct {
	job, replica string
	tick         time.Time
	at           time.Time // real time
}

func (r run) String() string {
	return fmt.Sprintf("%s tick %s on %s at %s", r.job, r.tick.Format("15:04:05"), r.replica, r.at.Format("15:04:05.000"))
}

// runLog collects the runs of replicas in this process.
type runLog struct {
	mu   sync.Mutex
	runs []run
}

func (l *runLog) recorder(replica string) func(job string, tick time.Time) {
	return func(job string, tick time.Time) {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.runs = append(l.runs, run{job: job, replica: replica, tick: tick, at: time.Now()})
	}
}

func (l *runLog) all() []run {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]run(nil), l.runs...)
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
func checkOncePerTick(t *testing.T, runs []run, jobs []string, from, to time.Time, period time.Duration) {
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
