// Package pgtest starts a throwaway PostgreSQL server for tests and examples,
// and gives each test a database of its own.
//
// It finds initdb and pg_ctl on PATH, through pg_config --bindir, or under
// /usr/lib/postgresql/*/bin (the newest version). initdb refuses to run as
// root, so as root the server runs as the "postgres" user that the server
// package creates. PGLOCKS_TEST_DATABASE_URL points the tests at an existing
// server instead; its role must be allowed to create databases.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// EnvURL names the variable that points the tests at an existing server.
const EnvURL = "PGLOCKS_TEST_DATABASE_URL"

// Install says how to get a server when none can be found.
const Install = `pgtest: no PostgreSQL server to test against.
Install one (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql),
or point the tests at a server you run: ` + EnvURL + `=postgres://user@host:5432/postgres`

// Server is a PostgreSQL server for tests.
type Server struct {
	// URL is a superuser connection string for the database "postgres".
	URL string
	// Admin is a small pool on URL, for creating databases and looking at
	// pg_locks.
	Admin *pgxpool.Pool

	dir    string // holds the data directory and socket; "" for an existing server
	remove func() // stops the server and removes dir; nil for an existing server
	bin    string
	cred   *syscall.Credential
	port   int
	opts   Options
	dbSeq  atomic.Int64
}

// Start starts a throwaway server, or connects to the one that
// PGLOCKS_TEST_DATABASE_URL names.
func Start() (*Server, error) {
	if url := os.Getenv(EnvURL); url != "" {
		s := &Server{URL: url}
		return s, s.connectAdmin()
	}
	return StartLocal(Options{})
}

// Options configure a local server.
type Options struct {
	// Settings are extra server settings, "name=value".
	Settings []string
	// NetNS runs the server in that network namespace (root only); Listen
	// is then its address there.
	NetNS  string
	Listen string
}

// StartLocal starts a throwaway server from the local installation, whatever
// PGLOCKS_TEST_DATABASE_URL says: for tests that restart or kill it.
func StartLocal(o Options) (*Server, error) {
	s := &Server{opts: o}
	if err := s.initdb(); err != nil {
		return nil, err
	}
	if o.Listen != "" {
		// Clients come from the test's own network namespace: trust them.
		f, err := os.OpenFile(filepath.Join(s.data(), "pg_hba.conf"), os.O_APPEND|os.O_WRONLY, 0)
		if err == nil {
			_, err = f.WriteString("host all all 0.0.0.0/0 trust\n")
			f.Close()
		}
		if err != nil {
			s.Stop()
			return nil, fmt.Errorf("pgtest: pg_hba.conf: %w", err)
		}
	}
	port, err := freePort()
	if err != nil {
		s.Stop()
		return nil, err
	}
	s.port = port
	if err := s.Start(); err != nil {
		s.Stop()
		return nil, err
	}
	return s, s.connectAdmin()
}

// SocketURL reaches the local server through its Unix socket, which no
// network fault touches.
func (s *Server) SocketURL() string {
	return fmt.Sprintf("postgres://postgres@/postgres?host=%s&port=%d&sslmode=disable", s.dir, s.port)
}

func (s *Server) connectAdmin() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url := s.URL
	if s.opts.NetNS != "" {
		url = s.SocketURL()
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		s.Stop()
		return fmt.Errorf("pgtest: %w", err)
	}
	cfg.MaxConns = 4
	s.Admin, err = pgxpool.NewWithConfig(ctx, cfg)
	if err == nil {
		err = s.Admin.Ping(ctx)
	}
	if err != nil {
		s.Stop()
		return fmt.Errorf("pgtest: connect to %s: %w", s.URL, err)
	}
	return nil
}

