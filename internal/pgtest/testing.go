package pgtest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Local starts a throwaway server from the local installation for t, as
// StartLocal does, and stops it when t ends; it fails t if it cannot.
func Local(t testing.TB, o Options) *Server {
	t.Helper()
	s, err := StartLocal(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Standby starts a streaming standby of the local server s for t, and stops
// it when t ends; it fails t if it cannot.
func (s *Server) Standby(t testing.TB) *Server {
	t.Helper()
	st, err := s.StartStandby()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Stop)
	return st
}

// CheckLeaks is a check for Main: it fails a run whose tests passed but
// left goroutines behind.
func CheckLeaks(code int) int {
	if code != 0 {
		return code
	}
	// pgx closes a connection whose context was cancelled in a goroutine
	// of its own that drains the socket for up to 15 s (asyncClose): pgx's,
	// bounded by pgx, and still there after a test that cut a connection
	// off (a partition) ends less than 15 s before the run does.
	if err := goleak.Find(goleak.IgnoreAnyFunction("github.com/jackc/pgx/v5/pgconn.(*PgConn).asyncClose.func1")); err != nil {
		fmt.Fprintln(os.Stderr, "goroutines left behind:", err)
		return 1
	}
	return code
}

// TempDir makes a directory for t to run a program in that starts throwaway
// servers (with TMPDIR set to it), so that t sees what that program leaves
// behind (Leftovers), and nothing of other runs'. When t ends, it kills the
// processes still working in it and removes it.
func TempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pglocks-t-")
	if err == nil {
		// The server's user ("postgres" when the tests run as root) must
		// reach its own directory inside.
		err = os.Chmod(dir, 0o755)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
			ps := processesIn(dir)
			if len(ps) == 0 {
				break
			}
			for _, p := range ps {
				_ = syscall.Kill(p.pid, syscall.SIGKILL)
			}
		}
		_ = os.RemoveAll(dir)
	})
	return dir
}

// Leftovers lists, one line each, what throwaway servers and PgBouncers left
// in dir (a TempDir): their directories, and the processes still working in
// dir (postmasters, backends, PgBouncers; Linux only).
func Leftovers(dir string) []string {
	var left []string
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if hasDirPrefix(e.Name()) {
			left = append(left, "directory "+filepath.Join(dir, e.Name()))
		}
	}
	for _, p := range processesIn(dir) {
		left = append(left, p.String())
	}
	return left
}

// WaitNoLeftovers waits until nothing is left in dir (a TempDir), and fails t
// with what is if that takes more than 30 s.
func WaitNoLeftovers(t testing.TB, dir string) {
	t.Helper()
	end := time.Now().Add(30 * time.Second)
	for {
		left := Leftovers(dir)
		if len(left) == 0 {
			return
		}
		if time.Now().After(end) {
			t.Errorf("left behind:\n%s", strings.Join(left, "\n"))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
