package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

var (
	srv *pgtest.Server
	bin string // the pglocks binary under test
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "pglocks-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "pglocks")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building pglocks: %v\n%s", err, out)
		os.Exit(1)
	}
	pgtest.Main(m, &srv, func(code int) int {
		os.RemoveAll(dir)
		return pgtest.CheckLeaks(code)
	})
}

// proc is a running pglocks.
type proc struct {
	cmd            *exec.Cmd
	stdout, stderr pgtest.Buffer
	done           chan struct{}
	code           int
}

// start starts pglocks with args against dsn.
func start(t *testing.T, dsn string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(bin, args...), done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), "DATABASE_URL="+dsn)
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = p.cmd.Wait()
		p.code = p.cmd.ProcessState.ExitCode()
		if ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			p.code = 128 + int(ws.Signal())
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

// wait waits for p to exit and returns its status.
func (p *proc) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("pglocks did not exit; stderr:\n%s", p.stderr.String())
	}
	return p.code
}

// pglocksRun runs pglocks to the end.
func pglocksRun(t *testing.T, dsn string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	p := start(t, dsn, args...)
	code = p.wait(t)
	return p.stdout.String(), p.stderr.String(), code
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(20 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("gave up waiting for %s", what)
		}
	}
}

// lockRow is one advisory lock in a test database.
type lockRow struct {
	pid     int
	key     int64
	granted bool
}

