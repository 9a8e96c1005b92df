package pgtest

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// exitedPid returns the pid of a process that has exited and been reaped.
func exitedPid(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

func TestOwnerGone(t *testing.T) {
	me := thisProcess()
	exited := exitedPid(t)
	zombie := exec.Command("true") // exits, and is not waited for until the end
	if err := zombie.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = zombie.Wait() })
	for end := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		if _, err := processStart(zombie.Process.Pid); errors.Is(err, fs.ErrNotExist) {
			break
		}
		if time.Now().After(end) {
			t.Fatal("true did not exit")
		}
	}
	with := func(f func(*owner)) owner { o := me; f(&o); return o }
	for _, tc := range []struct {
		name string
		o    owner
		gone bool
	}{
		{"this process", me, false},
		{"exited", with(func(o *owner) { o.pid = exited }), true},
		{"exited, not reaped yet", with(func(o *owner) { o.pid = zombie.Process.Pid }), true},
		// Only Linux knows when a process started.
		{"pid reused since", with(func(o *owner) { o.start = "1" }), runtime.GOOS == "linux"},
		{"machine restarted since", with(func(o *owner) { o.pid, o.boot = os.Getpid(), "another boot" }), true},
		{"its start time unknown", with(func(o *owner) { o.start = "" }), false},
		{"its boot unknown", with(func(o *owner) { o.pid, o.boot = exited, "" }), runtime.GOOS != "linux"},
		{"another pid namespace", with(func(o *owner) { o.pid, o.pidns = exited, "pid:[1]" }), false},
		{"another machine", with(func(o *owner) { o.pid, o.host, o.boot = exited, "elsewhere", "its boot" }), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.o.gone(me); got != tc.gone {
				t.Errorf("gone = %v, want %v, for\n%s", got, tc.gone, tc.o)
			}
		})
	}
}

func TestParseOwner(t *testing.T) {
	me := thisProcess()
	if o, err := parseOwner([]byte(me.String())); err != nil || o != me {
		t.Errorf("parseOwner(%q) = %+v, %v", me.String(), o, err)
	}
	whole := me.String()
	for _, bad := range []string{"", whole[:len(whole)-1], whole[:len(whole)/2], "pid=0\n" + whole[len("pid=")+len(strconv.Itoa(me.pid))+1:], whole + "pid=1\n", whole + "x=1\n", "garbage\n"} {
		if o, err := parseOwner([]byte(bad)); err == nil {
			t.Errorf("parseOwner(%q) = %+v, want an error", bad, o)
		}
	}
}

// TestRemoveStaleOnlyWhatIsProvablyStale lays out directories as killed,
// running, older and half-made runs leave them, and checks that only the
// killed run's is removed, and that a pid file whose pid is now another
// process's does not get that process signalled.
func TestRemoveStaleOnlyWhatIsProvablyStale(t *testing.T) {
	tmp := t.TempDir()
	// A process that has the pid a killed run's postmaster.pid names.
	other := exec.Command("sleep", "600")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Process.Kill(); _ = other.Wait() })
	gone := thisProcess()
	gone.pid = exitedPid(t)
	layout := []struct {
		name  string
		owner string // the owner file; "" for none
		stale bool
	}{
		{serverPrefix + "killed", gone.String(), true},
		{standbyPrefix + "killed", gone.String(), true},
		{pgbouncerPrefix + "killed", gone.String(), true},
		{serverPrefix + "running", thisProcess().String(), false},
		{serverPrefix + "older", "", false},
		{serverPrefix + "half", gone.String()[:10], false},
		{"pglocks-other-killed", gone.String(), false},
	}
	for _, d := range layout {
		dir := filepath.Join(tmp, d.name, "data")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		pid := []byte(strconv.Itoa(other.Process.Pid) + "\n" + dir + "\n")
		if err := os.WriteFile(filepath.Join(dir, "postmaster.pid"), pid, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tmp, d.name, "pgbouncer.pid"), pid, 0o600); err != nil {
			t.Fatal(err)
		}
		if d.owner != "" {
			if err := os.WriteFile(filepath.Join(tmp, d.name, ownerFile), []byte(d.owner), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	removed := removeStale(tmp)
	for _, d := range layout {
		path := filepath.Join(tmp, d.name)
		_, err := os.Stat(path)
		if exists := err == nil; exists == d.stale || slices.Contains(removed, path) != d.stale {
			t.Errorf("%s: exists %v, removed %v; want stale %v", d.name, exists, removed, d.stale)
		}
	}
	if err := other.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the process with the stale pid: %v", err)
	}
	if _, err := processStart(other.Process.Pid); err != nil {
		t.Errorf("the process with the stale pid was signalled: %v", err)
	}
}

// TestStartRemovesStaleServers kills a test run (a helper process) with
// SIGKILL, which no handler sees, while another runs, and checks that the
// next run's first server removes what the killed one left, and nothing of
// the one still running.
func TestStartRemovesStaleServers(t *testing.T) {
	tmp := TempDir(t)
	killed := startHelper(t, tmp, "standby")
	alive := startHelper(t, tmp, "hold") // its first server looked, and must have left killed's alone
	older := filepath.Join(tmp, serverPrefix+"older")
	if err := os.Mkdir(older, 0o700); err != nil { // no owner file: made by an older pgtest
		t.Fatal(err)
	}
	killedDirs := owned(t, tmp, killed.cmd.Process.Pid)
	aliveDirs := owned(t, tmp, alive.cmd.Process.Pid)
	if n := kinds(killedDirs); n["pg"] != 2 || n["standby"] != 1 || n["pgbouncer"] != 1 {
		t.Fatalf("the helper to kill made %v, want 2 servers, a standby and a PgBouncer", killedDirs)
	}
	if n := kinds(aliveDirs); n["pg"] != 2 || n["pgbouncer"] != 1 {
		t.Fatalf("the helper left running made %v, want 2 servers and a PgBouncer", aliveDirs)
	}

	if err := killed.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	killed.wait(t)
	// Its PgBouncer dies with it (Pdeathsig); its servers do not.
	for _, d := range killedDirs {
		if kinds([]string{d})["pgbouncer"] == 1 {
			for end := time.Now().Add(time.Minute); len(running(tmp, d)) > 0; time.Sleep(10 * time.Millisecond) {
				if time.Now().After(end) {
					t.Fatalf("the killed run's PgBouncer still runs: %v", running(tmp, d))
				}
			}
		} else if len(running(tmp, d)) == 0 {
			t.Fatalf("nothing runs in %s", d)
		}
	}

	runOnce(t, tmp)
	for _, d := range killedDirs {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("the killed run's %s is still there", d)
		}
		if ps := running(tmp, d); len(ps) > 0 {
			t.Errorf("the killed run's servers still run: %v", ps)
		}
	}
	for _, d := range append(aliveDirs, older) {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("the next run removed %s: %v", d, err)
		}
	}
	for _, d := range aliveDirs {
		if len(running(tmp, d)) == 0 {
			t.Errorf("the next run stopped what runs in %s", d)
		}
	}

	// The run left running ends as a run does, and removes its own.
	alive.stdin.Close()
	if ws := alive.wait(t); ws.ExitStatus() != 0 {
		t.Errorf("the helper left running: %v\n%s", alive.cmd.ProcessState, alive.stderr.String())
	}
	if err := os.Remove(older); err != nil {
		t.Fatal(err)
	}
	WaitNoLeftovers(t, tmp)
}
