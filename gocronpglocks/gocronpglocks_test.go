package gocronpglocks_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/gocronpglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

var (
	srv *pgtest.Server

	skew  = flag.Duration("skew", 200*time.Millisecond, "how far apart the replicas' clocks are (the tests spread them over 0..skew)")
	ticks = flag.Int("ticks", 6, "how many ticks of each job a test checks")
)

// period is the jobs' period in the scheduler tests: their cron fires every
// second, by each replica's clock.
const period = time.Second

func TestMain(m *testing.M) {
	if cfg := os.Getenv(replicaEnv); cfg != "" {
		// A replica process started by a test (see processes_test.go).
		os.Exit(replicaMain(cfg))
	}
	pgtest.Main(m, &srv, pgtest.CheckLeaks)
}

func newLocker(t *testing.T, dsn string, opts ...pglocks.Option) *pglocks.Locker {
	t.Helper()
	p, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	l, err := pglocks.New(p, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// held lists the advisory locks held in the database of dsn.
func held(t *testing.T, dsn string) []string {
	t.Helper()
	name := dsn[strings.LastIndex(dsn, "/")+1:]
	name, _, _ = strings.Cut(name, "?")
	left, err := srv.AdvisoryLocks(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return left
}

func TestNewLockerRejectsBadInput(t *testing.T) {
	l := newLocker(t, srv.DB(t))
	for _, tt := range []struct {
		name    string
		l       *pglocks.Locker
		minHold time.Duration
		opts    []gocronpglocks.LockerOption
	}{
		{"nil Locker", nil, 0, nil},
		{"negative hold", l, -time.Second, nil},
		{"hold beyond 24.8 days", l, 25 * 24 * time.Hour, nil},
		{"nil key function", l, 0, []gocronpglocks.LockerOption{gocronpglocks.WithKey(nil)}},
	} {
		if lk, err := gocronpglocks.NewLocker(tt.l, tt.minHold, tt.opts...); err == nil || lk != nil {
			t.Errorf("%s: NewLocker = %v, %v; want an error", tt.name, lk, err)
		} else {
			t.Logf("%s: %v", tt.name, err)
		}
	}
	if _, err := gocronpglocks.NewElector(nil, electionKey); err == nil {
		t.Error("NewElector(nil) succeeded")
	}
	if _, err := gocronpglocks.NewElector(l, pglocks.Key{}); !errors.Is(err, pglocks.ErrInvalidKey) {
		t.Errorf("NewElector(zero Key) = %v, want ErrInvalidKey", err)
	}
	if _, err := gocronpglocks.NewElector(l, electionKey, gocronpglocks.WithTakeoverDelay(-1)); err == nil {
		t.Error("NewElector with a negative takeover delay succeeded")
	}
}

// TestLockerHoldsAndReleases: a job's lock is JobKey's, excludes another
// replica, outlasts Unlock by the minimum hold, and Unlock releases it even
// with the job's context cancelled (as gocron's shutdown leaves it).
func TestLockerHoldsAndReleases(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	a, err := gocronpglocks.NewLocker(newLocker(t, dsn), 0)
	if err != nil {
		t.Fatal(err)
	}
	const hold = 400 * time.Millisecond
	b, err := gocronpglocks.NewLocker(newLocker(t, dsn), hold)
	if err != nil {
		t.Fatal(err)
	}

	lock, err := a.Lock(ctx, "report")
	if err != nil {
		t.Fatal(err)
	}
	// Plain SQL sees the lock under JobKey's documented name.
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var free bool
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtextextended('gocron:report', 0))").Scan(&free); err != nil || free {
		t.Fatalf("SQL took gocron:report while a job holds it: %v, %v", free, err)
	}
	if _, err := b.Lock(ctx, "report"); !errors.Is(err, pglocks.ErrLocked) || !strings.Contains(err.Error(), `"report"`) {
		t.Fatalf("second replica's Lock = %v, want ErrLocked naming the job", err)
	}
	jobCtx, cancel := context.WithCancel(ctx)
	cancel()
	if err := lock.Unlock(jobCtx); err != nil {
		t.Fatalf("Unlock with a cancelled ctx: %v", err)
	}
	if left := held(t, dsn); len(left) != 0 {
		t.Fatalf("after Unlock: %v", left)
	}

	// With a minimum hold, Unlock returns at once and the lock stays.
	taken := time.Now() // the hold runs from the grant, after this
	lock, err = b.Lock(ctx, "report")
	if err != nil {
		t.Fatal(err)
	}
	if err := lock.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Lock(ctx, "report"); !errors.Is(err, pglocks.ErrLocked) {
		t.Fatalf("Lock during the minimum hold = %v, want ErrLocked", err)
	}
	// Drain waits for the hold, as ctx allows.
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := b.Drain(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain with 50ms left of a %v hold = %v, want DeadlineExceeded", hold, err)
	}
	if err := b.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(taken); d < hold {
		t.Fatalf("Drain returned %v after the lock was taken, before its %v minimum hold", d, hold)
	}
	for len(held(t, dsn)) > 0 {
		if time.Since(taken) > hold+3*time.Second {
			t.Fatalf("still held %v after it was taken: %v", time.Since(taken), held(t, dsn))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if d := time.Since(taken); d < hold {
		t.Fatalf("released %v after it was taken, before the %v minimum hold", d, hold)
	}
	if lock, err = a.Lock(ctx, "report"); err != nil {
		t.Fatalf("Lock after the hold: %v", err)
	}
	// Drain waits for a job that has not returned (a job that outlived
	// gocron's stop timeout), and no longer once it has.
	short, cancel = context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := a.Drain(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain while a job holds its lock = %v, want DeadlineExceeded", err)
	}
	go func() { time.Sleep(50 * time.Millisecond); _ = lock.Unlock(ctx) }()
	if err := a.Drain(ctx); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	if left := held(t, dsn); len(left) != 0 {
		t.Fatalf("after Unlock and Drain: %v", left)
	}
	if err := lock.Unlock(ctx); !errors.Is(err, pglocks.ErrReleased) {
		t.Fatalf("second Unlock = %v, want ErrReleased", err)
	}
	if err := a.Drain(ctx); err != nil {
		t.Fatalf("Drain after a second Unlock: %v", err)
	}

	// WithKey replaces JobKey.
	c, err := gocronpglocks.NewLocker(newLocker(t, dsn), 0, gocronpglocks.WithKey(func(job string) pglocks.Key { return pglocks.ID(42) }))
	if err != nil {
		t.Fatal(err)
	}
	if lock, err = c.Lock(ctx, "anything"); err != nil {
		t.Fatal(err)
	}
	if left := held(t, dsn); len(left) != 1 || !strings.Contains(left[0], "key (0,42,1)") {
		t.Errorf("WithKey(ID(42)) holds %v", left)
	}
	if err := lock.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
}

// startReplicas starts one replica per offset, each with its own pool, and
// stops them when t ends.
func startReplicas(t *testing.T, base replicaConfig, offsets []time.Duration, log *runLog) []*replica {
	t.Helper()
	var rs []*replica
	for i, off := range offsets {
		cfg := base
		cfg.Name = fmt.Sprintf("replica-%d", i+1)
		cfg.Offset = off
		r, err := startReplica(context.Background(), cfg, log.recorder(cfg.Name))
		if err != nil {
			t.Fatal(err)
		}
		rs = append(rs, r)
	}
	t.Cleanup(func() {
		for _, r := range rs {
			r.stop()
		}
	})
	return rs
}

// spread returns n clock offsets from 0 to max, evenly apart.
func spread(n int, max time.Duration) []time.Duration {
	out := make([]time.Duration, n)
	for i := range out {
		out[i] = max * time.Duration(i) / time.Duration(n-1)
	}
	return out
}

// TestLockerRunsEachTickOnce: three schedulers, each with its own pool, on
// clocks up to -skew apart, share two jobs through the Locker with a
// minimum hold: each job runs exactly once per tick. Without the hold the
// same replicas run jobs twice, which is why it is there.
func TestLockerRunsEachTickOnce(t *testing.T) {
	if *skew <= 0 || *skew >= period/2-100*time.Millisecond {
		t.Fatalf("-skew %v: must be in (0, %v) for a %v period", *skew, period/2-100*time.Millisecond, period)
	}
	jobs := []string{"report", "cleanup"}
	t.Run("with minimum hold", func(t *testing.T) {
		dsn := srv.DB(t)
		var log runLog
		// The hold covers the clocks' spread with room either side.
		base := replicaConfig{DSN: dsn, MinHold: period / 2, Period: period, Jobs: jobs}
		startReplicas(t, base, spread(3, *skew), &log)
		from := time.Now()
		time.Sleep(time.Duration(*ticks+1) * period)
		to := time.Now().Add(-period)
		runs := log.all()
		checkOncePerTick(t, runs, jobs, from, to, period)
		t.Logf("runs by replica: %v (skew %v)", ranBy(runs), *skew)
	})
	// A replica that shuts down just after it ran a tick keeps the hold
	// with Drain; closing its pglocks.Locker without Drain ends the hold,
	// and a replica whose clock is behind runs the tick again.
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
				_ = rs[0].sched.Shutdown()
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
		startReplicas(t, base, spread(3, *skew), &log)
		time.Sleep(4 * period)
		dups := duplicates(log.all())
		if len(dups) == 0 {
			t.Fatalf("no job ran twice on clocks %v apart without a minimum hold: the test cannot tell what the hold does", *skew)
		}
		t.Logf("%d ticks ran more than once, e.g. %s", len(dups), dups[0])
	})
}

// TestElectorRunsEachTickOnce: three schedulers with Electors; the leader
// runs every job once per tick. When the server ends the leader's session,
// another replica leads and runs the jobs from the next tick, and no tick
// runs twice across the handover.
func TestElectorRunsEachTickOnce(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	jobs := []string{"report", "cleanup"}
	var log runLog
	base := replicaConfig{DSN: dsn, Elect: true, TakeoverDelay: *skew + 100*time.Millisecond, Period: period, Jobs: jobs}
	rs := startReplicas(t, base, spread(3, *skew), &log)
	waitLeader(t, rs[0].locker)

	from := time.Now().Add(base.TakeoverDelay)
	time.Sleep(time.Duration(*ticks/2+2) * period)
	leader, err := rs[0].locker.Leader(ctx, electionKey)
	if err != nil {
		t.Fatal(err)
	}
	var old *replica
	for _, r := range rs {
		if r.cfg.Name == leader.ApplicationName {
			old = r
		}
	}
	if old == nil {
		t.Fatalf("leader %+v is none of the replicas", leader)
	}
	before := log.all()
	if by := ranBy(before); by[old.cfg.Name] != len(before) {
		t.Fatalf("runs before the handover: %v, want all on the leader %s", by, old.cfg.Name)
	}
	checkOncePerTick(t, before, jobs, from, time.Now().Add(-period), period)

	// Kill the leader's session in the middle of a period.
	time.Sleep(time.Until(time.Now().Truncate(period).Add(period + period/2)))
	killed := time.Now()
	if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", leader.PID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Duration(*ticks/2+2) * period)
	after := time.Now().Add(-period)
	var later []run
	for _, r := range log.all() {
		if r.at.After(killed) {
			later = append(later, r)
		}
	}
	if by := ranBy(later); by[old.cfg.Name] != 0 || len(by) != 1 {
		t.Errorf("runs after the old leader %s lost its session: %v, want all on one other replica", old.cfg.Name, by)
	}
	// The new leader runs from the first tick after its takeover delay.
	checkOncePerTick(t, later, jobs, killed.Add(base.TakeoverDelay+100*time.Millisecond), after, period)
	for _, d := range duplicates(log.all()) {
		t.Error("across the handover: " + d)
	}
}

// waitLeader waits until some replica leads (and its takeover delay is
// up, if it has one: give that much more), so that ticks before are not
// counted against anyone.
func waitLeader(t *testing.T, l *pglocks.Locker) pglocks.Holder {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		h, err := l.Leader(context.Background(), electionKey)
		if err == nil {
			return h
		}
		if !errors.Is(err, pglocks.ErrNoLeader) || time.Now().After(deadline) {
			t.Fatalf("no leader: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestElectorClose: a closed Elector resigns at once and says so.
func TestElectorClose(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	l := newLocker(t, dsn)
	e, err := gocronpglocks.NewElector(l, electionKey)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for e.IsLeader(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("not leading 5 s after NewElector: %v", e.IsLeader(ctx))
		}
		time.Sleep(10 * time.Millisecond)
	}
	other, err := gocronpglocks.NewElector(newLocker(t, dsn), electionKey)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	time.Sleep(100 * time.Millisecond)
	if err := other.IsLeader(ctx); !errors.Is(err, gocronpglocks.ErrNotLeader) {
		t.Fatalf("second elector's IsLeader = %v, want ErrNotLeader", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.IsLeader(ctx); !errors.Is(err, gocronpglocks.ErrNotLeader) || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("IsLeader after Close = %v", err)
	}
	_ = e.Close()
	deadline = time.Now().Add(2 * time.Second)
	for other.IsLeader(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("the other replica does not lead 2 s after Close: %v", other.IsLeader(ctx))
		}
		time.Sleep(5 * time.Millisecond)
	}
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

// TestElectorTakeoverDelay: the leader's clock is ahead; it runs a tick and
// loses its session before the next replica's clock reaches that tick. A
// new leader without a takeover delay runs the tick again; with a delay
// longer than the clocks' difference it does not, and runs the next one.
func TestElectorTakeoverDelay(t *testing.T) {
	ctx := context.Background()
	jobs := []string{"report"}
	for _, delay := range []time.Duration{0, *skew + 100*time.Millisecond} {
		t.Run(fmt.Sprintf("delay %v", delay), func(t *testing.T) {
			dsn := srv.DB(t)
			var log runLog
			base := replicaConfig{DSN: dsn, Elect: true, TakeoverDelay: delay, Period: period, Jobs: jobs}
			// replica-1, ahead by -skew, leads; replica-2 queues behind it.
			rs := startReplicas(t, base, []time.Duration{*skew}, &log)
			for rs[0].elector.IsLeader(ctx) != nil {
				time.Sleep(5 * time.Millisecond)
			}
			b := base
			b.Name, b.Offset = "replica-2", 0
			r2, err := startReplica(ctx, b, log.recorder(b.Name))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(r2.stop)
			leader, err := rs[0].locker.Leader(ctx, electionKey)
			if err != nil || leader.ApplicationName != "replica-1" {
				t.Fatalf("leader %+v, %v; want replica-1", leader, err)
			}

			// replica-1 runs tick at tick-skew, real time; its session ends
			// right after, before replica-2's clock reaches the tick.
			tick := time.Now().Truncate(period).Add(2 * period)
			time.Sleep(time.Until(tick.Add(-*skew)))
			waitRun(t, &log, jobs, tick, "replica-1", tick.Add(-*skew/2))
			if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", leader.PID); err != nil {
				t.Fatal(err)
			}
			killed := time.Now()
			time.Sleep(time.Until(tick.Add(period + period/2)))
			m := byTick(log.all())
			t.Logf("session ended %v before replica-2's tick; runs: tick %v, next %v",
				tick.Sub(killed).Round(time.Millisecond), m["report"][tick], m["report"][tick.Add(period)])
			if next := m["report"][tick.Add(period)]; len(next) != 1 || next[0].replica != "replica-2" {
				t.Errorf("next tick ran on %v, want replica-2 once", next)
			}
			dups := duplicates(log.all())
			if delay == 0 && len(dups) == 0 {
				t.Fatal("without a takeover delay the new leader did not run the tick again: the test cannot tell what the delay does")
			}
			if delay > 0 && len(dups) > 0 {
				t.Errorf("with a %v takeover delay: %v", delay, dups)
			}
		})
	}
}

// TestElectorOnStandby: an Elector whose pool reaches a standby says why it
// does not lead, and keeps trying: once the standby is promoted (a
// failover), it leads.
func TestElectorOnStandby(t *testing.T) {
	ctx := context.Background()
	standby := pgtest.Local(t, pgtest.Options{}).Standby(t)
	l := newLocker(t, standby.URL)
	e, err := gocronpglocks.NewElector(l, electionKey)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	deadline := time.Now().Add(5 * time.Second)
	for !errors.Is(e.Err(), pglocks.ErrStandby) {
		if time.Now().After(deadline) {
			t.Fatalf("Err() = %v 5 s after campaigning on a standby, want ErrStandby", e.Err())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := e.IsLeader(ctx); !errors.Is(err, gocronpglocks.ErrNotLeader) || !errors.Is(err, pglocks.ErrStandby) {
		t.Fatalf("IsLeader on a standby = %v, want ErrNotLeader and ErrStandby", err)
	}
	t.Logf("on the standby: %v", e.IsLeader(ctx))
	time.Sleep(1500 * time.Millisecond) // a campaign or two more
	if _, err := standby.Admin.Exec(ctx, "SELECT pg_promote()"); err != nil {
		t.Fatal(err)
	}
	promoted := time.Now()
	for e.IsLeader(ctx) != nil {
		if time.Since(promoted) > 20*time.Second {
			t.Fatalf("not leading 20 s after the standby was promoted: %v", e.IsLeader(ctx))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if e.Err() != nil {
		t.Errorf("Err() = %v while leading", e.Err())
	}
	t.Logf("leads %v after the promotion", time.Since(promoted).Round(time.Millisecond))
}
