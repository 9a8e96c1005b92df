package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
)

// A waiting run whose stderr is a log (not a terminal) writes a line when
// who holds the lock changes, not each time it looks: one line for a
// holder that stays, one more for the next.
func TestRunWaitingLine(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	a := holdSQL(t, dsn, "job")
	// c queues first, so that it, not run, is granted when a lets go.
	c, err := pgx.Connect(t.Context(), dsn+"&application_name=next-holder")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	cgot := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), "SELECT pg_advisory_lock(hashtextextended('job', 0))")
		cgot <- err
	}()
	waitFor(t, "c to queue", func() bool { return waiting(t, db) })
	p := start(t, dsn, "run", "-w", "60s", "job", "--", "true")
	waitFor(t, "the waiting line", func() bool { return strings.Contains(p.stderr.String(), "waiting for job, held by pid") })
	time.Sleep(3 * time.Second) // three looks at the holders, as before
	if n := strings.Count(p.stderr.String(), "waiting for job"); n != 1 {
		t.Fatalf("%d waiting lines for one holder:\n%s", n, p.stderr.String())
	}
	if !strings.Contains(p.stderr.String(), "(holder-app)") || !strings.Contains(p.stderr.String(), "connected at ") {
		t.Errorf("the line does not name the holder: %q", p.stderr.String())
	}
	if _, err := a.Exec(t.Context(), "SELECT pg_advisory_unlock(hashtextextended('job', 0))"); err != nil {
		t.Fatal(err)
	}
	if err := <-cgot; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a line naming the next holder", func() bool { return strings.Contains(p.stderr.String(), "(next-holder)") })
	if _, err := c.Exec(t.Context(), "SELECT pg_advisory_unlock(hashtextextended('job', 0))"); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(t); code != 0 {
		t.Fatalf("exit %d: %s", code, p.stderr.String())
	}
	if n := strings.Count(p.stderr.String(), "waiting for job"); n != 2 {
		t.Errorf("%d waiting lines for two holders:\n%s", n, p.stderr.String())
	}
}

// Single-letter flags group (-nq, -nk crc32, -nw30s), as in most tools.
func TestGroupedFlags(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	for _, args := range [][]string{
		{"run", "-nq", "job", "--", "true"},
		{"run", "-qnk", "crc32", "job", "--", "true"},
		{"run", "-qw30s", "job", "--", "true"},
		{"run", "-qw", "30s", "-nE", "0", "job", "--", "true"},
	} {
		if stdout, stderr, code := pglocksRun(t, dsn, args...); code != 0 || stdout != "" || stderr != "" {
			t.Errorf("%v: exit %d, %q %q", args, code, stdout, stderr)
		}
	}
	holdSQL(t, dsn, "job")
	if _, stderr, code := pglocksRun(t, dsn, "run", "-nqE", "7", "job", "--", "true"); code != 7 || stderr != "" {
		t.Errorf("-nqE 7 while held: exit %d, %q", code, stderr)
	}
	if _, stderr, code := pglocksRun(t, dsn, "run", "-nE7", "job", "--", "true"); code != 7 || !strings.Contains(stderr, "not acquired") {
		t.Errorf("-nE7 while held: exit %d, %q", code, stderr)
	}
}

// Help says what each command takes: -k lists "all" only for ls and key;
// the top-level usage shows key's flags; leader's help its exit statuses;
// version --help is help.
func TestHelpSaysWhatEachTakes(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	help := func(args ...string) string {
		stdout, stderr, code := pglocksRun(t, dsn, args...)
		if code != 0 || stderr != "" {
			t.Errorf("%v: exit %d, stderr %q", args, code, stderr)
		}
		return stdout
	}
	for _, cmd := range []string{"run", "elect", "leader"} {
		if h := help(cmd, "--help"); !strings.Contains(h, "dotnet (") || strings.Contains(h, "all (") {
			t.Errorf("%s --help: -k should list the schemes without all:\n%s", cmd, h)
		}
	}
	if h := help("run", "--help"); !strings.Contains(h, "  --slots N\n") || !strings.Contains(h, "  -k, --key SCHEME\n") ||
		!strings.Contains(h, "  -n, --no-wait\n") {
		t.Errorf("run --help: flags without their placeholders, or with trailing spaces:\n%s", h)
	}
	for _, cmd := range []string{"ls", "key"} {
		if h := help(cmd, "--help"); !strings.Contains(h, "all (") {
			t.Errorf("%s --help: -k should list all:\n%s", cmd, h)
		}
	}
	if h := help("--help"); !strings.Contains(h, "key [-k SCHEME] [--slots N] [--json] NAME") {
		t.Errorf("usage: %s", h)
	}
	if h := help("leader", "--help"); !strings.Contains(h, "1 when none does") || !strings.Contains(h, "3 database") {
		t.Errorf("leader --help: no exit statuses:\n%s", h)
	}
	if h := help("version", "--help"); !strings.HasPrefix(h, "Usage: pglocks version") {
		t.Errorf("version --help: %q", h)
	}
}

