package cronpglocks_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/robfig/cron/v3"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/cronpglocks"
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

// newWrapper returns a Wrapper over a Locker of its own on dsn, logging to
// a recorder.
func newWrapper(t *testing.T, dsn string, minHold time.Duration, opts ...cronpglocks.Option) (*cronpglocks.Wrapper, *recLogger) {
	t.Helper()
	log := &recLogger{}
	w, err := cronpglocks.New(newLocker(t, dsn), minHold, append([]cronpglocks.Option{cronpglocks.WithLogger(log)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return w, log
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

// waitFree waits until nothing is held in the database of dsn, up to 5 s
// after from, and returns when that was.
func waitFree(t *testing.T, dsn string, from time.Time) time.Duration {
	t.Helper()
	for len(held(t, dsn)) > 0 {
		if time.Since(from) > 5*time.Second {
			t.Fatalf("still held %v after it was taken: %v", time.Since(from), held(t, dsn))
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(from)
}

// logEntry is one call of a cron.Logger.
type logEntry struct {
	level, msg, job string
	err             error
}

// recLogger is a cron.Logger that records what the Wrapper tells it.
type recLogger struct {
	mu      sync.Mutex
	entries []logEntry
}

func (l *recLogger) Info(msg string, kv ...any) { l.add(logEntry{level: "info", msg: msg}, kv) }

func (l *recLogger) Error(err error, msg string, kv ...any) {
	l.add(logEntry{level: "error", msg: msg, err: err}, kv)
}

func (l *recLogger) add(e logEntry, kv []any) {
	for i := 0; i+1 < len(kv); i += 2 {
		switch kv[i] {
		case "job":
			e.job, _ = kv[i+1].(string)
		case "error":
			e.err, _ = kv[i+1].(error)
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.entries = append(l.entries, e)
}

func (l *recLogger) all() []logEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]logEntry(nil), l.entries...)
}

func (e logEntry) String() string {
	return fmt.Sprintf("%s %q job %q: %v", e.level, e.msg, e.job, e.err)
}

// only fails t unless the logger has exactly one entry, of the given level
// and message, for job, with an error matching target; it then forgets it.
func (l *recLogger) only(t *testing.T, level, msg, job string, target error) {
	t.Helper()
	l.mu.Lock()
	es := l.entries
	l.entries = nil
	l.mu.Unlock()
	if len(es) != 1 || es[0].level != level || es[0].msg != msg || es[0].job != job || !errors.Is(es[0].err, target) {
		t.Fatalf("logged %v, want one %s %q for job %q matching %v", es, level, msg, job, target)
	}
	t.Logf("logged: %v", es[0])
}

// none fails t if the logger has entries.
func (l *recLogger) none(t *testing.T) {
	t.Helper()
	if es := l.all(); len(es) != 0 {
		t.Fatalf("logged %v, want nothing", es)
	}
}

func TestNewRejectsBadInput(t *testing.T) {
	l := newLocker(t, srv.DB(t))
	var nilCtx context.Context
	for _, tt := range []struct {
		name    string
		l       *pglocks.Locker
		minHold time.Duration
		opts    []cronpglocks.Option
		want    string
	}{
		{"nil Locker", nil, 0, nil, "nil *pglocks.Locker"},
		{"negative hold", l, -time.Second, nil, "minimum hold -1s"},
		{"hold beyond 24.8 days", l, 25 * 24 * time.Hour, nil, "minimum hold 600h0m0s"},
		{"nil key function", l, 0, []cronpglocks.Option{cronpglocks.WithKey(nil)}, "WithKey(nil)"},
		{"negative lock timeout", l, time.Second, []cronpglocks.Option{cronpglocks.WithLockTimeout(-1)}, "negative lock timeout"},
		{"nil logger", l, 0, []cronpglocks.Option{cronpglocks.WithLogger(nil)}, "WithLogger(nil)"},
		{"nil base context", l, 0, []cronpglocks.Option{cronpglocks.WithBaseContext(nilCtx)}, "WithBaseContext(nil)"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			w, err := cronpglocks.New(tt.l, tt.minHold, tt.opts...)
			if err == nil || w != nil || !strings.HasPrefix(err.Error(), "cronpglocks: New: ") || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New = %v, %v; want an error saying %q", w, err, tt.want)
			}
			t.Log(err)
		})
	}
}

// Wrapping a job that cannot work panics as the schedule is set up, not at
// each tick.
func TestWrapRejectsBadJobs(t *testing.T) {
	l := newLocker(t, srv.DB(t))
	w, err := cronpglocks.New(l, 0)
	if err != nil {
		t.Fatal(err)
	}
	zero, err := cronpglocks.New(l, 0, cronpglocks.WithKey(func(string) pglocks.Key { return pglocks.Key{} }))
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		wrap func()
		want string
	}{
		{"nil job", func() { w.Job("report", nil) }, `Job("report"): nil job`},
		{"nil func", func() { w.Func("report", nil) }, `Func("report"): nil func`},
		{"nil ctx func", func() { w.FuncContext("report", nil) }, `FuncContext("report"): nil func`},
		{"empty name", func() { w.Func("", func() {}) }, "Func: empty job name"},
		{"empty name in Wrap", func() { w.Wrap("") }, "Wrap: empty job name"},
		{"invalid key", func() { zero.Func("report", func() {}) }, `Func("report"): the key function returned invalid key`},
		{"invalid key in Wrap", func() { zero.Wrap("report") }, `Wrap("report"): the key function returned invalid key`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			defer func() {
				r := recover()
				if s, _ := r.(string); !strings.HasPrefix(s, "cronpglocks: ") || !strings.Contains(s, tt.want) {
					t.Fatalf("panicked with %v, want %q", r, tt.want)
				}
				t.Log(r)
			}()
			tt.wrap()
		})
	}
}

// A run holds JobKey's lock while the job runs: plain SQL, another replica
// and a second run on the same replica all find it taken, and those runs
// are skipped, logged at Info as ErrLocked. Without a minimum hold it is
// free once the job returns. WithKey replaces JobKey.
func TestJobHoldsLockWhileItRuns(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	a, aLog := newWrapper(t, dsn, 0)
	b, bLog := newWrapper(t, dsn, 0)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)

	otherRan := false
	other := b.Func("report", func() { otherRan = true })
	var again cron.Job
	ran := false
	job := a.Func("report", func() {
		ran = true
		var free bool
		if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtextextended('cron:report', 0))").Scan(&free); err != nil || free {
			t.Errorf("SQL took cron:report while its job runs: %v, %v", free, err)
		}
		other.Run()
		again.Run()
	})
	again = job
	job.Run()
	if !ran || otherRan {
		t.Fatalf("ran %v, other replica ran %v; want only the first", ran, otherRan)
	}
	bLog.only(t, "info", "skip", "report", pglocks.ErrLocked)
	aLog.only(t, "info", "skip", "report", pglocks.ErrLocked) // the nested run
	if left := held(t, dsn); len(left) != 0 {
		t.Fatalf("after the run: %v", left)
	}
	other.Run()
	if !otherRan {
		t.Fatal("the other replica's run did not run once the lock was free")
	}
	bLog.none(t)

	// Wrap and Job do what Func does; WithKey replaces JobKey.
	c, _ := newWrapper(t, dsn, 0, cronpglocks.WithKey(func(job string) pglocks.Key { return pglocks.ID(42) }))
	var left []string
	cron.NewChain(c.Wrap("anything")).Then(cron.FuncJob(func() { left = held(t, dsn) })).Run()
	if len(left) != 1 || !strings.Contains(left[0], "key (0,42,1)") {
		t.Errorf("WithKey(ID(42)) holds %v", left)
	}
	left = nil
	c.Job("anything", cron.FuncJob(func() { left = held(t, dsn) })).Run()
	if len(left) != 1 || !strings.Contains(left[0], "key (0,42,1)") {
		t.Errorf("Job with WithKey(ID(42)) holds %v", left)
	}
}

