package pglocks_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// serverLocks returns the advisory locks on s, in any database.
func serverLocks(t *testing.T, s *pgtest.Server) []lockRow {
	t.Helper()
	rows, err := s.Admin.Query(context.Background(), `
		SELECT pid, CASE objsubid WHEN 1 THEN 'bigint ' || ((classid::bigint << 32) | objid::bigint)
		                        ELSE 'pair ' || classid::int4 || ',' || objid::bigint::bit(32)::int4 END,
		       mode, granted
		FROM pg_locks WHERE locktype = 'advisory' ORDER BY 1, 2`)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (x lockRow, err error) {
		err = r.Scan(&x.pid, &x.key, &x.mode, &x.granted)
		return x, err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// heldOn returns the pid holding key on s, or 0.
func heldOn(t *testing.T, s *pgtest.Server, key pglocks.Key) int {
	for _, r := range serverLocks(t, s) {
		if r.key == bigint(key) && r.granted {
			return r.pid
		}
	}
	return 0
}

// waitedOn reports whether some session on s waits for key.
func waitedOn(t *testing.T, s *pgtest.Server, key pglocks.Key) bool {
	for _, r := range serverLocks(t, s) {
		if r.key == bigint(key) && !r.granted {
			return true
		}
	}
	return false
}

// withHostPort returns dsn with its host:port replaced.
func withHostPort(dsn, hostPort string) string {
	at := strings.Index(dsn, "@") + 1
	slash := strings.Index(dsn[at:], "/") + at
	return dsn[:at] + hostPort + dsn[slash:]
}

// 1 and 2. The holder is told when its session ends, for every way a
// session ends; Do's fn sees its ctx cancelled with cause ErrLockLost; every
// lock on the lost session is reported.
func TestLossDetection(t *testing.T) {
	t.Parallel()
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) {
			t.Parallel()
			fs := pgtest.Local(t, pgtest.Options{})
			proxy, err := pgtest.NewProxy(fmt.Sprintf("127.0.0.1:%d", fs.Port()))
			if err != nil {
				t.Fatal(err)
			}
			defer proxy.Close()
			faults := []struct {
				name   string
				dsn    func() string
				inject func(t *testing.T, pid int)
				after  func()
			}{
				{name: "pg_terminate_backend", inject: func(t *testing.T, pid int) {
					if _, err := fs.Admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", pid); err != nil {
						t.Fatal(err)
					}
				}},
				{name: "network partition",
					dsn:    func() string { return withHostPort(fs.URL, proxy.Addr()) },
					inject: func(*testing.T, int) { proxy.Freeze() },
					after:  proxy.Cut},
				{name: "restart fast", inject: func(t *testing.T, _ int) { mustDo(t, fs.Restart("fast")) }},
				{name: "restart immediate", inject: func(t *testing.T, _ int) { mustDo(t, fs.Restart("immediate")) }},
				{name: "postmaster kill -9", inject: func(t *testing.T, _ int) { mustDo(t, fs.Kill()) }},
			}
			for i, f := range faults {
				t.Run(f.name, func(t *testing.T) {
					dsn := fs.URL
					if f.dsn != nil {
						dsn = f.dsn()
					}
					// (An idle_session_timeout no longer ends a holder's
					// session: see TestHostileRoleSettings.)
					l := lockerOn(t, d, dsn)
					k0, k1 := pglocks.ID(int64(2*i)), pglocks.ID(int64(2*i+1))
					lk0 := mustLock(t, l, k0)
					inFn := make(chan struct{})
					doErr := make(chan error, 1)
					var fnCause error
					go func() {
						doErr <- l.Do(context.Background(), k1, func(ctx context.Context) error {
							close(inFn)
							<-ctx.Done()
							fnCause = context.Cause(ctx)
							return ctx.Err()
						})
					}()
					<-inFn
					pid := heldOn(t, fs, k0)
					if pid == 0 || heldOn(t, fs, k1) != pid {
						t.Fatalf("want both locks on one session: %v", serverLocks(t, fs))
					}
					start := time.Now()
					f.inject(t, pid)
					select {
					case <-lk0.Done():
					case <-time.After(30 * time.Second):
						t.Fatal("the holder was not told within 30 s")
					}
					t.Logf("%s: loss reported after %v", f.name, time.Since(start).Round(time.Millisecond))
					wantErr(t, lk0.Err(), pglocks.ErrLockLost)
					err = <-doErr
					wantErr(t, err, pglocks.ErrLockLost)
					if !errors.Is(fnCause, pglocks.ErrLockLost) {
						t.Errorf("fn's ctx cause: %v", fnCause)
					}
					if f.after != nil {
						f.after()
					}
					// The Locker goes on with fresh sessions.
					lk := mustLock(t, l, k0)
					mustRelease(t, lk)
				})
			}
		})
	}
}

func mustDo(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// A session that holds locks is watched while idle, so a session the server
// ends (here, a terminated backend) is reported at once, long before the
// heartbeat would notice: for a lock that was waited for, from the grant; for
// locks on the shared session, from the first heartbeat on.
// lib/pq does not show its socket: its sessions are checked by the heartbeat
// only, which TestLossDetection covers.
func TestLossSeenAtOnce(t *testing.T) {
	t.Parallel()
	for _, d := range drivers {
		if d.name == "libpq" {
			continue
		}
		t.Run(d.name, func(t *testing.T) {
			t.Parallel()
			lossSeenAtOnce(t, newEnv(t, d))
		})
	}
}

func lossSeenAtOnce(t *testing.T, e *env) {
	const hb = 4 * time.Second
	l := e.locker(4, pglocks.WithHeartbeat(hb, time.Second))
	ctx := t.Context()
	kw, kp := testKey(t, 0), testKey(t, 1)

	// A lock that was waited for.
	raw := e.rawConn(t)
	if _, err := raw.Exec(ctx, "SELECT pg_advisory_lock($1)", mustInt64(kw)); err != nil {
		t.Fatal(err)
	}
	got := make(chan *pglocks.Lock, 1)
	go func() {
		lk, _ := l.Lock(ctx, kw)
		got <- lk
	}()
	waitFor(t, 10*time.Second, "the wait", func() bool { return e.waiting(bigint(kw)) })
	if _, err := raw.Exec(ctx, "SELECT pg_advisory_unlock($1)", mustInt64(kw)); err != nil {
		t.Fatal(err)
	}
	lw := <-got
	if lw == nil {
		t.Fatal("Lock failed")
	}
	// terminate ends lk's backend and checks that the loss is reported
	// well within the heartbeat interval.
	terminate := func(what string, lk *pglocks.Lock) {
		t.Helper()
		pids := e.held(bigint(lk.Key()))
		if len(pids) != 1 {
			t.Fatalf("holders of %v: %v", lk.Key(), pids)
		}
		start := time.Now()
		if _, err := srv.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", pids[0]); err != nil {
			t.Fatal(err)
		}
		select {
		case <-lk.Done():
			t.Logf("%s: loss reported %v after the terminate", what, time.Since(start).Round(time.Millisecond))
		case <-time.After(hb / 2):
			t.Fatalf("%s: loss not reported within %v (heartbeat every %v)", what, hb/2, hb)
		}
		wantErr(t, lk.Err(), pglocks.ErrLockLost)
	}
	terminate("waited-for lock", lw)

	// A lock on the shared session, after a heartbeat.
	lp := mustLock(t, l, kp)
	time.Sleep(hb + 500*time.Millisecond)
	terminate("shared-session lock", lp)
	// And the Locker goes on.
	mustRelease(t, mustLock(t, l, kp))
}
