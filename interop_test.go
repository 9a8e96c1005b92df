package pglocks_test

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
)

// external is a lock held by another library in another process.
type external struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	said  string // "acquired" or "not acquired"
}

// holdExternal starts cmd, which takes a lock and says whether it got it on
// its first line, then holds it until its standard input closes.
func holdExternal(t *testing.T, cmd *exec.Cmd) *external {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	x := &external{cmd: cmd, stdin: stdin}
	t.Cleanup(func() { x.release(t) })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		_ = cmd.Wait()
		t.Fatalf("%s: %v\n%s", cmd.Path, err, stderr.String())
	}
	x.said = strings.TrimSpace(line)
	return x
}

// release makes the other process let go and waits for it to exit.
func (x *external) release(t *testing.T) {
	if x.stdin == nil {
		return
	}
	x.stdin.Close()
	x.stdin = nil
	if err := x.cmd.Wait(); err != nil {
		t.Errorf("%s: %v", x.cmd.Path, err)
	}
}

// interop runs both directions against another library: it holds while a
// Locker must fail, then a Locker holds while it must fail.
func interop(t *testing.T, key pglocks.Key, start func(dsn, mode string) *exec.Cmd) {
	t.Parallel()
	e := newEnv(t, drivers[0]) // one driver is enough to meet another library
	func() {
		l := e.locker(4)
		other := holdExternal(t, start(e.dsn, "wait"))
		if other.said != "acquired" {
			t.Fatalf("the other library said %q", other.said)
		}
		_, err := l.TryLock(t.Context(), key)
		wantErr(t, err, pglocks.ErrLocked)
		other.release(t)

		// A Locker waits while the other library holds: in the server's
		// queue, and multiplexed (a Locker of one connection that holds a
		// lock already). The other library does not notify: the poll finds
		// the freed key.
		for _, conns := range []int{2, 1} {
			lw := e.locker(4, pglocks.WithMaxConns(conns))
			before := mustLock(t, lw, pglocks.ID(-7))
			other := holdExternal(t, start(e.dsn, "wait"))
			got := make(chan error, 1)
			go func() {
				lk, err := lw.Lock(t.Context(), key)
				if err == nil {
					err = lk.Release(t.Context())
				}
				got <- err
			}()
			server, multiplexed := 1, 0
			if conns == 1 {
				server, multiplexed = 0, 1
			}
			waitWaits(t, lw, server, multiplexed)
			began := time.Now()
			other.release(t)
			if err := <-got; err != nil {
				t.Fatalf("waiting with %d connections: %v", conns, err)
			}
			t.Logf("%d connections (%d in the server's queue, %d multiplexed): had it %v after the other library let go",
				conns, server, multiplexed, time.Since(began).Round(100*time.Microsecond))
			mustRelease(t, before)
		}

		lk := mustLock(t, l, key)
		if got := holdExternal(t, start(e.dsn, "nowait")); got.said != "not acquired" {
			t.Fatalf("while pglocks holds the lock, the other library said %q", got.said)
		}
		mustRelease(t, lk)
		got := holdExternal(t, start(e.dsn, "nowait"))
		if got.said != "acquired" {
			t.Fatalf("after pglocks released the lock, the other library said %q", got.said)
		}
		got.release(t)
	}()
}

// TestInteropDjango: django-pglocks' advisory_lock('nightly-report') and
// NameCRC32("nightly-report") are one lock.
func TestInteropDjango(t *testing.T) {
	const python = "/usr/bin/python3" // Debian's, where python3-django-pglocks installs
	if out, err := exec.Command(python, "-c", "import django_pglocks, django, psycopg2, six").CombinedOutput(); err != nil {
		t.Fatalf("django-pglocks is not installed (%v: %s); install it: apt-get install python3-django-pglocks python3-django python3-psycopg2 python3-six (bash .ci/run does)", err, out)
	}
	name := "nightly-report"
	interop(t, pglocks.NameCRC32(name), func(dsn, mode string) *exec.Cmd {
		cfg, err := pgx.ParseConfig(dsn)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(python, filepath.Join("testdata", "interop", "django_lock.py"), name, mode)
		cmd.Env = append(os.Environ(), "PGHOST="+cfg.Host, fmt.Sprintf("PGPORT=%d", cfg.Port), "PGUSER="+cfg.User, "PGDATABASE="+cfg.Database)
		return cmd
	})
}

// TestInteropNode: the npm package advisory-lock's createMutex('some-lock')
// and NameNode("some-lock") are one lock.
func TestInteropNode(t *testing.T) {
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatal("node is not installed; install Node.js (Debian: apt-get install nodejs npm), then: npm ci --prefix testdata/interop")
	}
	if _, err := os.Stat(filepath.Join("testdata", "interop", "node_modules", "advisory-lock")); err != nil {
		t.Fatal("the npm package advisory-lock is not installed; run: npm ci --prefix testdata/interop (bash .ci/run does)")
	}
	name := "some-lock"
	interop(t, pglocks.NameNode(name), func(dsn, mode string) *exec.Cmd {
		cmd := exec.Command("node", filepath.Join("testdata", "interop", "node_lock.js"), name, mode)
		cmd.Env = append(os.Environ(), "DATABASE_URL="+dsn)
		return cmd
	})
}
