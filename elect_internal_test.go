package pglocks

import (
	"testing"
	"time"
)

// TestLeaderSince reads the election time that Lead writes now, the one that
// earlier versions wrote, and leaves other application_names alone.
func TestLeaderSince(t *testing.T) {
	at := time.Date(2026, 12, 3, 14, 17, 57, 123e6, time.UTC)
	for _, c := range []struct {
		app, name string
		since     time.Time
	}{
		{"pglocks elect relay on vm1[42] @20261203T141757.123Z", "pglocks elect relay on vm1[42]", at},
		{"elector-a since=2026-12-03T14:17:57.123Z", "elector-a", at},
		{"elector-a since=2026-12-03T14:17:57Z", "elector-a", at.Truncate(time.Second)},
		{"mail @example.com", "mail @example.com", time.Time{}},
		{"", "", time.Time{}},
	} {
		name, since := leaderSince(c.app)
		if name != c.name || !since.Equal(c.since) {
			t.Errorf("leaderSince(%q) = %q, %v; want %q, %v", c.app, name, since, c.name, c.since)
		}
	}
	if n := len("pglocks elect relay on vm1[42] @20261203T141757.123Z") - len("pglocks elect relay on vm1[42]"); maxAppName-n != maxLeaderAppName {
		t.Errorf("maxLeaderAppName = %d, want %d", maxLeaderAppName, maxAppName-n)
	}
}
