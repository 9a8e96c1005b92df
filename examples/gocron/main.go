// This example is a service of two replicas, each with its own pool and its
// own gocron scheduler, sharing two jobs through pglocks: every replica
// schedules every job, and each tick runs on one of them.
//
//	go -C examples/gocron run .            # the jobs share a gocronpglocks.Locker
//	go -C examples/gocron run . -elect     # one replica leads and runs them all
//
// Replica 2's clock is set 300 ms behind replica 1's, as another machine's
// might be: it fires every tick 300 ms later. The Locker's minimum hold
// (1 s, for jobs every 2 s) keeps the first replica's lock held past that,
// so the late replica skips the tick instead of running it again. Halfway,
// replica 1 stops, and replica 2 runs the jobs from the next tick on.
//
// It uses the server that DATABASE_URL names, or starts a throwaway one from
// the local PostgreSQL installation (as the tests do) and removes it after,
// also when it is interrupted, terminated, hung up on, or its stdout is
// closed.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/gocronpglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// period is how often each job runs: its cron fires every 2 seconds.
const period = 2 * time.Second

func main() {
	ticks := flag.Int("ticks", 5, "how many ticks to run")
	elect := flag.Bool("elect", false, "elect a leader that runs every job (gocron.WithDistributedElector)")
	flag.Parse()
	// SIGINT, SIGTERM, SIGHUP and a closed stdout (go run . | head) stop
	// the replicas early, and run's deferred Stop removes the throwaway
	// server. A program of yours would call
	// signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM).
	ctx, stop := pgtest.NotifyContext(context.Background())
	code := run(ctx, os.Stdout, os.Stderr, *ticks, *elect)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, stdout, stderr io.Writer, ticks int, elect bool) int {
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		fmt.Fprintln(stdout, "DATABASE_URL is not set: starting a throwaway PostgreSQL...")
		srv, err := pgtest.Start()
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		defer srv.Stop()
		url = srv.URL
	}
	mode := "jobs share a gocronpglocks.Locker (1s minimum hold)"
	if elect {
		mode = "one replica leads (gocronpglocks.Elector)"
	}
	fmt.Fprintf(stdout, "two replicas, jobs report and cleanup every %v, %s; replica 2's clock is 300ms behind\n", period, mode)

	var log tickLog
	var replicas []*replica
	defer func() {
		for _, r := range replicas {
			r.stop()
		}
	}()
	for i, offset := range []time.Duration{0, -300 * time.Millisecond} {
		r, err := startReplica(ctx, url, i+1, offset, elect, &log, stdout)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		replicas = append(replicas, r)
		if elect && i == 0 {
			// Replica 1 campaigns first and leads; replica 2 queues behind it.
			for r.elector.IsLeader(ctx) != nil {
				if err := r.elector.Err(); err != nil {
					fmt.Fprintln(stderr, err)
					return 1
				}
				time.Sleep(10 * time.Millisecond)
			}
			fmt.Fprintf(stdout, "%s  replica 1 leads\n", time.Now().Format("15:04:05.000"))
		}
	}
	// Halfway, between two ticks, replica 1 stops, as a replica does when
	// it is redeployed: replica 2 runs the jobs from then on.
	half := time.Now().Truncate(period).Add(time.Duration(ticks/2)*period + period/2)
	end := half.Add(time.Duration(ticks-ticks/2) * period)
	select {
	case <-time.After(time.Until(half)):
		fmt.Fprintf(stdout, "%s  replica 1 stops; replica 2 runs the jobs from now on\n", time.Now().Format("15:04:05.000"))
		replicas[0].stop()
	case <-ctx.Done():
	}
	select {
	case <-time.After(time.Until(end)):
	case <-ctx.Done():
	}
	for _, r := range replicas {
		r.stop()
	}
	replicas = nil
	return log.summary(stdout)
}

// replica is one replica of the service: what one process would have.
type replica struct {
	pool    *pgxpool.Pool
	locker  *pglocks.Locker
	jobs    *gocronpglocks.Locker
	elector *gocronpglocks.Elector
	sched   gocron.Scheduler
}

