package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pglocks/pglocks"
)

// Two 'pglocks elect': one runs COMMAND, the other waits and names it;
// 'pglocks leader' tells who leads and since when; when the leader's backend
// is terminated its COMMAND is stopped (exit 4) and the other's runs at once;
// a signal goes to COMMAND and ends the campaign.
func TestElect(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	dir := t.TempDir()
	script := func(n int) string {
		return fmt.Sprintf(`trap 'echo stop%d >> %s/log; exit 0' TERM; echo start%d >> %s/log; echo ready; while :; do sleep 0.05; done`, n, dir, n, dir)
	}
	first := start(t, dsn, "elect", "relay", "--", "sh", "-c", script(1))
	waitFor(t, "the first to lead", func() bool { return strings.Contains(first.stdout.String(), "ready") })
	second := start(t, dsn, "elect", "relay", "--", "sh", "-c", script(2))
	host, _ := os.Hostname()
	want := appName("elect", "relay", host, first.cmd.Process.Pid, maxLeaderAppName)
	waitFor(t, "the second to name the leader", func() bool {
		s := second.stderr.String()
		return strings.Contains(s, "relay is led by pid") && strings.Contains(s, want) && strings.Contains(s, "leading since")
	})
	if !waiting(t, db) {
		t.Error("the second does not campaign in the server")
	}
	if strings.Contains(second.stdout.String(), "ready") {
		t.Fatal("two leaders")
	}

	// pglocks leader, in both forms.
	out, stderr, code := pglocksRun(t, dsn, "leader", "relay")
	if code != 0 || !strings.Contains(out, "relay is led by pid") || !strings.Contains(out, want) {
		t.Errorf("leader: exit %d: %q %q", code, out, stderr)
	}
	out, _, code = pglocksRun(t, dsn, "leader", "--json", "relay")
	var h struct {
		PID   int        `json:"pid"`
		App   string     `json:"application_name"`
		Since *time.Time `json:"since"`
	}
	if err := json.Unmarshal([]byte(out), &h); err != nil || code != 0 {
		t.Fatalf("leader --json: exit %d, %v: %q", code, err, out)
	}
	if h.PID != holderPID(t, db, pglocks.Name("relay")) || h.App != want || h.Since == nil ||
		time.Since(*h.Since) > time.Minute {
		t.Errorf("leader --json: %+v", h)
	}

	// The leader's backend goes: its COMMAND is stopped, the other's starts.
	if _, err := srv.Admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", h.PID); err != nil {
		t.Fatal(err)
	}
	if code := first.wait(t); code != 4 {
		t.Errorf("first: exit %d, want 4\n%s", code, first.stderr.String())
	}
	if !strings.Contains(first.stderr.String(), "leadership of relay lost while sh ran: ") {
		t.Errorf("first: stderr does not say so: %q", first.stderr.String())
	}
	waitFor(t, "the second to lead", func() bool { return strings.Contains(second.stdout.String(), "ready") })
	// The second is elected at once; the first's COMMAND has its SIGTERM
	// but may still be stopping (the README says so: fence the writes).
	waitFor(t, "the first's COMMAND to stop", func() bool {
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		return strings.Contains(string(log), "stop1")
	})
	if log, _ := os.ReadFile(filepath.Join(dir, "log")); !strings.HasPrefix(string(log), "start1\n") || strings.Count(string(log), "start") != 2 {
		t.Errorf("terms: %q", log)
	}

	// A signal goes to COMMAND, and pglocks elect exits with its status.
	_ = second.cmd.Process.Signal(syscall.SIGTERM)
	if code := second.wait(t); code != 0 {
		t.Errorf("second: exit %d, want COMMAND's 0\n%s", code, second.stderr.String())
	}
	if len(locks(t, db)) != 0 {
		t.Error("the lock is still held after pglocks exited")
	}
	out, _, code = pglocksRun(t, dsn, "leader", "relay")
	if code != 1 || !strings.Contains(out, "relay has no leader") {
		t.Errorf("leader with none: exit %d, %q", code, out)
	}
}

// With --restart, pglocks elect campaigns again after COMMAND exits and after
// a loss, until a signal stops it; a signal while it campaigns ends it with
// 128+N.
func TestElectRestart(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	dir := t.TempDir()
	p := start(t, dsn, "elect", "--restart", "cron", "--", "sh", "-c",
		fmt.Sprintf(`echo run >> %s/log; sleep 0.1`, dir))
	runs := func() int {
		b, _ := os.ReadFile(filepath.Join(dir, "log"))
		return strings.Count(string(b), "run")
	}
	waitFor(t, "three terms", func() bool { return runs() >= 3 })

	// Hold the lock elsewhere: it campaigns; a loss makes it campaign again.
	c := holdSQL(t, dsn, "other") // a plain session, to take "cron" below
	waitFor(t, "a term to run", func() bool { return holderPID(t, db, pglocks.Name("cron")) != 0 })
	if _, err := srv.Admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", holderPID(t, db, pglocks.Name("cron"))); err != nil {
		t.Fatal(err)
	}
	n := runs()
	waitFor(t, "a term after the loss", func() bool { return runs() > n })
	if _, err := c.Exec(t.Context(), "SELECT pg_advisory_lock(hashtextextended('cron', 0))"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the campaign to wait", func() bool { return waiting(t, db) })
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	if code := p.wait(t); code != 130 {
		t.Errorf("exit %d, want 130\n%s", code, p.stderr.String())
	}
	if waiting(t, db) {
		t.Error("a campaign is still queued after pglocks exited")
	}
}

func TestElectBadInput(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	for _, args := range [][]string{
		{"elect"}, {"elect", "x"}, {"elect", "x", "--"}, {"elect", "--kill-after", "0s", "x", "--", "true"},
		{"elect", "-k", "id", "x", "--", "true"}, {"leader"}, {"leader", "a", "b"},
	} {
		_, stderr, code := pglocksRun(t, dsn, args...)
		if code != 2 || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("%v: exit %d, want 2 with one line: %q", args, code, stderr)
		}
	}
	if _, _, code := pglocksRun(t, dsn, "elect", "x", "--", "no-such-command-pglocks"); code != 127 {
		t.Errorf("missing command: exit %d, want 127", code)
	}
}