func locks(t *testing.T, db string) []lockRow {
	t.Helper()
	rows, err := srv.Admin.Query(context.Background(), `
		SELECT l.pid, (l.classid::bigint << 32) | l.objid::bigint, l.granted
		FROM pg_locks l JOIN pg_database d ON d.oid = l.database
		WHERE l.locktype = 'advisory' AND d.datname = $1`, db)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (x lockRow, err error) {
		err = r.Scan(&x.pid, &x.key, &x.granted)
		return x, err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func dbName(dsn string) string { return dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")] }

func holderPID(t *testing.T, db string, key pglocks.Key) int {
	id, _ := key.Int64()
	for _, r := range locks(t, db) {
		if r.key == id && r.granted {
			return r.pid
		}
	}
	return 0
}

func waiting(t *testing.T, db string) bool {
	for _, r := range locks(t, db) {
		if !r.granted {
			return true
		}
	}
	return false
}

// testDB returns a fresh database and a check, run at cleanup, that nothing
// is held or awaited in it.
func testDB(t *testing.T) (dsn, db string) {
	dsn = srv.DB(t)
	return dsn, dbName(dsn)
}

// holdSQL holds NAME's lock from a plain session, as psql would.
func holdSQL(t *testing.T, dsn, name string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), dsn+"&application_name=holder-app")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	if _, err := c.Exec(context.Background(), "SELECT pg_advisory_lock(hashtextextended($1, 0))", name); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRunContending(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	out := filepath.Join(t.TempDir(), "order")
	first := start(t, dsn, "run", "job", "--", "sh", "-c", "echo start1 >> "+out+"; sleep 2; echo end1 >> "+out)
	waitFor(t, "the first to hold the lock", func() bool { return holderPID(t, db, pglocks.Name("job")) != 0 })
	second := start(t, dsn, "run", "job", "--", "sh", "-c", "echo start2 >> "+out)
	want := fmt.Sprintf("[%d]", first.cmd.Process.Pid)
	waitFor(t, "the second to name the first", func() bool {
		s := second.stderr.String()
		return strings.Contains(s, "waiting for job, held by pid") && strings.Contains(s, "pglocks run job on") && strings.Contains(s, want)
	})
	if !waiting(t, db) {
		t.Error("the second does not wait in the server")
	}
	if c := first.wait(t); c != 0 {
		t.Fatalf("first: exit %d\n%s", c, first.stderr.String())
	}
	if c := second.wait(t); c != 0 {
		t.Fatalf("second: exit %d\n%s", c, second.stderr.String())
	}
	got, _ := os.ReadFile(out)
	if string(got) != "start1\nend1\nstart2\n" {
		t.Fatalf("order of work: %q", got)
	}
	t.Logf("second's stderr: %s", second.stderr.String())
}

func TestRunConflictCodes(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	holdSQL(t, dsn, "job")
	for _, tt := range []struct {
		args []string
		code int
	}{
		{[]string{"run", "-n", "job", "--", "true"}, 1},
		{[]string{"run", "--no-wait", "-E", "7", "job", "--", "true"}, 7},
		{[]string{"run", "-w", "300ms", "job", "--", "true"}, 1},
		{[]string{"run", "--timeout", "300ms", "--conflict-exit-code", "9", "job", "--", "true"}, 9},
	} {
		_, stderr, code := pglocksRun(t, dsn, tt.args...)
		if code != tt.code {
			t.Errorf("%v: exit %d, want %d\n%s", tt.args, code, tt.code, stderr)
		}
		if !strings.Contains(stderr, "job is held by pid") || !strings.Contains(stderr, "holder-app") {
			t.Errorf("%v: stderr does not name the holder: %q", tt.args, stderr)
		}
		// pglocks exits only after the server dropped its wait.
		if waiting(t, db) {
			t.Errorf("%v: a wait is still queued after pglocks exited", tt.args)
		}
	}
}

func TestRunExitStatus(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	for script, want := range map[string]int{"exit 0": 0, "exit 42": 42, "kill -TERM $$": 143} {
		if _, stderr, code := pglocksRun(t, dsn, "run", "job", "--", "sh", "-c", script); code != want {
			t.Errorf("%q: exit %d, want %d\n%s", script, code, want, stderr)
		}
	}
}

func TestRunForwardsSignals(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP} {
		p := start(t, dsn, "run", "job", "--", "sh", "-c",
			`trap 'echo got-signal; exit 3' TERM INT HUP; echo ready; while :; do sleep 0.05; done`)
		waitFor(t, "the child to start", func() bool { return strings.Contains(p.stdout.String(), "ready") })
		_ = p.cmd.Process.Signal(sig)
		if code := p.wait(t); code != 3 {
			t.Errorf("%v: exit %d, want the child's 3\n%s", sig, code, p.stderr.String())
		}
		if !strings.Contains(p.stdout.String(), "got-signal") {
			t.Errorf("%v: the child did not get it: %q", sig, p.stdout.String())
		}
		if len(locks(t, db)) != 0 {
			t.Errorf("%v: the lock is still held after pglocks exited", sig)
		}
	}
}

func TestRunLockLost(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	for name, script := range map[string]string{
		"child stops on SIGTERM": `trap 'echo got-TERM; exit 0' TERM; echo ready; while :; do sleep 0.05; done`,
		"child ignores SIGTERM":  `trap '' TERM; echo ready; while :; do sleep 0.05; done`,
	} {
		p := start(t, dsn, "run", "--kill-after", "500ms", "job", "--", "sh", "-c", script)
		waitFor(t, "the child to start", func() bool { return strings.Contains(p.stdout.String(), "ready") })
		pid := holderPID(t, db, pglocks.Name("job"))
		if _, err := srv.Admin.Exec(t.Context(), "SELECT pg_terminate_backend($1)", pid); err != nil {
			t.Fatal(err)
		}
		if code := p.wait(t); code != 4 {
			t.Errorf("%s: exit %d, want 4\n%s", name, code, p.stderr.String())
		}
		if !strings.Contains(p.stderr.String(), "lock of job lost while sh ran: ") || strings.Count(p.stderr.String(), "lost") != 1 {
			t.Errorf("%s: stderr does not say so: %q", name, p.stderr.String())
		}
		if strings.Contains(script, "''") && !strings.Contains(p.stderr.String(), "sending SIGKILL") {
			t.Errorf("%s: no SIGKILL: %q", name, p.stderr.String())
		}
	}
}

func TestLs(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	holder := holdSQL(t, dsn, "job")
	var holderPid int
	if err := holder.QueryRow(t.Context(), "SELECT pg_backend_pid()").Scan(&holderPid); err != nil {
		t.Fatal(err)
	}
	if _, err := holder.Exec(t.Context(), "SELECT pg_advisory_lock(1, 2)"); err != nil {
		t.Fatal(err)
	}
	waiter, err := pgx.Connect(t.Context(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer waiter.Close(context.Background())
	granted := make(chan struct{})
	go func() {
		defer close(granted)
		_, _ = waiter.Exec(context.Background(), "SELECT pg_advisory_lock(hashtextextended('job', 0))")
	}()
	_, db := dsn, dbName(dsn)
	waitFor(t, "the waiter", func() bool { return waiting(t, db) })

	stdout, stderr, code := pglocksRun(t, dsn, "ls", "--name", "job")
	if code != 0 {
		t.Fatalf("ls: exit %d: %s", code, stderr)
	}
	for _, want := range []string{"KEY", "job", "held", "waiting", "holder-app", "1,2  ", fmt.Sprint(holderPid)} {
		if !strings.Contains(stdout, want) {
			t.Errorf("ls output lacks %q:\n%s", want, stdout)
		}
	}
	stdout, _, code = pglocksRun(t, dsn, "ls", "--json", "--name", "job")
	if code != 0 {
		t.Fatal(code)
	}
	var got []lockInfo
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("--json: %v\n%s", err, stdout)
	}
	jobID, _ := pglocks.Name("job").Int64()
	var held, wait, pair bool
	for _, l := range got {
		switch {
		case l.Bigint != nil && *l.Bigint == jobID && l.Granted:
			held = l.PID == holderPid && l.Name == "job" && l.Application == "holder-app" && l.Mode == "exclusive"
		case l.Bigint != nil && *l.Bigint == jobID:
			wait = len(l.BlockedBy) == 1 && l.BlockedBy[0] == holderPid
		case l.Pair != nil:
			pair = *l.Pair == [2]int32{1, 2} && l.Key == "1,2"
		}
	}
	if !held || !wait || !pair {
		t.Errorf("--json: held=%v waiting=%v pair=%v in %+v", held, wait, pair, got)
	}
	// --watch prints again until interrupted.
	w := start(t, dsn, "ls", "--watch", "100ms")
	waitFor(t, "a second table", func() bool { return strings.Count(w.stdout.String(), "KEY") >= 2 })
	_ = w.cmd.Process.Signal(syscall.SIGINT)
	if code := w.wait(t); code != 0 {
		t.Errorf("ls --watch: exit %d after SIGINT", code)
	}

	// Let the waiter through before the database goes.
	if _, err := holder.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	<-granted
	if _, err := waiter.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
}

func TestKey(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		args []string
		want pglocks.Key
		sql  string
	}{
		{[]string{"key", "some lock"}, pglocks.Name("some lock"), "hashtextextended('some lock', 0)"},
		{[]string{"key", "-k", "crc32", "some lock"}, pglocks.NameCRC32("some lock"), "pg_advisory_lock(-205618829)"},
		{[]string{"key", "-k", "id", "42"}, pglocks.ID(42), "pg_advisory_lock(42)"},
		{[]string{"key", "--key", "pair", "1,-2"}, pglocks.Pair(1, -2), "pg_advisory_lock(1, -2)"},
		{[]string{"key", "-k", "node", "some-lock-name"}, pglocks.Pair(1253560211, -1237456625), "pg_advisory_lock(1253560211, -1237456625)"},
		{[]string{"key", "-k", "rails", "foo"}, pglocks.Pair(208889121, 0), "pg_advisory_lock(208889121, 0)"},
		{[]string{"key", "-k", "django-pglocks", "some lock"}, pglocks.NameCRC32("some lock"), "pg_advisory_lock(-205618829)"},
		{[]string{"key", "-k", "django-pglock", "some lock"}, pglocks.ID(-1292339565357005894), "pg_advisory_lock(-1292339565357005894)"},
		{[]string{"key", "-k", "dotnet", "some lock"}, pglocks.Pair(-406884780, 456647638), "pg_advisory_lock(-406884780, 456647638)"},
		{[]string{"key", "-k", "dotnet", "nightly-report"}, pglocks.ID(7635146791061737145), "pg_advisory_lock(7635146791061737145)"},
		{[]string{"key", "-k", "dotnet", "ffffffffffffffff"}, pglocks.ID(-1), "pg_advisory_lock(-1)"},
		{[]string{"key", "-k", "dotnet", "00000001,ffffffff"}, pglocks.Pair(1, -1), "pg_advisory_lock(1, -1)"},
	} {
		stdout, stderr, code := pglocksRun(t, "", tt.args...)
		if code != 0 || !strings.Contains(stdout, tt.sql) {
			t.Errorf("%v: exit %d, %q %q", tt.args, code, stdout, stderr)
		}
		stdout, _, _ = pglocksRun(t, "", append([]string{"key", "--json"}, tt.args[1:]...)...)
		var ki keyInfo
		if err := json.Unmarshal([]byte(stdout), &ki); err != nil {
			t.Fatalf("%v --json: %v", tt.args, err)
		}
		var got pglocks.Key
		if ki.Bigint != nil {
			got = pglocks.ID(*ki.Bigint)
		} else if ki.Pair != nil {
			got = pglocks.Pair(ki.Pair[0], ki.Pair[1])
		}
		if got != tt.want {
			t.Errorf("%v --json: key %v, want %v", tt.args, got, tt.want)
		}
	}
}

func TestKeyRailsPrefix(t *testing.T) {
	t.Setenv("WITH_ADVISORY_LOCK_PREFIX", "42abc") // Ruby's to_i reads 42
	stdout, stderr, code := pglocksRun(t, "", "key", "-k", "rails", "foo")
	if code != 0 || !strings.Contains(stdout, "pg_advisory_lock(208889121, 42)") {
		t.Fatalf("exit %d: %q %q", code, stdout, stderr)
	}
}

func TestBadInput(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	for _, tt := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"unknown command", []string{"frob"}, 2, "unknown command"},
		{"unknown flag", []string{"run", "--frob", "job", "--", "true"}, 2, "unknown flag --frob"},
		{"unknown short flag", []string{"run", "-x", "job", "--", "true"}, 2, "unknown flag -x"},
		{"not a group", []string{"run", "-nx", "job", "--", "true"}, 2, "unknown flag -nx"},
		{"duration without unit", []string{"run", "--timeout", "1", "job", "--", "true"}, 2, `--timeout "1": want a duration with its unit, as 500ms, 30s`},
		{"duration missing", []string{"run", "-w"}, 2, "-w needs a value: a duration"},
		{"number that is not", []string{"run", "--slots", "two", "job", "--", "true"}, 2, `--slots "two": want a whole number`},
		{"bool with a value", []string{"run", "-n=maybe", "job", "--", "true"}, 2, `-n "maybe": want true or false`},
		{"version with an argument", []string{"version", "x"}, 2, "takes no arguments"},
		{"missing --", []string{"run", "job", "true"}, 2, "missing --"},
		{"missing COMMAND", []string{"run", "job", "--"}, 2, "missing COMMAND"},
		{"missing NAME", []string{"run"}, 2, "missing NAME"},
		{"missing NAME before --", []string{"run", "--", "true"}, 2, "missing NAME before --"},
		{"elect missing NAME before --", []string{"elect", "-q", "--", "true"}, 2, "missing NAME before --"},
		{"empty NAME", []string{"run", "", "--", "true"}, 2, "empty NAME"},
		{"elect empty NAME", []string{"elect", "", "--", "true"}, 2, "empty NAME"},
		{"id that does not parse", []string{"run", "-k", "id", "x1", "--", "true"}, 2, "not an int64"},
		{"pair that does not parse", []string{"run", "-k", "pair", "1", "--", "true"}, 2, "not two int32"},
		{"unknown scheme", []string{"run", "-k", "rot13", "job", "--", "true"}, 2, "unknown key scheme"},
		{"run -k all", []string{"run", "-k", "all", "job", "--", "true"}, 2, "-k all is only for ls and key"},
		{"elect -k all", []string{"elect", "--key", "all", "job", "--", "true"}, 2, "-k all is only for ls and key"},
		{"leader -k all", []string{"leader", "-k", "all", "job"}, 2, "-k all is only for ls and key"},
		{"DSN that does not parse", []string{"run", "-d", "postgres://a b@:x", "job", "--", "true"}, 2, "bad connection string"},
		{"server down", []string{"run", "-d", "postgres://postgres@127.0.0.1:1/postgres?connect_timeout=2", "job", "--", "true"}, 3, "cannot connect"},
		{"command not found", []string{"run", "job", "--", "pglocks-no-such-command"}, 127, "command not found"},
		{"path not found", []string{"run", "job", "--", "/no/such/command"}, 127, "/no/such/command: no such file or directory"},
		{"command not executable", []string{"run", "job", "--", "/etc/passwd"}, 126, "permission denied"},
		{"command a directory", []string{"run", "job", "--", "/tmp"}, 126, "is a directory"},
		{"elect command not executable", []string{"elect", "job", "--", "/etc/passwd"}, 126, "permission denied"},
		{"flag after NAME", []string{"run", "job", "-n", "--", "true"}, 2, "flag -n after NAME"},
		{"elect flag after NAME", []string{"elect", "job", "--restart", "--", "true"}, 2, "flag --restart after NAME"},
		{"ls with an argument", []string{"ls", "x"}, 2, "unexpected argument"},
		{"key without NAME", []string{"key"}, 2, "want exactly one NAME"},
	} {
		_, stderr, code := pglocksRun(t, dsn, tt.args...)
		lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
		if code != tt.code || !strings.Contains(stderr, tt.msg) || (tt.code != 2 || tt.name != "unknown command") && len(lines) != 1 {
			t.Errorf("%s: exit %d, stderr %q; want exit %d and one line with %q", tt.name, code, stderr, tt.code, tt.msg)
		}
		// Each error is said once (pgx reports each connection attempt).
		if tt.code == exitDatabase && strings.Count(stderr, "connection refused") != 1 {
			t.Errorf("%s: the error is said %d times: %q", tt.name, strings.Count(stderr, "connection refused"), stderr)
		}
		if l := locks(t, db); len(l) != 0 {
			t.Errorf("%s: left %v", tt.name, l)
		}
	}
}