// A run skips when another process holds the job's key in plain SQL, and
// runs once it lets go.
func TestJobSkipsWhenHeldElsewhere(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	w, log := newWrapper(t, dsn, 0)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(hashtextextended('cron:nightly-report', 0))"); err != nil {
		t.Fatal(err)
	}
	runs := 0
	job := w.FuncContext("nightly-report", func(context.Context) { runs++ })
	for range 3 {
		job.Run()
	}
	if runs != 0 {
		t.Fatalf("ran %d times while another process held the key", runs)
	}
	es := log.all()
	for _, e := range es {
		if e.level != "info" || e.msg != "skip" || !errors.Is(e.err, pglocks.ErrLocked) {
			t.Errorf("logged %v, want skips with ErrLocked", e)
		}
	}
	if len(es) != 3 {
		t.Errorf("logged %d entries for 3 skips", len(es))
	}
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock(hashtextextended('cron:nightly-report', 0))"); err != nil {
		t.Fatal(err)
	}
	job.Run()
	if runs != 1 {
		t.Fatalf("ran %d times once the key was free, want 1", runs)
	}
}

// With a minimum hold the lock outlasts the run: the run returns at once,
// other replicas skip until the hold is up, and Drain waits for it (and for
// a run still going), as its ctx allows.
func TestMinHoldAndDrain(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	const hold = 400 * time.Millisecond
	a, aLog := newWrapper(t, dsn, hold)
	b, bLog := newWrapper(t, dsn, 0)

	taken := time.Now() // the hold runs from the grant, after this
	began := time.Now()
	a.Func("report", func() {}).Run()
	if d := time.Since(began); d >= hold {
		t.Fatalf("a run of a no-op job took %v: it waited for its %v hold", d, hold)
	}
	otherRan := false
	b.Func("report", func() { otherRan = true }).Run()
	if otherRan {
		t.Fatal("another replica ran the job during the minimum hold")
	}
	bLog.only(t, "info", "skip", "report", pglocks.ErrLocked)
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := a.Drain(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain with 50ms left of a %v hold = %v, want DeadlineExceeded", hold, err)
	}
	if err := a.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(taken); d < hold {
		t.Fatalf("Drain returned %v after the lock was taken, before its %v minimum hold", d, hold)
	}
	if d := waitFree(t, dsn, taken); d < hold {
		t.Fatalf("released %v after it was taken, before the %v minimum hold", d, hold)
	}

	// Drain waits for a run that has not returned (a job that outlived the
	// scheduler's Stop), and no longer once it has.
	release := make(chan struct{})
	running := make(chan struct{})
	go b.Func("report", func() { close(running); <-release }).Run()
	<-running
	short, cancel = context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := b.Drain(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain while a job runs = %v, want DeadlineExceeded", err)
	}
	go func() { time.Sleep(50 * time.Millisecond); close(release) }()
	if err := b.Drain(ctx); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	if left := held(t, dsn); len(left) != 0 {
		t.Fatalf("after the run and Drain: %v", left)
	}
	aLog.none(t)
	bLog.none(t)
}

