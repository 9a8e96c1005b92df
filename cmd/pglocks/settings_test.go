package main

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// roleDSN creates a login role whose sessions in db carry settings, as a
// DBA sets them on an application's role, and returns dsn as that role.
func roleDSN(t *testing.T, dsn, db string, settings map[string]string) string {
	t.Helper()
	ctx := context.Background()
	role := "r_" + db
	if _, err := srv.Admin.Exec(ctx, "CREATE ROLE "+pgx.Identifier{role}.Sanitize()+" LOGIN"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = srv.Admin.Exec(ctx, "DROP ROLE "+pgx.Identifier{role}.Sanitize()) })
	for name, value := range settings {
		q := fmt.Sprintf("ALTER ROLE %s IN DATABASE %s SET %s = '%s'", pgx.Identifier{role}.Sanitize(), pgx.Identifier{db}.Sanitize(), name, value)
		if _, err := srv.Admin.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	return strings.Replace(dsn, "postgres://postgres@", "postgres://"+role+"@", 1)
}

// pglocks run on a role with statement_timeout, lock_timeout and
// idle_session_timeout waits as long as it is told to (-w, or for ever),
// holds the lock past the idle timeout, and says "not acquired" (exit 1),
// not "database error", when -w runs out.
func TestRunHostileRole(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	role := roleDSN(t, dsn, db, map[string]string{
		"statement_timeout": "1s", "lock_timeout": "500ms", "idle_session_timeout": "900ms",
	})
	holder := holdSQL(t, dsn, "job")
	waitTen := start(t, role, "run", "-w", "10s", "job", "--", "sh", "-c", "sleep 2")
	waitEver := start(t, role, "run", "job", "--", "sh", "-c", "sleep 2")
	_, stderr, code := pglocksRun(t, role, "run", "-w", "1500ms", "job", "--", "true")
	if code != exitConflict || !strings.Contains(stderr, "not acquired") {
		t.Errorf("-w 1500ms past the role's timeouts: exit %d, want %d: %s", code, exitConflict, stderr)
	}
	time.Sleep(time.Second) // 2.5 s since they began to wait
	if _, err := holder.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	for name, p := range map[string]*proc{"-w 10s": waitTen, "no -w": waitEver} {
		if code := p.wait(t); code != 0 {
			t.Errorf("%s: exit %d, want 0: %s", name, code, p.stderr.String())
		}
	}
}

// A waiting pglocks run killed with SIGKILL leaves the server's queue within
// 2 s: its session asks the server to check that the client is still there
// (client_connection_check_interval), which a backend blocked in a lock wait
// would not do otherwise.
func TestRunKilledWhileWaiting(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	holdSQL(t, dsn, "job")
	p := start(t, dsn, "run", "job", "--", "true")
	waitFor(t, "the wait", func() bool { return waiting(t, db) })
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	p.wait(t)
	for waiting(t, db) {
		if time.Since(killed) > 2*time.Second {
			t.Fatalf("the killed waiter is still queued %v after SIGKILL", time.Since(killed))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("the killed waiter left the queue %v after SIGKILL", time.Since(killed).Round(time.Millisecond))
}

// On a standby, pglocks leader and pglocks ls say that the server is a
// standby (exit 3), not that nobody leads or that there are no locks, while
// the primary has a leader.
func TestStandbyCommands(t *testing.T) {
	t.Parallel()
	primary := pgtest.Local(t, pgtest.Options{})
	standby := primary.Standby(t)
	c, err := pgx.Connect(t.Context(), primary.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	if _, err := c.Exec(t.Context(), "SELECT pg_advisory_lock($1)", mustID(pglocks.Name("relay"))); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"leader", "relay"}, {"ls"}, {"run", "-n", "relay", "--", "true"}} {
		stdout, stderr, code := pglocksRun(t, standby.URL, args...)
		if code != exitDatabase || !strings.Contains(stderr, "standby") || strings.Contains(stdout, "no leader") ||
			strings.Contains(stdout, "no advisory locks") {
			t.Errorf("%v on a standby: exit %d, stdout %q, stderr %q", args, code, stdout, stderr)
		}
	}
}

func mustID(k pglocks.Key) int64 {
	id, ok := k.Int64()
	if !ok {
		panic("not a bigint key")
	}
	return id
}