// pglocks run --slots 2: three commands, at most two at once; -n fails
// while both slots are held; ls --name shows the slot holders under NAME.
func TestRunSlots(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	dir := t.TempDir()
	log := filepath.Join(dir, "log")
	script := `echo "start $$" >> ` + log + `; echo ready; sleep 1; echo "end $$" >> ` + log
	var ps []*proc
	for range 3 {
		ps = append(ps, start(t, dsn, "run", "--slots", "2", "job", "--", "sh", "-c", script))
	}
	waitFor(t, "two holders", func() bool {
		n := 0
		for _, p := range ps {
			if strings.Contains(p.stdout.String(), "ready") {
				n++
			}
		}
		return n == 2
	})
	_, stderr, code := pglocksRun(t, dsn, "run", "-n", "--slots", "2", "job", "--", "true")
	if code != exitConflict || !strings.Contains(stderr, "job (2 slots) is held by pid") {
		t.Errorf("-n with both slots held: exit %d: %s", code, stderr)
	}
	// Two slots held; the third waits multiplexed, not in the server's
	// queue.
	stdout, _, code := pglocksRun(t, dsn, "ls", "--name", "job")
	if code != 0 || strings.Count(stdout, "job[slot ") != 2 || strings.Count(stdout, "held") != 2 {
		t.Errorf("ls --name job: exit %d:\n%s", code, stdout)
	}
	for _, p := range ps {
		if code := p.wait(t); code != 0 {
			t.Errorf("exit %d: %s", code, p.stderr.String())
		}
	}
	b, _ := os.ReadFile(log)
	running, most := 0, 0
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if strings.HasPrefix(line, "start") {
			running++
		} else {
			running--
		}
		most = max(most, running)
	}
	if most != 2 || strings.Count(string(b), "start") != 3 {
		t.Errorf("at most %d ran at once (want 2):\n%s", most, b)
	}
	if l := locks(t, db); len(l) != 0 {
		t.Errorf("left: %v", l)
	}
}

