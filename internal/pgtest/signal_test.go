package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestMainStopsOnSignal stops a test run under Main, with a server and a
// PgBouncer of a test's besides Main's, in each way a run is stopped short
// but can still clean up: each must leave nothing behind, and end the run
// as the signal would have.
func TestMainStopsOnSignal(t *testing.T) {
	for _, tc := range []struct {
		name string
		sig  syscall.Signal
	}{
		{"SIGINT", syscall.SIGINT},
		{"SIGTERM", syscall.SIGTERM},
		{"SIGHUP", syscall.SIGHUP},
		{"broken stdout", syscall.SIGPIPE}, // go test -v | head
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmp := TempDir(t)
			h := startHelper(t, tmp, "hold")
			dirs := owned(t, tmp, h.cmd.Process.Pid)
			if n := kinds(dirs); n["pg"] != 2 || n["pgbouncer"] != 1 {
				t.Fatalf("the helper made %v, want 2 servers and a PgBouncer", dirs)
			}
			for _, d := range dirs {
				if len(running(tmp, d)) == 0 {
					t.Fatalf("nothing runs in %s", d)
				}
			}
			if tc.sig == syscall.SIGPIPE {
				h.stdout.Close()
				fmt.Fprintln(h.stdin, "write this") // to the closed stdout
			} else if err := h.cmd.Process.Signal(tc.sig); err != nil {
				t.Fatal(err)
			}
			if ws := h.wait(t); !ws.Signaled() || ws.Signal() != tc.sig {
				t.Errorf("the helper ended with %v, want killed by %v\n%s", h.cmd.ProcessState, tc.sig, h.stderr.String())
			}
			WaitNoLeftovers(t, tmp)
		})
	}
}

// TestNotifyContextIgnoresBrokenSockets writes to a pipe whose reader is
// gone, as a write to a server connection that the server has closed does:
// the SIGPIPE that raises must not cancel the context (it did, the test
// harness would stop every test that kills a connection); the SIGTERM after
// it must.
func TestNotifyContextIgnoresBrokenSockets(t *testing.T) {
	ctx, stop := NotifyContext(context.Background())
	defer stop()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	defer w.Close()
	if _, err := w.Write([]byte("x")); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("write to a pipe without readers: %v, want EPIPE", err)
	}
	// Signals reach the context in the order of their numbers (SIGPIPE 13,
	// SIGTERM 15), so the SIGPIPE has been looked at when this arrives.
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ctx.Done():
	case <-time.After(time.Minute):
		t.Fatal("SIGTERM did not cancel the context")
	}
	if got, want := fmt.Sprint(context.Cause(ctx)), "terminated signal received"; got != want {
		t.Errorf("cause %q, want %q", got, want)
	}
}
