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
const childEnv = "PGLOCKS_RIVER_CHILD"

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

// TestExample runs the example as a newcomer would (its own throwaway
// server), and checks what it prints: every job ran once and at its first
// attempt though some were snoozed, never more at once than allowed (run
// says so in its exit status), and replica 2 working alone after replica 1
// stopped.
func TestExample(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent()) // TestMain's StopOnSignal
	t.Setenv("DATABASE_URL", "")
	var out, errs pgtest.Buffer
	if code := run(context.Background(), &out, &errs, 6); code != 0 {
		t.Fatalf("exit %d\n%s%s", code, out.String(), errs.String())
	}
	text := out.String()
	t.Logf("\n%s", text)
	runs := regexp.MustCompile(`(example_\w+) job +(\d+) runs on replica (\d) \(attempt (\d+), snoozed (\d+) times before\); (\d+) running`).FindAllStringSubmatch(text, -1)
	if len(runs) != 12 {
		t.Fatalf("%d runs, want 12 (6 jobs of each kind, once each)", len(runs))
	}
	seen := map[string]bool{}
	for _, r := range runs {
		if seen[r[2]] {
			t.Errorf("job %s ran twice", r[2])
		}
		seen[r[2]] = true
		if r[4] != "1" {
			t.Errorf("job %s ran at attempt %s, want 1 (snoozes are not attempts)", r[2], r[4])
		}
	}
	if !strings.Contains(text, "snoozed 1 times") {
		t.Error("no job was snoozed")
	}
	_, after, ok := strings.Cut(text, "replica 1 stops")
	if !ok {
		t.Fatal("replica 1 never stopped")
	}
	if strings.Contains(after, "on replica 1") {
		t.Error("replica 1 ran a job after it stopped")
	}
	if !strings.Contains(text, "example_report: at most 1 at once") || !strings.Contains(text, "12 jobs done") {
		t.Error("the summary is missing or wrong")
	}
}

// TestRemovesServerWhenStopped runs the example (with more jobs than the
// test waits for) with its own throwaway server, and stops it once a job
// has run, in each way a program is stopped short but can still clean up:
// it must end on its own, and leave no server behind.
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
			cmd := exec.Command(os.Args[0], "-jobs=200")
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
			for !strings.Contains(strings.Join(seen, "\n"), "runs on replica") {
				if !out.Scan() {
					t.Fatalf("the example ended early: %v\n%s\n%s", out.Err(), strings.Join(seen, "\n"), stderr.String())
				}
				seen = append(seen, out.Text())
			}
			if len(pgtest.Leftovers(tmp)) == 0 {
				t.Fatal("no throwaway server runs")
			}
			if tc.sig == 0 {
				r.Close() // the next job's line is written to no reader
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
