package gocronpglocks_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/gocronpglocks"
)

// Taking a job's lock is bounded: with the pool's only connection in the
// application's hands, Lock gives up after half the minimum hold (or
// WithLockTimeout's), and the run is skipped rather than taking the lock
// late, after another replica's hold for the same tick ran out.
func TestLockerLockTimeout(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	l, err := pglocks.New(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	app, err := p.Acquire(actx)
	if err != nil {
		t.Fatal(err)
	}
	const hold = 600 * time.Millisecond
	for _, tt := range []struct {
		name    string
		opts    []gocronpglocks.LockerOption
		timeout time.Duration
	}{
		{"default: half the hold", nil, hold / 2},
		{"WithLockTimeout", []gocronpglocks.LockerOption{gocronpglocks.WithLockTimeout(50 * time.Millisecond)}, 50 * time.Millisecond},
	} {
		lk, err := gocronpglocks.NewLocker(l, hold, tt.opts...)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, err = lk.Lock(ctx, "report")
		took := time.Since(start)
		if !errors.Is(err, context.DeadlineExceeded) || took < tt.timeout || took > tt.timeout+2*time.Second {
			t.Errorf("%s: Lock with no connection to be had = %v after %v, want DeadlineExceeded after %v", tt.name, err, took, tt.timeout)
		} else {
			t.Logf("%s: %v after %v", tt.name, err, took.Round(time.Millisecond))
		}
		if err := lk.Drain(ctx); err != nil {
			t.Fatalf("Drain after a Lock that failed: %v", err)
		}
	}
	if _, err := gocronpglocks.NewLocker(l, hold, gocronpglocks.WithLockTimeout(-1)); err == nil {
		t.Error("NewLocker with a negative lock timeout succeeded")
	}
	app.Release()
	lk, err := gocronpglocks.NewLocker(l, 0)
	if err != nil {
		t.Fatal(err)
	}
	lock, err := lk.Lock(ctx, "report")
	if err != nil {
		t.Fatalf("Lock once the connection is back: %v", err)
	}
	if err := lock.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
}

// A replica that cannot reach the server skips every run, and gocron's
// AfterLockError listener gets the reason.
func TestLockerServerUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	p, err := pgxpool.New(context.Background(), fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable&connect_timeout=1", addr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	l, err := pglocks.New(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	lk, err := gocronpglocks.NewLocker(l, 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	s, err := gocron.NewScheduler(gocron.WithDistributedLocker(lk))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var ran int
	var skipped []error
	_, err = s.NewJob(gocron.CronJob("* * * * * *", true),
		gocron.NewTask(func() { mu.Lock(); ran++; mu.Unlock() }),
		gocron.WithName("report"),
		gocron.WithEventListeners(gocron.AfterLockError(func(_ uuid.UUID, _ string, err error) {
			mu.Lock()
			skipped = append(skipped, err)
			mu.Unlock()
		})))
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	time.Sleep(2500 * time.Millisecond)
	if err := s.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if err := lk.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if ran != 0 || len(skipped) < 2 {
		t.Fatalf("with no server: %d runs, %d skips (%v); want none run, every tick skipped", ran, len(skipped), skipped)
	}
	t.Logf("%d ticks skipped, e.g.: %v", len(skipped), skipped[0])
}

// labelTracer records the Label of each lock lost.
type labelTracer struct {
	mu   sync.Mutex
	lost []string
}

type labelKey struct{}

func (r *labelTracer) TraceAcquireStart(ctx context.Context, _ *pglocks.Locker, d pglocks.TraceAcquireStartData) context.Context {
	return context.WithValue(ctx, labelKey{}, d.Label)
}
func (r *labelTracer) TraceAcquireEnd(context.Context, *pglocks.Locker, pglocks.TraceAcquireEndData) {
}
func (r *labelTracer) TraceLoss(ctx context.Context, _ *pglocks.Locker, _ pglocks.TraceLossData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	label, _ := ctx.Value(labelKey{}).(string)
	r.lost = append(r.lost, label)
}

// A job's lock lost while it runs is seen by a tracer under the job's name
// (its Label), and Unlock reports the loss.
func TestLockerLossTracedByJobName(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	var tr labelTracer
	l := newLocker(t, dsn, pglocks.WithTracer(&tr))
	lk, err := gocronpglocks.NewLocker(l, 0)
	if err != nil {
		t.Fatal(err)
	}
	lock, err := lk.Lock(ctx, "nightly-report")
	if err != nil {
		t.Fatal(err)
	}
	h, err := l.Holders(ctx, gocronpglocks.JobKey("nightly-report"))
	if err != nil || len(h) != 1 {
		t.Fatalf("holders: %v, %v", h, err)
	}
	if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", h[0].PID); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		tr.mu.Lock()
		n := len(tr.lost)
		tr.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the loss was not traced within 10 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	tr.mu.Lock()
	if len(tr.lost) != 1 || tr.lost[0] != "nightly-report" {
		t.Errorf("losses traced with labels %q, want [nightly-report]", tr.lost)
	}
	tr.mu.Unlock()
	if err := lock.Unlock(ctx); !errors.Is(err, pglocks.ErrLockLost) {
		t.Errorf("Unlock of a lost lock = %v, want ErrLockLost", err)
	}
	if err := lk.Drain(ctx); err != nil {
		t.Fatal(err)
	}
}

// Through PgBouncer in transaction pooling, where the Locker pins its
// sessions, the replicas still run each tick once, and nothing is left held.
func TestLockerThroughPgBouncer(t *testing.T) {
	t.Parallel()
	dsn := srv.DB(t)
	b, err := srv.StartPgBouncer("transaction")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Stop)
	via := b.DB(dsn)
	jobs := []string{"report", "cleanup"}
	var log runLog
	base := replicaConfig{DSN: via, MinHold: period / 2, Period: period, Jobs: jobs}
	rs := startReplicas(t, base, spread(3, *skew), &log)
	from := time.Now()
	time.Sleep(time.Duration(*ticks+1) * period)
	to := time.Now().Add(-period)
	checkOncePerTick(t, log.all(), jobs, from, to, period)
	for _, r := range rs {
		r.stop()
	}
	if left := held(t, dsn); len(left) != 0 {
		t.Fatalf("held after the replicas stopped: %v", left)
	}
}
