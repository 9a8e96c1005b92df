package main

import (
	"context"
	"regexp"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/pglocks/pglocks/internal/pgtest"
)

// TestExample runs the example both ways, as a newcomer would (its own
// throwaway server), and checks what it prints: every tick of both jobs once
// (run says so in its exit status), replica 2 skipping while replica 1 runs,
// and replica 2 running the jobs after replica 1 stops.
func TestExample(t *testing.T) {
	defer goleak.VerifyNone(t)
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