func startReplica(ctx context.Context, url string, id int, offset time.Duration, elect bool,
	log *tickLog, stdout io.Writer) (*replica, error) {
	r := &replica{}
	var err error
	if r.pool, err = pgxpool.New(ctx, url); err != nil {
		return nil, err
	}
	if r.locker, err = pglocks.New(r.pool); err != nil {
		r.pool.Close()
		return nil, err
	}
	clock := skewedClock{clockwork.NewRealClock(), offset}
	opts := []gocron.SchedulerOption{gocron.WithClock(clock)}
	if elect {
		// The takeover delay covers the clocks' difference, so that a tick
		// the old leader ran is not run again by a new one that is behind.
		r.elector, err = gocronpglocks.NewElector(r.locker, pglocks.Name("gocron-example:leader"),
			gocronpglocks.WithTakeoverDelay(500*time.Millisecond))
		opts = append(opts, gocron.WithDistributedElector(r.elector))
	} else {
		// Each job run holds its lock at least 1s: longer than the clocks'
		// difference, shorter than the period.
		r.jobs, err = gocronpglocks.NewLocker(r.locker, time.Second)
		opts = append(opts, gocron.WithDistributedLocker(r.jobs))
	}
	if err == nil {
		r.sched, err = gocron.NewScheduler(opts...)
	}
	for _, job := range []string{"report", "cleanup"} {
		if err != nil {
			break
		}
		_, err = r.sched.NewJob(gocron.CronJob("*/2 * * * * *", true),
			gocron.NewTask(func() {
				tick := clock.Now().Round(time.Second)
				log.ran(job, tick, id)
				fmt.Fprintf(stdout, "%s  tick %s  %-7s ran on replica %d\n",
					time.Now().Format("15:04:05.000"), tick.Format("15:04:05"), job, id)
			}),
			gocron.WithName(job),
			// With the Locker, gocron tells why a replica skipped a run.
			gocron.WithEventListeners(gocron.AfterLockError(func(_ uuid.UUID, _ string, err error) {
				fmt.Fprintf(stdout, "%s  tick %s  %-7s skipped on replica %d: %v\n",
					time.Now().Format("15:04:05.000"), clock.Now().Round(time.Second).Format("15:04:05"), job, id, err)
			})))
	}
	if err != nil {
		r.stop()
		return nil, err
	}
	r.sched.Start()
	return r, nil
}

// stop shuts the scheduler down first (it waits for running jobs), lets
// the minimum holds run out so that replica 2 does not run a tick again,
// then closes what it used.
func (r *replica) stop() {
	if r.sched != nil {
		_ = r.sched.Shutdown()
		r.sched = nil
	}
	if r.jobs != nil {
		_ = r.jobs.Drain(context.Background())
		r.jobs = nil
	}
	if r.elector != nil {
		_ = r.elector.Close()
		r.elector = nil
	}
	if r.locker != nil {
		_ = r.locker.Close()
		r.locker = nil
		r.pool.Close()
	}
}

// skewedClock is the real clock read as a machine whose clock is off by
// offset would read it; gocron schedules by it.
type skewedClock struct {
	clockwork.Clock
	offset time.Duration
}

func (c skewedClock) Now() time.Time                  { return time.Now().Add(c.offset) }
func (c skewedClock) Since(t time.Time) time.Duration { return c.Now().Sub(t) }
func (c skewedClock) Until(t time.Time) time.Duration { return t.Sub(c.Now()) }

// tickLog counts each job's runs per tick, by the clock of the replica
// that ran it.
type tickLog struct {
	mu   sync.Mutex
	runs map[string]map[time.Time][]int
}

func (l *tickLog) ran(job string, tick time.Time, replica int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.runs == nil {
		l.runs = map[string]map[time.Time][]int{}
	}
	if l.runs[job] == nil {
		l.runs[job] = map[time.Time][]int{}
	}
	l.runs[job][tick] = append(l.runs[job][tick], replica)
}

// summary prints how many ticks each job ran for, and returns 1 if one ran
// twice.
func (l *tickLog) summary(w io.Writer) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	jobs := make([]string, 0, len(l.runs))
	for job := range l.runs {
		jobs = append(jobs, job)
	}
	sort.Strings(jobs)
	code := 0
	for _, job := range jobs {
		twice := 0
		for _, rs := range l.runs[job] {
			if len(rs) > 1 {
				twice++
			}
		}
		fmt.Fprintf(w, "%s: %d ticks, %d ran more than once\n", job, len(l.runs[job]), twice)
		if twice > 0 {
			code = 1
		}
	}
	return code
}
