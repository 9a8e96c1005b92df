package pgtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
)

// InstallPgBouncer says how to get PgBouncer when it is missing.
const InstallPgBouncer = `pgtest: pgbouncer not found on PATH or in /usr/sbin.
Install it (Debian/Ubuntu: apt-get install pgbouncer; macOS: brew install pgbouncer): bash .ci/run does`

// PgBouncer is a PgBouncer in front of a local Server.
type PgBouncer struct {
	// URL reaches the server's "postgres" database through PgBouncer, with
	// pgx's simple protocol (prepared statements do not survive
	// transaction pooling in PgBouncer 1.18).
	URL string
	// AdminURL reaches PgBouncer's admin console (database "pgbouncer").
	AdminURL string
	dir      string
	start    func() error
	remove   func() // stops PgBouncer and removes dir

	mu     sync.Mutex
	cmd    *exec.Cmd     // the running PgBouncer; guarded by mu
	exited chan struct{} // closed when cmd has exited; guarded by mu
}

// StartPgBouncer starts PgBouncer with pool_mode mode ("session",
// "transaction") in front of s. Each of settings is a line of
// pgbouncer.ini's [pgbouncer] section ("idle_transaction_timeout = 2").
func (s *Server) StartPgBouncer(mode string, settings ...string) (*PgBouncer, error) {
	return s.StartPgBouncerVia(mode, s.port, settings...)
}

// StartPgBouncerVia is StartPgBouncer with PgBouncer reaching s through
// 127.0.0.1:port (a Proxy in between, say).
func (s *Server) StartPgBouncerVia(mode string, serverPort int, settings ...string) (*PgBouncer, error) {
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/pgbouncer"); serr != nil {
			return nil, errors.New(InstallPgBouncer)
		}
		bin = "/usr/sbin/pgbouncer"
	}
	dir, err := newDir(pgbouncerPrefix, s.cred) // PgBouncer refuses to run as root
	if err != nil {
		return nil, err
	}
	b := &PgBouncer{dir: dir}
	b.remove = sync.OnceFunc(func() {
		untrack(b)
		b.kill()
		_ = os.RemoveAll(b.dir)
	})
	track(b, b.remove)
	port, err := freePort()
	if err != nil {
		b.Stop()
		return nil, err
	}
	ini := fmt.Sprintf(`[databases]
* = host=127.0.0.1 port=%d user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = any
admin_users = postgres
server_login_retry = 1
pool_mode = %s
max_client_conn = 500
default_pool_size = 20
ignore_startup_parameters = extra_float_digits,options
logfile = %s
pidfile = %s
`, serverPort, port, mode, filepath.Join(dir, "pgbouncer.log"), filepath.Join(dir, "pgbouncer.pid")) +
		strings.Join(settings, "\n") + "\n"
	conf := filepath.Join(dir, "pgbouncer.ini")
	if err := os.WriteFile(conf, []byte(ini), 0o644); err != nil {
		b.Stop()
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	b.start = func() error {
		cmd := exec.Command(bin, conf)
		cmd.Dir = dir // so that a later run can tell it is ours (removeStale)
		cmd.SysProcAttr = childAttr(s.cred)
		started := make(chan error, 1)
		exited := make(chan struct{})
		b.mu.Lock() // kill waits until b.cmd is set
		go func() {
			defer close(exited)
			// On Linux PgBouncer gets SIGKILL when the thread that started
			// it ends (Pdeathsig): hold on to that thread until it exits.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			if err := cmd.Start(); err != nil {
				started <- fmt.Errorf("pgtest: start pgbouncer: %w", err)
				return
			}
			started <- nil
			_ = cmd.Wait()
		}()
		err := <-started
		if err == nil {
			b.cmd, b.exited = cmd, exited
		}
		b.mu.Unlock()
		if err != nil {
			return err
		}
		for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if c, err := net.Dial("tcp", addr); err == nil {
				c.Close()
				return nil
			}
			if time.Now().After(end) {
				log, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
				return fmt.Errorf("pgtest: pgbouncer did not listen on %s:\n%s", addr, log)
			}
		}
	}
	if err := b.start(); err != nil {
		b.Stop()
		return nil, err
	}
	b.URL = fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable&default_query_exec_mode=simple_protocol", addr)
	b.AdminURL = fmt.Sprintf("postgres://postgres@%s/pgbouncer?sslmode=disable&default_query_exec_mode=simple_protocol", addr)
	return b, nil
}

// DB returns b's URL for the database of dsn, a URL of the server behind it
// (one of Server.DB's, say).
func (b *PgBouncer) DB(dsn string) string {
	db := dsn[strings.LastIndex(dsn, "/")+1:]
	db, _, _ = strings.Cut(db, "?")
	return strings.Replace(b.URL, "/postgres?", "/"+db+"?", 1)
}

// Restart kills PgBouncer (SIGKILL: every client and server connection
// ends) and starts it again on the same port.
func (b *PgBouncer) Restart() error {
	b.kill()
	return b.start()
}

// kill kills PgBouncer, if it runs, and waits until it has exited.
func (b *PgBouncer) kill() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd != nil {
		_ = b.cmd.Process.Kill()
		<-b.exited
		b.cmd = nil
	}
}

// Stop stops PgBouncer and removes its files. It is safe to call more than
// once, and from more than one goroutine.
func (b *PgBouncer) Stop() { b.remove() }
