package pgtest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// helperEnv makes this test binary a helper process, a test run under Main
// that starts throwaway servers: "hold" (TestHelperProcess: a server and a
// PgBouncer of its own besides Main's, then it waits), "standby" (hold, and
// a standby too), "once" (no test: Main starts its server and stops it).
const helperEnv = "PGTEST_HELPER"

// helperServer is the helper process's server, which Main starts.
var helperServer *Server

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		Main(m, &helperServer, nil)
	}
	os.Exit(m.Run())
}

// TestHelperProcess is what a helper process runs (see startHelper); in a
// run of the tests it does nothing. It starts a server and a PgBouncer (and
// a standby) besides Main's, prints "ready", then echoes each line of its
// stdin to its stdout until stdin ends.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return
	}
	local := Local(t, Options{})
	b, err := helperServer.StartPgBouncer("transaction")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Stop)
	if mode == "standby" {
		local.Standby(t)
	}
	fmt.Println("ready")
	for sc := bufio.NewScanner(os.Stdin); sc.Scan(); {
		// Once the parent has closed our stdout, this write fails.
		fmt.Println("read", sc.Text())
	}
}

// helper is a helper process.
type helper struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *os.File // the read end of its stdout
	stderr Buffer
	exited chan struct{} // closed when cmd.Wait has returned
}

// startHelper starts a helper process in mode, with its throwaway servers in
// tmp, and waits until it says it is ready.
func startHelper(t *testing.T, tmp, mode string) *helper {
	t.Helper()
	h := &helper{exited: make(chan struct{})}
	h.cmd = exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	h.cmd.Env = append(os.Environ(), helperEnv+"="+mode, "TMPDIR="+tmp, EnvURL+"=")
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	h.stdout = r
	h.cmd.Stdout = w
	h.cmd.Stderr = &h.stderr
	if h.stdin, err = h.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	go func() {
		_ = h.cmd.Wait()
		close(h.exited)
	}()
	t.Cleanup(func() {
		_ = h.cmd.Process.Kill()
		<-h.exited
		r.Close()
	})
	_ = r.SetReadDeadline(time.Now().Add(3 * time.Minute))
	line, err := bufio.NewReader(r).ReadString('\n')
	if line != "ready\n" {
		t.Fatalf("helper %s: %q, %v\n%s", mode, line, err, h.stderr.String())
	}
	return h
}

// wait waits until the helper has exited, at most a minute.
func (h *helper) wait(t *testing.T) syscall.WaitStatus {
	t.Helper()
	select {
	case <-h.exited:
	case <-time.After(time.Minute):
		t.Fatalf("the helper did not exit\n%s", h.stderr.String())
	}
	if strings.Contains(h.stderr.String(), "DATA RACE") { // go test -race
		t.Errorf("the helper raced:\n%s", h.stderr.String())
	}
	return h.cmd.ProcessState.Sys().(syscall.WaitStatus)
}

// runOnce runs a helper process that starts a server and stops it, as the
// next test run does.
func runOnce(t *testing.T, tmp string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=once", "TMPDIR="+tmp, EnvURL+"=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the next run: %v\n%s", err, out)
	}
}

// owned returns the throwaway directories in tmp that process pid owns.
func owned(t *testing.T, tmp string, pid int) []string {
	t.Helper()
	var dirs []string
	entries, err := os.ReadDir(tmp)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(tmp, e.Name(), ownerFile))
		if err != nil {
			continue
		}
		if o, err := parseOwner(b); err == nil && o.pid == pid {
			dirs = append(dirs, filepath.Join(tmp, e.Name()))
		}
	}
	return dirs
}

// running returns the processes working in dir (which may be removed) or
// below it, among those working in tmp.
func running(tmp, dir string) []process {
	var ps []process
	real, _ := filepath.EvalSymlinks(tmp)
	rel, _ := filepath.Rel(tmp, dir)
	dir = filepath.Join(real, rel)
	for _, p := range processesIn(tmp) {
		c := strings.TrimSuffix(p.cwd, " (deleted)")
		if c == dir || strings.HasPrefix(c, dir+"/") {
			ps = append(ps, p)
		}
	}
	return ps
}

// kinds counts dirs by kind: "pg", "standby", "pgbouncer".
func kinds(dirs []string) map[string]int {
	n := map[string]int{}
	for _, d := range dirs {
		name := strings.TrimPrefix(filepath.Base(d), "pglocks-")
		kind, _, _ := strings.Cut(name, "-")
		n[kind]++
	}
	return n
}