// A panicking job releases its lock (the panic goes on, to cron.Recover),
// and Drain does not wait for it.
func TestJobPanicReleases(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	w, log := newWrapper(t, dsn, 0)
	recovered := &recLogger{}
	cron.NewChain(cron.Recover(recovered), w.Wrap("report")).Then(cron.FuncJob(func() { panic("boom") })).Run()
	if es := recovered.all(); len(es) != 1 || es[0].msg != "panic" {
		t.Fatalf("cron.Recover logged %v, want the panic", es)
	}
	if left := held(t, dsn); len(left) != 0 {
		t.Fatalf("after a panic: %v", left)
	}
	if err := w.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	log.none(t)
}

// Taking a job's lock is bounded: with the pool's only connection in the
// application's hands, a run gives up after half the minimum hold (or
// WithLockTimeout's) and is skipped, logged as an error, rather than taking
// the lock late, after another replica's hold for the same tick ran out.
func TestLockTimeout(t *testing.T) {
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
		opts    []cronpglocks.Option
		timeout time.Duration
	}{
		{"default: half the hold", nil, hold / 2},
		{"WithLockTimeout", []cronpglocks.Option{cronpglocks.WithLockTimeout(50 * time.Millisecond)}, 50 * time.Millisecond},
	} {
		log := &recLogger{}
		w, err := cronpglocks.New(l, hold, append(tt.opts, cronpglocks.WithLogger(log))...)
		if err != nil {
			t.Fatal(err)
		}
		ran := false
		start := time.Now()
		w.Func("report", func() { ran = true }).Run()
		took := time.Since(start)
		if ran || took < tt.timeout || took > tt.timeout+2*time.Second {
			t.Errorf("%s: with no connection to be had the run ran %v, after %v; want a skip after %v", tt.name, ran, took, tt.timeout)
		}
		log.only(t, "error", "skip", "report", context.DeadlineExceeded)
		if err := w.Drain(ctx); err != nil {
			t.Fatalf("Drain after a skip: %v", err)
		}
	}
	app.Release()
	w, err := cronpglocks.New(l, 0, cronpglocks.WithLogger(&recLogger{}))
	if err != nil {
		t.Fatal(err)
	}
	ran := false
	w.Func("report", func() { ran = true }).Run()
	if !ran {
		t.Fatal("no run once the connection is back")
	}
}