func (s *Server) initdb() error {
	bin, err := findBin()
	if err != nil {
		return err
	}
	s.bin = bin
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return fmt.Errorf("pgtest: running as root, and initdb refuses to: need the user \"postgres\" (created by the postgresql package) to run the server as: %w\n%s", err, Install)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	if err := s.makeDir(serverPrefix); err != nil {
		return err
	}
	if out, err := s.run("initdb", "-D", s.data(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"); err != nil {
		s.Stop()
		return fmt.Errorf("pgtest: initdb: %w\n%s", err, out)
	}
	return nil
}

// makeDir makes the server's directory, and sets up and tracks its
// removal: from then on Stop (or a signal, see StopOnSignal) removes it.
func (s *Server) makeDir(prefix string) error {
	dir, err := newDir(prefix, s.cred)
	if err != nil {
		return err
	}
	s.dir = dir
	s.remove = sync.OnceFunc(func() {
		untrack(s)
		if _, err := os.Stat(filepath.Join(s.data(), "postmaster.pid")); err == nil {
			_, _ = s.run("pg_ctl", "-D", s.data(), "-m", "immediate", "-w", "stop")
		}
		_ = os.RemoveAll(s.dir)
	})
	track(s, s.remove)
	return nil
}

func (s *Server) data() string { return filepath.Join(s.dir, "data") }

// SocketDir is the directory of the server's Unix socket.
func (s *Server) SocketDir() string { return s.dir }

// Port is the server's port.
func (s *Server) Port() int { return s.port }

// Start starts the (stopped) local server.
func (s *Server) Start() error {
	listen := s.opts.Listen
	if listen == "" {
		listen = "127.0.0.1"
	}
	opts := []string{
		"-p " + strconv.Itoa(s.port),
		"-c listen_addresses=" + listen,
		"-c unix_socket_directories=" + s.dir,
		"-c fsync=off",
		"-c synchronous_commit=off",
		"-c full_page_writes=off",
		"-c max_connections=500",
		"-c shared_buffers=64MB",
	}
	for _, set := range s.opts.Settings {
		opts = append(opts, "-c "+set)
	}
	var out []byte
	var err error
	// After a kill -9 the old backends may still hold the shared memory
	// for a moment: try again.
	for try := 0; try < 50; try++ {
		out, err = s.run("pg_ctl", "-D", s.data(), "-l", filepath.Join(s.dir, "log"), "-o", strings.Join(opts, " "), "-w", "-t", "60", "start")
		if err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(s.dir, "log"))
		return fmt.Errorf("pgtest: pg_ctl start: %w\n%s\n%s", err, out, log)
	}
	s.URL = fmt.Sprintf("postgres://postgres@%s:%d/postgres?sslmode=disable", listen, s.port)
	return nil
}

// Restart restarts the local server with pg_ctl's shutdown mode ("fast",
// "immediate").
func (s *Server) Restart(mode string) error {
	if out, err := s.run("pg_ctl", "-D", s.data(), "-m", mode, "-w", "stop"); err != nil {
		return fmt.Errorf("pgtest: pg_ctl stop -m %s: %w\n%s", mode, err, out)
	}
	return s.restarted(s.Start())
}

// restarted drops the admin pool's connections to the old server.
func (s *Server) restarted(err error) error {
	if err == nil && s.Admin != nil {
		s.Admin.Reset()
	}
	return err
}

// Kill kills the postmaster with SIGKILL, as the OOM killer would, and starts
// the server again.
func (s *Server) Kill() error {
	b, err := os.ReadFile(filepath.Join(s.data(), "postmaster.pid"))
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	pid, err := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
	if err != nil {
		return fmt.Errorf("pgtest: postmaster.pid: %w", err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("pgtest: kill postmaster: %w", err)
	}
	// Wait until it is gone (or a zombie nobody reaps), at most 10 s.
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || strings.Contains(string(stat), ") Z ") {
			break
		}
	}
	return s.restarted(s.Start())
}

// StartStandby starts a streaming standby of the local server s
// (pg_basebackup -R), on a port of its own.
func (s *Server) StartStandby() (*Server, error) {
	st := &Server{bin: s.bin, cred: s.cred}
	if err := st.makeDir(standbyPrefix); err != nil {
		return nil, err
	}
	if out, err := st.run("pg_basebackup", "-D", st.data(), "-R", "-X", "stream", "-h", s.dir, "-p", strconv.Itoa(s.port), "-U", "postgres"); err != nil {
		st.Stop()
		return nil, fmt.Errorf("pgtest: pg_basebackup: %w\n%s", err, out)
	}
	port, err := freePort()
	if err != nil {
		st.Stop()
		return nil, err
	}
	st.port = port
	if err := st.Start(); err != nil {
		st.Stop()
		return nil, err
	}
	return st, st.connectAdmin()
}

// run runs one of the server's programs, as the server's user (and in its
// network namespace).
func (s *Server) run(prog string, args ...string) ([]byte, error) {
	path := filepath.Join(s.bin, prog)
	cred := s.cred
	if s.opts.NetNS != "" {
		// Entering the namespace needs root; drop to the server's user inside.
		pre := []string{"netns", "exec", s.opts.NetNS}
		if cred != nil {
			pre = append(pre, "setpriv", "--reuid="+strconv.Itoa(int(cred.Uid)), "--regid="+strconv.Itoa(int(cred.Gid)), "--clear-groups")
			cred = nil
		}
		args = append(append(pre, path), args...)
		path = "ip"
	}
	cmd := exec.Command(path, args...)
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	return cmd.CombinedOutput()
}

