package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks/internal/pgtest"
)

// A transaction lock that a prepared transaction holds has no session: ls
// shows it with pid 0 and the transaction's gid, a waiter it blocks as
// blocked by 0 (as pg_blocking_pids says), and --tree puts the waiter under
// the prepared transaction. Before, the row's null pid failed the scan and
// ls with it.
func TestLsPreparedTransaction(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := pgtest.Local(t, pgtest.Options{Settings: []string{"max_prepared_transactions=2"}})
	dsn := s.URL
	prep, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer prep.Close(ctx)
	for _, q := range []string{"BEGIN", "SELECT pg_advisory_xact_lock(4242)", "PREPARE TRANSACTION 'orphan-job'"} {
		if _, err := prep.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _, _ = s.Admin.Exec(ctx, "ROLLBACK PREPARED 'orphan-job'") })
	waiter, pid := session(t, dsn, "waiter")
	waited := make(chan error, 1)
	go func() { _, err := waiter.Exec(ctx, "SELECT pg_advisory_lock(4242)"); waited <- err }()
	waitFor(t, "the waiter to queue", func() bool {
		var n int
		_ = s.Admin.QueryRow(ctx, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").Scan(&n)
		return n == 1
	})

	stdout, stderr, code := pglocksRun(t, dsn, "ls", "--json")
	if code != 0 {
		t.Fatalf("ls --json: exit %d: %s", code, stderr)
	}
	var rows []lockInfo
	if err := json.Unmarshal([]byte(stdout), &rows); err != nil {
		t.Fatalf("%v:\n%s", err, stdout)
	}
	if len(rows) != 2 {
		t.Fatalf("ls --json: %d rows, want the prepared holder and the waiter:\n%s", len(rows), stdout)
	}
	h, w := rows[0], rows[1]
	if !h.Granted || h.PID != 0 || h.Prepared != "orphan-job" || h.Key != "4242" ||
		h.Application != "prepared transaction orphan-job" || h.Since.IsZero() {
		t.Errorf("holder row: %+v", h)
	}
	if w.Granted || w.PID != pid || len(w.BlockedBy) != 1 || w.BlockedBy[0] != 0 {
		t.Errorf("waiter row: %+v", w)
	}

	stdout, stderr, code = pglocksRun(t, dsn, "ls", "--tree")
	if code != 0 {
		t.Fatalf("ls --tree: exit %d: %s", code, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "- prepared transaction orphan-job -: holds 4242") ||
		!strings.HasPrefix(lines[1], fmt.Sprintf(" \\_ %d waiter ", pid)) {
		t.Errorf("ls --tree:\n%s", stdout)
	}
	stdout, _, code = pglocksRun(t, dsn, "ls")
	if code != 0 || !strings.Contains(stdout, "prepared transaction orphan-job") {
		t.Errorf("ls: exit %d:\n%s", code, stdout)
	}
	t.Logf("ls:\n%s\nls --tree:\n%s", stdout, strings.Join(lines, "\n"))

	if _, err := s.Admin.Exec(ctx, "ROLLBACK PREPARED 'orphan-job'"); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; err != nil {
		t.Fatalf("the waiter after ROLLBACK PREPARED: %v", err)
	}
}

// A role without pg_read_all_stats sees another role's sessions in
// pg_stat_activity without their start or client: ls lists their locks
// anyway, with - for both. Before, the null start failed the scan.
func TestLsWithoutReadAllStats(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn, db := testDB(t)
	holder, pid := session(t, dsn, "holder")
	if _, err := holder.Exec(ctx, "SELECT pg_advisory_lock(77)"); err != nil {
		t.Fatal(err)
	}
	defer holder.Exec(ctx, "SELECT pg_advisory_unlock(77)")
	role := "ls_" + db
	if _, err := srv.Admin.Exec(ctx, "CREATE ROLE "+pgx.Identifier{role}.Sanitize()+" LOGIN"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = srv.Admin.Exec(ctx, "DROP ROLE "+pgx.Identifier{role}.Sanitize()) })
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	asRole := fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", role, cfg.Host, cfg.Port, db)

	stdout, stderr, code := pglocksRun(t, asRole, "ls", "--json")
	if code != 0 {
		t.Fatalf("ls --json as %s: exit %d: %s", role, code, stderr)
	}
	var rows []lockInfo
	if err := json.Unmarshal([]byte(stdout), &rows); err != nil {
		t.Fatalf("%v:\n%s", err, stdout)
	}
	if len(rows) != 1 || rows[0].PID != pid || rows[0].Key != "77" || !rows[0].Since.IsZero() || rows[0].Client != "" {
		t.Errorf("ls --json as %s:\n%s", role, stdout)
	}
	stdout, stderr, code = pglocksRun(t, asRole, "ls")
	if code != 0 || !strings.Contains(stdout, fmt.Sprint(pid)) {
		t.Errorf("ls as %s: exit %d: %s\n%s", role, code, stderr, stdout)
	}
	t.Logf("ls as %s:\n%s", role, stdout)
}