// pglocks run --min-hold keeps the lock after COMMAND exits, until the time
// is up, then exits with COMMAND's status: the cron job of the README runs
// once per window although the replicas' clocks differ.
func TestRunMinHold(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	began := time.Now()
	first := start(t, dsn, "run", "-n", "--min-hold", "2s", "report", "--", "sh", "-c", "exit 3")
	waitFor(t, "the first to hold", func() bool { return holderPID(t, db, pglocks.Name("report")) != 0 })
	// A replica whose cron fires a moment later finds it held, though the
	// first one's job is long done.
	time.Sleep(300 * time.Millisecond)
	_, stderr, code := pglocksRun(t, dsn, "run", "-n", "-E", "0", "report", "--", "sh", "-c", "exit 9")
	if code != 0 || !strings.Contains(stderr, "not acquired") {
		t.Errorf("the late replica: exit %d, want -E's 0 (not acquired): %s", code, stderr)
	}
	if code := first.wait(t); code != 3 {
		t.Errorf("the first: exit %d, want its command's 3: %s", code, first.stderr.String())
	}
	if d := time.Since(began); d < 2*time.Second {
		t.Errorf("the first exited after %v, before its --min-hold of 2s", d)
	}
	if _, _, code := pglocksRun(t, dsn, "run", "-n", "report", "--", "true"); code != 0 {
		t.Errorf("after the minimum hold: exit %d", code)
	}
}

