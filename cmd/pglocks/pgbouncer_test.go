package main

import (
	"strings"
	"syscall"
	"testing"

	"github.com/pglocks/pglocks"
)

// run, ls, elect and leader work through PgBouncer in transaction pooling:
// a second run waits for the first or, with -n, says who holds the lock;
// the Locker pins its sessions (see the package documentation).
func TestThroughPgBouncer(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	b, err := srv.StartPgBouncer("transaction")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Stop)
	via := b.DB(dsn)

	first := start(t, via, "run", "job", "--", "sh", "-c", "echo ready; exec sleep 30")
	waitFor(t, "the first to hold the lock", func() bool { return holderPID(t, db, pglocks.Name("job")) != 0 })
	if _, stderr, code := pglocksRun(t, via, "run", "-n", "job", "--", "true"); code != 1 || !strings.Contains(stderr, "job is held by pid") {
		t.Errorf("run -n through PgBouncer: exit %d, %q", code, stderr)
	}
	if out, stderr, code := pglocksRun(t, via, "ls"); code != 0 || !strings.Contains(out, "job") {
		t.Errorf("ls through PgBouncer: exit %d: %q %q", code, out, stderr)
	}
	if waiting(t, dsn) || waiting(t, db) {
		t.Error("a wait is still queued after run -n exited")
	}
	_ = first.cmd.Process.Signal(syscall.SIGTERM) // passed on to its command
	first.wait(t)
	waitFor(t, "the stopped run's lock to be free", func() bool { return holderPID(t, db, pglocks.Name("job")) == 0 })

	leader := start(t, via, "elect", "relay", "--", "sh", "-c", "echo ready; exec sleep 30")
	waitFor(t, "the elected one to start", func() bool { return strings.Contains(leader.stdout.String(), "ready") })
	if out, stderr, code := pglocksRun(t, via, "leader", "relay"); code != 0 || !strings.Contains(out, "relay is led by pid") {
		t.Errorf("leader through PgBouncer: exit %d: %q %q", code, out, stderr)
	}
	_ = leader.cmd.Process.Signal(syscall.SIGTERM)
	leader.wait(t)
}
