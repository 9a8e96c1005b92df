package pgtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
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
	cmd      *exec.Cmd
	start    func() error
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
	dir, err := os.MkdirTemp("", "pglocks-pgbouncer-")
	if err != nil {
		return nil, err
	}
	b := &PgBouncer{dir: dir}
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
		b.cmd = exec.Command(bin, conf)
		if s.cred != nil { // PgBouncer refuses to run as root
			if err := os.Chown(dir, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
				return err
			}
			b.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
		}
		if err := b.cmd.Start(); err != nil {
			return fmt.Errorf("pgtest: start pgbouncer: %w", err)
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
	_ = b.cmd.Process.Kill()
	_ = b.cmd.Wait()
	return b.start()
}

// Stop stops PgBouncer and removes its files.
func (b *PgBouncer) Stop() {
	if b.cmd != nil && b.cmd.Process != nil {
		_ = b.cmd.Process.Kill()
		_ = b.cmd.Wait()
	}
	_ = os.RemoveAll(b.dir)
}