// A replica that cannot reach the server skips every run, and says why.
func TestServerUnreachable(t *testing.T) {
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
	log := &recLogger{}
	w, err := cronpglocks.New(l, 500*time.Millisecond, cronpglocks.WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	ran := 0
	job := w.Func("report", func() { ran++ })
	for range 2 {
		job.Run()
	}
	if ran != 0 {
		t.Fatalf("ran %d times with no server", ran)
	}
	es := log.all()
	for _, e := range es {
		if e.level != "error" || e.msg != "skip" || e.err == nil || errors.Is(e.err, pglocks.ErrLocked) {
			t.Errorf("logged %v, want error skips", e)
		}
	}
	if len(es) != 2 {
		t.Fatalf("logged %v for 2 skips", es)
	}
	t.Logf("e.g. %v", es[0])
}

// A FuncContext job's ctx is cancelled, with the loss as its cause, when
// the server ends the session that holds its lock; the loss is logged when
// the job returns, and a tracer sees it under the job's name.
func TestFuncContextCancelledOnLoss(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	var tr labelTracer
	l := newLocker(t, dsn, pglocks.WithTracer(&tr))
	log := &recLogger{}
	w, err := cronpglocks.New(l, 0, cronpglocks.WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	running := make(chan struct{})
	var cause error
	var cancelled time.Time
	done := make(chan struct{})
	go func() {
		defer close(done)
		w.FuncContext("nightly-report", func(ctx context.Context) {
			close(running)
			select {
			case <-ctx.Done():
				cancelled, cause = time.Now(), context.Cause(ctx)
			case <-time.After(10 * time.Second):
				t.Error("the job's ctx was not cancelled within 10 s of the loss")
			}
		}).Run()
	}()
	<-running
	h, err := l.Holders(ctx, cronpglocks.JobKey("nightly-report"))
	if err != nil || len(h) != 1 {
		t.Fatalf("holders: %v, %v", h, err)
	}
	terminated := time.Now()
	if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", h[0].PID); err != nil {
		t.Fatal(err)
	}
	<-done
	if !errors.Is(cause, pglocks.ErrLockLost) {
		t.Fatalf("the job's ctx ended with cause %v, want ErrLockLost", cause)
	}
	t.Logf("cancelled %v after pg_terminate_backend was sent, cause: %v", cancelled.Sub(terminated).Round(time.Millisecond), cause)
	log.only(t, "error", "lock lost", "nightly-report", pglocks.ErrLockLost)
	if lost := tr.labels(); len(lost) != 1 || lost[0] != "nightly-report" {
		t.Errorf("losses traced with labels %q, want [nightly-report]", lost)
	}
	if err := w.Drain(ctx); err != nil {
		t.Fatal(err)
	}

	// A plain job is not told, but the loss is logged when it returns.
	running = make(chan struct{})
	release := make(chan struct{})
	done = make(chan struct{})
	go func() {
		defer close(done)
		w.Func("nightly-report", func() { close(running); <-release }).Run()
	}()
	<-running
	if h, err = l.Holders(ctx, cronpglocks.JobKey("nightly-report")); err != nil || len(h) != 1 {
		t.Fatalf("holders: %v, %v", h, err)
	}
	if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", h[0].PID); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(tr.labels()) < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the second loss was not traced within 10 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(release)
	<-done
	log.only(t, "error", "lock lost", "nightly-report", pglocks.ErrLockLost)
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

func (r *labelTracer) labels() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.lost...)
}

// The base context bounds runs: once it is cancelled, a FuncContext job
// still running has its ctx cancelled with the same cause, its lock is
// still released, and later runs are skipped (logged at Info).
func TestBaseContext(t *testing.T) {
	dsn := srv.DB(t)
	type key struct{}
	base, cancel := context.WithCancelCause(context.WithValue(context.Background(), key{}, "v"))
	defer cancel(nil)
	w, log := newWrapper(t, dsn, 0, cronpglocks.WithBaseContext(base))
	stopping := errors.New("replica stopping")
	var cause error
	var value any
	job := w.FuncContext("export", func(ctx context.Context) {
		value = ctx.Value(key{})
		cancel(stopping)
		<-ctx.Done()
		cause = context.Cause(ctx)
	})
	job.Run()
	if value != "v" || cause != stopping {
		t.Fatalf("job saw value %v, cause %v; want the base's", value, cause)
	}
	log.none(t)
	if left := held(t, dsn); len(left) != 0 {
		t.Fatalf("after the run: %v", left)
	}
	ran := false
	w.Func("export", func() { ran = true }).Run()
	if ran {
		t.Fatal("ran with the base context done")
	}
	log.only(t, "info", "skip", "export", context.Canceled)
}

// Closing the pglocks.Locker while a job runs releases its lock at once:
// a FuncContext job's ctx is cancelled with ErrClosed as its cause, and the
// early release is logged when the job returns. Later runs are skipped.
func TestLockerClosedDuringRun(t *testing.T) {
	dsn := srv.DB(t)
	l := newLocker(t, dsn)
	log := &recLogger{}
	w, err := cronpglocks.New(l, time.Minute, cronpglocks.WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	var cause error
	w.FuncContext("report", func(ctx context.Context) {
		_ = l.Close()
		<-ctx.Done()
		cause = context.Cause(ctx)
	}).Run()
	if !errors.Is(cause, pglocks.ErrClosed) {
		t.Fatalf("the job's ctx ended with cause %v, want ErrClosed", cause)
	}
	log.only(t, "error", "release", "report", pglocks.ErrClosed)
	if left := held(t, dsn); len(left) != 0 {
		t.Fatalf("after Close: %v", left)
	}
	w.Func("report", func() { t.Error("ran with the Locker closed") }).Run()
	log.only(t, "error", "skip", "report", pglocks.ErrClosed)
}
