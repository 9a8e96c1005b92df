package riverpglocks_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
	"github.com/pglocks/pglocks/riverpglocks"
)

var srv *pgtest.Server

func TestMain(m *testing.M) {
	pgtest.Main(m, &srv, pgtest.CheckLeaks)
}

// newPool returns a pool on dsn, closed when t ends.
func newPool(t testing.TB, dsn string) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 12 // River's producer, completer, notifier and elector, and the Locker's 2
	p, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// newLocker returns a Locker on pool, closed when t ends.
func newLocker(t testing.TB, pool *pgxpool.Pool, opts ...pglocks.Option) *pglocks.Locker {
	t.Helper()
	l, err := pglocks.New(pool, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func newMiddleware(t testing.TB, l *pglocks.Locker, opts ...riverpglocks.Option) *riverpglocks.Middleware {
	t.Helper()
	m, err := riverpglocks.New(l, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// held lists the advisory locks held or awaited in the database of dsn, by
// any session.
func held(t testing.TB, dsn string) []string {
	t.Helper()
	name := dsn[strings.LastIndex(dsn, "/")+1:]
	name, _, _ = strings.Cut(name, "?")
	left, err := srv.AdvisoryLocks(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return left
}

// row is a job row for Work called directly, as River would call it.
func row(kind string, args string) *rivertype.JobRow {
	return &rivertype.JobRow{ID: 1, Kind: kind, EncodedArgs: []byte(args), Attempt: 1, MaxAttempts: 25}
}

type customerArgs struct {
	Customer string `json:"customer"`
	N        int    `json:"n"`
}

func (customerArgs) Kind() string { return "sync_customer" }

func TestNewRejectsBadInput(t *testing.T) {
	l := newLocker(t, newPool(t, srv.DB(t)))
	for _, tt := range []struct {
		name string
		l    *pglocks.Locker
		opts []riverpglocks.Option
	}{
		{"nil Locker", nil, nil},
		{"nil Option", l, []riverpglocks.Option{nil}},
		{"nil key function", l, []riverpglocks.Option{riverpglocks.WithKey(nil)}},
		{"ArgsKey of a nil function", l, []riverpglocks.Option{riverpglocks.WithKey(riverpglocks.ArgsKey[customerArgs](nil))}},
		{"no slots", l, []riverpglocks.Option{riverpglocks.Slots(0)}},
		{"too many slots", l, []riverpglocks.Option{riverpglocks.Slots(pglocks.MaxSlots + 1)}},
		{"zero snooze", l, []riverpglocks.Option{riverpglocks.WithSnooze(0, time.Second)}},
		{"negative jitter", l, []riverpglocks.Option{riverpglocks.WithSnooze(time.Second, -1)}},
		{"first bad option of two", l, []riverpglocks.Option{riverpglocks.Slots(-1), riverpglocks.WithSnooze(-1, 0)}},
	} {
		m, err := riverpglocks.New(tt.l, tt.opts...)
		if err == nil || m != nil {
			t.Errorf("%s: New = %v, %v; want an error", tt.name, m, err)
			continue
		}
		if !strings.HasPrefix(err.Error(), "riverpglocks: New: ") {
			t.Errorf("%s: %q does not say where it comes from", tt.name, err)
		}
		t.Logf("%s: %v", tt.name, err)
	}
	if _, err := riverpglocks.New(l, riverpglocks.Slots(pglocks.MaxSlots), riverpglocks.WithSnooze(time.Millisecond, 0)); err != nil {
		t.Errorf("New with the largest Slots and no jitter: %v", err)
	}
}

// The keys are the documented names, which plain SQL takes too; ArgsKey
// refuses jobs it cannot key.
func TestKeys(t *testing.T) {
	k, err := riverpglocks.KindKey(row("nightly_report", `{}`))
	if err != nil || k != pglocks.Name("river:nightly_report") {
		t.Errorf("KindKey = %v, %v; want pglocks.Name(\"river:nightly_report\")", k, err)
	}
	byCustomer := riverpglocks.ArgsKey(func(a customerArgs) string { return a.Customer })
	k, err = byCustomer(row("sync_customer", `{"customer":"acme","n":3}`))
	if err != nil || k != pglocks.Name("river:sync_customer:acme") {
		t.Errorf("ArgsKey = %v, %v; want pglocks.Name(\"river:sync_customer:acme\")", k, err)
	}
	if _, err := byCustomer(row("other", `{"customer":"acme"}`)); err == nil || !strings.Contains(err.Error(), `"other"`) {
		t.Errorf("ArgsKey given another kind: %v, want an error naming it", err)
	}
	if _, err := byCustomer(row("sync_customer", `{"customer":`)); err == nil {
		t.Error("ArgsKey given args that do not decode: no error")
	}

	// What the Middleware holds is that key, as SQL names it.
	ctx := context.Background()
	dsn := srv.DB(t)
	m := newMiddleware(t, newLocker(t, newPool(t, dsn)))
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	err = m.Work(ctx, row("nightly_report", `{}`), func(context.Context) error {
		var free bool
		if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtextextended('river:nightly_report', 0))").Scan(&free); err != nil {
			return err
		}
		if free {
			return errors.New("SQL took river:nightly_report while the job held it")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if left := held(t, dsn); len(left) != 0 {
		t.Errorf("after the job: %v", left)
	}
}

// Work called directly: a held key snoozes without running the job, for a
// duration in the configured range; the worker's own outcomes pass through
// unchanged, ErrLocked of its own included; failures to take the key fail
// the attempt without running the job.
func TestWorkOutcomes(t *testing.T) {
	ctx := context.Background()
	dsn := srv.DB(t)
	pool := newPool(t, dsn)
	const snooze, jitter = 300 * time.Millisecond, 200 * time.Millisecond
	m := newMiddleware(t, newLocker(t, pool), riverpglocks.WithSnooze(snooze, jitter))
	job := row("report", `{}`)
	boom := errors.New("boom")
	cancelled := river.JobCancel(boom)
	for _, tt := range []struct {
		name  string
		inner func(ctx context.Context) error
		check func(err error) bool
	}{
		{"success", func(context.Context) error { return nil }, func(err error) bool { return err == nil }},
		{"error", func(context.Context) error { return boom }, func(err error) bool { return err == boom }},
		{"cancel", func(context.Context) error { return cancelled }, func(err error) bool { return err == cancelled }},
		{"its own ErrLocked", func(context.Context) error { return pglocks.ErrLocked }, func(err error) bool { return err == pglocks.ErrLocked }},
	} {
		ran := false
		err := m.Work(ctx, job, func(ctx context.Context) error {
			ran = true
			return tt.inner(ctx)
		})
		if !ran || !tt.check(err) {
			t.Errorf("%s: ran %v, Work = %v", tt.name, ran, err)
		}
		if left := held(t, dsn); len(left) != 0 {
			t.Errorf("%s: left %v", tt.name, left)
		}
	}

	// A panic goes through, and the key is released on its way.
	func() {
		defer func() {
			if p := recover(); p != "job panicked" {
				t.Errorf("recovered %v, want the job's panic", p)
			}
		}()
		_ = m.Work(ctx, job, func(context.Context) error { panic("job panicked") })
	}()
	if left := held(t, dsn); len(left) != 0 {
		t.Errorf("after a panic: left %v", left)
	}

	// Held by another session: snoozed, the job not run, for snooze plus
	// up to jitter.
	other := newLocker(t, newPool(t, dsn))
	lk, err := other.Lock(ctx, pglocks.Name("river:report"))
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		err := m.Work(ctx, job, func(context.Context) error {
			t.Error("the job ran while its key was held elsewhere")
			return nil
		})
		var se *river.JobSnoozeError
		if !errors.As(err, &se) {
			t.Fatalf("Work with the key held = %v, want a JobSnoozeError", err)
		}
		if se.Duration < snooze || se.Duration >= snooze+jitter {
			t.Errorf("snoozed %v, want [%v, %v)", se.Duration, snooze, snooze+jitter)
		}
	}
	if err := lk.Release(ctx); err != nil {
		t.Fatal(err)
	}

	// The key function's error, and a closed Locker, fail the attempt; the
	// job does not run.
	bad := newMiddleware(t, newLocker(t, pool), riverpglocks.WithKey(func(*rivertype.JobRow) (pglocks.Key, error) {
		return pglocks.Key{}, boom
	}))
	err = bad.Work(ctx, job, func(context.Context) error { t.Error("ran without a key"); return nil })
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "riverpglocks: job 1 (report)") {
		t.Errorf("Work with a failing key function = %v", err)
	}
	closed := newLocker(t, pool)
	mc := newMiddleware(t, closed)
	if err := closed.Close(); err != nil {
		t.Fatal(err)
	}
	err = mc.Work(ctx, job, func(context.Context) error { t.Error("ran with a closed Locker"); return nil })
	var se *river.JobSnoozeError
	if !errors.Is(err, pglocks.ErrClosed) || errors.As(err, &se) {
		t.Errorf("Work with a closed Locker = %v, want ErrClosed and no snooze", err)
	}
}

// With fencing tokens, the job's ctx carries its lock's token.
func TestFencingTokenInJob(t *testing.T) {
	ctx := context.Background()
	m := newMiddleware(t, newLocker(t, newPool(t, srv.DB(t)), pglocks.WithFencingTokens()))
	var tokens []int64
	for range 2 {
		if err := m.Work(ctx, row("report", `{}`), func(ctx context.Context) error {
			tokens = append(tokens, pglocks.FencingToken(ctx))
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if tokens[0] <= 0 || tokens[1] <= tokens[0] {
		t.Errorf("tokens %v: want positive and increasing", tokens)
	}
}
