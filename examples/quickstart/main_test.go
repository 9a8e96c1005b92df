package main

import (
	"bufio"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgtest"
)

// childEnv makes this test binary run the example (main) instead of the
// tests.
const childEnv = "PGLOCKS_QUICKSTART_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		main()
	}
	os.Exit(m.Run())
}

// TestRemovesServerWhenStopped runs the example with its own throwaway
// server and stops it while the workers work, in each way a program is
// stopped short but can still clean up: it must say why it stopped, and
// leave no server behind.
func TestRemovesServerWhenStopped(t *testing.T) {
	for _, tc := range []struct {
		name  string
		sig   syscall.Signal // 0: close its stdout, as head -3 does
		cause string
	}{
		{"SIGINT", syscall.SIGINT, "interrupt signal received"},
		{"SIGTERM", syscall.SIGTERM, "terminated signal received"},
		{"SIGHUP", syscall.SIGHUP, "hangup signal received"},
		{"stdout closed", 0, "broken pipe signal received"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmp := pgtest.TempDir(t)
			cmd := exec.Command(os.Args[0])
			cmd.Env = append(os.Environ(), childEnv+"=1", "TMPDIR="+tmp, "DATABASE_URL=", pgtest.EnvURL+"=")
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			var stderr pgtest.Buffer
			cmd.Stdout, cmd.Stderr = w, &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			w.Close()
			exited := make(chan struct{})
			go func() {
				_ = cmd.Wait()
				close(exited)
			}()
			defer func() {
				_ = cmd.Process.Kill()
				<-exited
			}()

			// Worker 1 has the lock and works for a second: the server runs.
			_ = r.SetReadDeadline(time.Now().Add(3 * time.Minute))
			out := bufio.NewScanner(r)
			var seen []string
			for !strings.Contains(strings.Join(seen, "\n"), "has the lock") {
				if !out.Scan() {
					t.Fatalf("the example ended early: %v\n%s\n%s", out.Err(), strings.Join(seen, "\n"), stderr.String())
				}
				seen = append(seen, out.Text())
			}
			if len(pgtest.Leftovers(tmp)) == 0 {
				t.Fatal("no throwaway server runs")
			}
			if tc.sig == 0 {
				r.Close() // its next line is written to no reader
			} else {
				if err := cmd.Process.Signal(tc.sig); err != nil {
					t.Fatal(err)
				}
				go func() { // keep reading, so that it never waits to write
					for out.Scan() {
					}
				}()
			}
			select {
			case <-exited:
			case <-time.After(time.Minute):
				t.Fatalf("the example did not stop\n%s", stderr.String())
			}
			if code := cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(stderr.String(), tc.cause) {
				t.Errorf("the example ended with %v, want exit status 1 and %q:\n%s", cmd.ProcessState, tc.cause, stderr.String())
			}
			pgtest.WaitNoLeftovers(t, tmp)
		})
	}
}
