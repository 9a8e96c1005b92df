package main

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/pglocks/pglocks/internal/pgtest"
)

// childEnv makes this test binary run the example (main) instead of the
// tests.
const childEnv = "PGLOCKS_GOCRON_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		main()
	}
	// TestExample's run starts a throwaway server: a signal removes it too.
	stop := pgtest.StopOnSignal()
	code := m.Run()
	stop()
	os.Exit(code)
}

// TestExample runs the example both ways, as a newcomer would (its own
// throwaway server), and checks what it prints: every tick of both jobs once
// (run says so in its exit status), replica 2 skipping while replica 1 runs,
// and replica 2 running the jobs after replica 1 stops.
func TestExample(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent()) // TestMain's StopOnSignal
	t.Setenv("DATABASE_URL", "")
	for _, elect := range []bool{false, true} {
		var out, errs pgtest.Buffer
		if code := run(context.Background(), &out, &errs, 4, elect); code != 0 {
			t.Fatalf("elect %v: exit %d\n%s%s", elect, code, out.String(), errs.String())
		}
		text := out.String()
		t.Logf("elect %v:\n%s", elect, text)
		before, after, ok := strings.Cut(text, "replica 1 stops")
		if !ok {
			t.Fatalf("elect %v: replica 1 never stopped", elect)
		}
		if !strings.Contains(after, "ran on replica 2") || strings.Contains(after, "ran on replica 1") {
			t.Errorf("elect %v: after replica 1 stopped, replica 2 must run every job", elect)
		}
		if n := len(regexp.MustCompile(`ran on replica \d`).FindAllString(text, -1)); n < 8 {
			t.Errorf("elect %v: %d runs in 4 ticks of 2 jobs", elect, n)
		}
		if !strings.Contains(before, "ran on replica 1") {
			t.Errorf("elect %v: replica 1 ran nothing before it stopped", elect)
		}
		// Replica 2 may run a first tick that replica 1 started too late
		// for; once replica 1 leads, it runs every tick until it stops.
		if elect && strings.Contains(before, "ran on replica 2") {
			t.Errorf("replica 2 ran a job while replica 1 led")
		}
		if elect && !strings.Contains(before, "replica 1 leads") {
			t.Errorf("replica 1 was not the first leader")
		}
		if !elect && !strings.Contains(before, "skipped on replica 2") {
			t.Errorf("replica 2 never skipped a tick that replica 1 ran")
		}
	}
}

// TestRemovesServerWhenStopped runs the example (for longer than the test
// waits) with its own throwaway server, and stops it once a job has run, in
// each way a program is stopped short but can still clean up: it must end
// on its own, and leave no server behind.
func TestRemovesServerWhenStopped(t *testing.T) {
	for _, tc := range []struct {
		name string
		sig  syscall.Signal // 0: close its stdout, as head does
	}{
		{"SIGTERM", syscall.SIGTERM},
		{"SIGHUP", syscall.SIGHUP},
		{"stdout closed", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmp := pgtest.TempDir(t)
			cmd := exec.Command(os.Args[0], "-ticks=60")
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

			_ = r.SetReadDeadline(time.Now().Add(3 * time.Minute))
			out := bufio.NewScanner(r)
			var seen []string
			for !strings.Contains(strings.Join(seen, "\n"), "ran on replica") {
				if !out.Scan() {
					t.Fatalf("the example ended early: %v\n%s\n%s", out.Err(), strings.Join(seen, "\n"), stderr.String())
				}
				seen = append(seen, out.Text())
			}
			if len(pgtest.Leftovers(tmp)) == 0 {
				t.Fatal("no throwaway server runs")
			}
			if tc.sig == 0 {
				r.Close() // the next tick's line is written to no reader
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
			if !cmd.ProcessState.Exited() {
				t.Errorf("the example ended with %v, want it to end on its own\n%s", cmd.ProcessState, stderr.String())
			}
			pgtest.WaitNoLeftovers(t, tmp)
		})
	}
}
