package main

import (
	"os"
	"strings"
	"syscall"
	"testing"
)

// appName keeps NAME whole: the host is shortened, then dropped, then
// "pglocks ", then the pid, and NAME is cut only when nothing else is left.
func TestAppName(t *testing.T) {
	const k8s = "billing-invoice-outbox-relay-7d9f8c6b5-x2x9z"
	for _, c := range []struct {
		cmd, name, host string
		max             int
		want            string
	}{
		{"run", "cronjob", "vm1", 63, "pglocks run cronjob on vm1[30238]"},
		{"elect", "relay", "vm1.prod.example.com", 41, "pglocks elect relay on vm1[30238]"},
		{"run", "relay", "10.0.0.17", 63, "pglocks run relay on 10.0.0.17[30238]"},
		{"run", "billing-invoice-outbox-relay", k8s, 63, "pglocks run billing-invoice-outbox-relay on billi~-x2x9z[30238]"},
		{"elect", "orders", k8s, 41, "pglocks elect orders on bill~x2x9z[30238]"},
		{"elect", "billing-invoice", k8s, 41, "pglocks elect billing-invoice[30238]"},
		{"elect", "billing-invoice-outbox-relay", k8s, 41, "elect billing-invoice-outbox-relay[30238]"},
		{"elect", "billing-invoice-outbox-relay-v2", k8s, 41, "elect billing-invoice-outbox-relay-v2"},
		{"elect", strings.Repeat("n", 60), "vm1", 41, "elect " + strings.Repeat("n", 35)},
		{"run", strings.Repeat("é", 40), "vm1", 63, "run " + strings.Repeat("é", 29)},
	} {
		got := appName(c.cmd, c.name, c.host, 30238, c.max)
		if got != c.want || len(got) > c.max {
			t.Errorf("appName(%q, %q, %q, %d) = %q (%d bytes), want %q", c.cmd, c.name, c.host, c.max, got, len(got), c.want)
		}
	}
}

// The server shows the whole application_name that run and elect choose: an
// elected leader's, with the time of its election after it, too.
func TestAppNameOnServer(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	host, _ := os.Hostname()
	name := "billing-invoice-outbox"
	for _, cmd := range []string{"run", "elect"} {
		p := start(t, dsn, cmd, "-q", name, "--", "sh", "-c", "echo ready; exec sleep 60")
		waitFor(t, cmd+" to run", func() bool { return strings.Contains(p.stdout.String(), "ready") })
		max := maxAppName
		if cmd == "elect" {
			max = maxLeaderAppName
		}
		want := appName(cmd, name, host, p.cmd.Process.Pid, max)
		if !strings.Contains(want, name) {
			t.Fatalf("appName dropped the name: %q", want)
		}
		var app string
		if err := srv.Admin.QueryRow(t.Context(), `SELECT a.application_name FROM pg_locks l
			JOIN pg_stat_activity a ON a.pid = l.pid JOIN pg_database d ON d.oid = l.database
			WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1`, db).Scan(&app); err != nil {
			t.Fatal(err)
		}
		if cmd == "elect" {
			// Lead's mark: " @" and the time.
			i := strings.LastIndex(app, " @")
			if i < 0 || len(app) > 63 {
				t.Fatalf("leader's application_name %q has no election time", app)
			}
			app = app[:i]
		}
		if app != want {
			t.Errorf("%s: application_name %q, want %q", cmd, app, want)
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM) // to COMMAND, which ends
		p.wait(t)
		waitFor(t, "the lock to go", func() bool { return len(locks(t, db)) == 0 })
	}
}