// pglocks key --slots prints the slot keys, as Key.Slot computes them.
func TestKeySlots(t *testing.T) {
	t.Parallel()
	stdout, stderr, code := pglocksRun(t, "", "key", "--json", "--slots", "3", "job")
	var ki keyInfo
	if err := json.Unmarshal([]byte(stdout), &ki); err != nil || code != 0 {
		t.Fatalf("exit %d, %v: %q %q", code, err, stdout, stderr)
	}
	if len(ki.Slots) != 3 {
		t.Fatalf("%d slots", len(ki.Slots))
	}
	for i, s := range ki.Slots {
		if pglocks.Pair(s.Pair[0], s.Pair[1]) != pglocks.Name("job").Slot(i) || !strings.Contains(s.SQL, fmt.Sprintf("'pglocks:slot:%s:%d'", pglocks.Name("job"), i)) {
			t.Errorf("slot %d: %+v", i, s)
		}
	}
}

// The README's cron line, run as written with its command replaced (and its
// minimum hold shortened), prints nothing when it wins and when it loses:
// cron mails whenever a job prints anything.
func TestREADMECronLineIsQuiet(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var line string
	for _, l := range strings.Split(string(readme), "\n") {
		if strings.HasPrefix(l, "*/5 ") && strings.Contains(l, "pglocks run") {
			line = l
		}
	}
	if line == "" {
		t.Fatal("no cron line in the README")
	}
	args := strings.Fields(line[strings.Index(line, "pglocks run")+len("pglocks "):])
	for i, a := range args {
		switch {
		case a == "/usr/local/bin/report":
			args[i] = "true"
		case i > 0 && args[i-1] == "--min-hold":
			args[i] = "300ms"
		}
	}
	dsn, _ := testDB(t)
	for _, outcome := range []string{"wins", "loses"} {
		if outcome == "loses" {
			holdSQL(t, dsn, "nightly-report")
		}
		stdout, stderr, code := pglocksRun(t, dsn, args...)
		if code != 0 || stdout != "" || stderr != "" {
			t.Errorf("the cron line %s: exit %d, printed %q %q", outcome, code, stdout, stderr)
		}
	}
}

// JSON output keeps characters as they are ("a<b>&c", not "\u003c"), for
// people and jq alike.
func TestJSONNotHTMLEscaped(t *testing.T) {
	t.Parallel()
	stdout, stderr, code := pglocksRun(t, "", "key", "--json", "a<b>&c")
	if code != 0 || !strings.Contains(stdout, `"a<b>&c"`) || strings.Contains(stdout, `\u00`) {
		t.Fatalf("key --json: exit %d: %s %s", code, stdout, stderr)
	}
}