// elect writes lines of its own, one per event, and none of the library's
// log unless -v: a loss is one line, and a COMMAND that fails is named by
// how it ended, not by pglocks' own exit statuses.
func TestElectSaysEachThingOnce(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	dir := t.TempDir()
	// The first term fails with status 3; the second runs until the loss.
	script := fmt.Sprintf(`if [ -e %[1]s/ran ]; then echo ready; exec sleep 60; fi; touch %[1]s/ran; exit 3`, dir)
	p := start(t, dsn, "elect", "--restart", "--kill-after", "2s", "relay", "--", "sh", "-c", script)
	waitFor(t, "the second term", func() bool { return strings.Contains(p.stdout.String(), "ready") })
	pid := 0
	waitFor(t, "the leader's session", func() bool {
		pid = holderPID(t, db, pglocks.Name("relay"))
		return pid != 0
	})
	if _, err := srv.Admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the campaign after the loss", func() bool {
		return strings.Contains(p.stderr.String(), "campaigning again\n") && strings.Count(p.stderr.String(), "elected for relay") == 3
	})
	_ = p.cmd.Process.Kill()
	p.wait(t)
	out := p.stderr.String()
	t.Logf("stderr:\n%s", out)
	for _, want := range []string{
		"pglocks elect: sh exited with status 3; resigned, campaigning again in 1s\n",
		"pglocks elect: leadership of relay lost while sh ran: ",
		"pglocks elect: sh was killed by signal 15 (terminated); campaigning again\n",
	} {
		if strings.Count(out, want) != 1 {
			t.Errorf("want once: %q", want)
		}
	}
	for _, not := range []string{"level=", "status 4", "lost:"} {
		if strings.Contains(out, not) {
			t.Errorf("stderr has %q", not)
		}
	}
	if n := strings.Count(out, "lost"); n != 1 {
		t.Errorf("the loss is said %d times", n)
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err != nil {
		t.Fatal(err)
	}

	// -v adds the library's log.
	v := start(t, dsn, "elect", "-v", "relay2", "--", "true")
	if code := v.wait(t); code != 0 || !strings.Contains(v.stderr.String(), "level=INFO") {
		t.Errorf("elect -v: exit %d, %q", code, v.stderr.String())
	}
}

// A wait that the server ends (a pg_cancel_backend from another session)
// is "not acquired", says why in one line, and names the lock once.
func TestRunServerEndedWait(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	holdSQL(t, dsn, "job")
	p := start(t, dsn, "run", "job", "--", "true")
	var pid int
	waitFor(t, "the wait", func() bool {
		for _, r := range locks(t, db) {
			if !r.granted {
				pid = r.pid
				return true
			}
		}
		return false
	})
	if _, err := srv.Admin.Exec(t.Context(), "SELECT pg_cancel_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	if code := p.wait(t); code != exitConflict {
		t.Fatalf("exit %d, want %d: %s", code, exitConflict, p.stderr.String())
	}
	out := p.stderr.String()
	var line string // the last: a waiting line may come before it
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) > 0 {
		line = lines[len(lines)-1]
	}
	if !strings.Contains(line, "; not acquired: the server ended the wait: another session cancelled it") ||
		strings.Count(line, "job") != 1 {
		t.Errorf("stderr: %q", out)
	}
}