// Stop stops a throwaway server and removes its files. It is safe to call
// more than once, and from more than one goroutine.
func (s *Server) Stop() {
	if s.Admin != nil {
		s.Admin.Close()
	}
	if s.remove != nil {
		s.remove()
	}
}

// findBin returns the directory that holds initdb and pg_ctl.
func findBin() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		// Follow links (Debian links only some programs into /usr/local/bin).
		if real, err := filepath.EvalSymlinks(p); err == nil {
			p = real
		}
		if _, err := os.Stat(filepath.Join(filepath.Dir(p), "pg_ctl")); err == nil {
			return filepath.Dir(p), nil
		}
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		dir := strings.TrimSpace(string(out))
		if _, err := os.Stat(filepath.Join(dir, "initdb")); err == nil {
			return dir, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) > version(dirs[j]) })
	for _, dir := range dirs {
		if _, err := os.Stat(filepath.Join(dir, "initdb")); err == nil {
			return dir, nil
		}
	}
	return "", errors.New(Install)
}

func version(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pgtest: find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

var unsafeName = regexp.MustCompile(`[^a-z0-9_]+`)

// DB creates an empty database for t and returns a connection string for it.
// When t ends, it fails t if any advisory lock is left in that database (by
// any session, pooled ones included), then drops it. Register it before
// creating pools on it, so that the check runs while they are still open.
func (s *Server) DB(t testing.TB) string {
	t.Helper()
	name := unsafeName.ReplaceAllString(strings.ToLower(t.Name()), "_")
	if len(name) > 40 {
		name = name[len(name)-40:]
	}
	name = fmt.Sprintf("t%d_%s", s.dbSeq.Add(1), name)
	ctx := context.Background()
	if _, err := s.Admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	t.Cleanup(func() {
		if left := s.waitNoLocks(name, 3*time.Second); len(left) > 0 {
			t.Errorf("pgtest: advisory locks left in %s after the test:\n%s", name, strings.Join(left, "\n"))
		}
		if _, err := s.Admin.Exec(ctx, "DROP DATABASE "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			t.Errorf("pgtest: drop database: %v", err)
		}
	})
	cfg, err := pgx.ParseConfig(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Host, cfg.Port, name)
}

// waitNoLocks waits until database name has no advisory locks, and returns
// the ones still there after d.
func (s *Server) waitNoLocks(name string, d time.Duration) []string {
	end := time.Now().Add(d)
	for {
		left, err := s.AdvisoryLocks(context.Background(), name)
		if err != nil {
			return []string{err.Error()}
		}
		if len(left) == 0 || time.Now().After(end) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// AdvisoryLocks lists the advisory locks, held or awaited, in database name,
// one line each.
func (s *Server) AdvisoryLocks(ctx context.Context, name string) ([]string, error) {
	rows, err := s.Admin.Query(ctx, `
		SELECT format('pid %s %s %s key (%s,%s,%s)', l.pid, l.mode,
		              CASE WHEN l.granted THEN 'held' ELSE 'waiting' END,
		              l.classid, l.objid, l.objsubid)
		FROM pg_locks l JOIN pg_database d ON d.oid = l.database
		WHERE l.locktype = 'advisory' AND d.datname = $1
		ORDER BY l.pid`, name)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// Main runs a test binary's tests against a server it starts (or the one
// PGLOCKS_TEST_DATABASE_URL names), and stops it afterwards. If no server can
// be had, the run fails and says how to get one. After the tests it fails the
// run if goroutines are left behind (check is called with the exit code and
// returns the new one; nil skips it).
//
// On SIGINT, SIGTERM, SIGHUP, or a write to a broken standard output (go
// test -v | head), it stops every throwaway server and PgBouncer the tests
// started and removes their files before the signal ends the run (see
// StopOnSignal). What a run killed outright (SIGKILL, a test's panic, go
// test's -timeout) leaves behind, the next run's first server removes.
//
// With PGLOCKS_TEST_SERVER=none it starts no server: for the tests that need
// none (the fake-server tests: go test -run Fake .), on a machine without
// PostgreSQL. A test that needs the server then panics on the nil server.
func Main(m *testing.M, srv **Server, check func(code int) int) {
	unwatch := StopOnSignal()
	var code int
	if os.Getenv("PGLOCKS_TEST_SERVER") == "none" {
		code = m.Run()
	} else {
		s, err := Start()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		*srv = s
		code = m.Run()
		s.Stop()
	}
	unwatch()
	if check != nil {
		code = check(code)
	}
	os.Exit(code)
}
