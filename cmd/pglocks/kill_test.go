package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// lockKey takes key on c, and waits for it.
func lockKey(t *testing.T, c *pgx.Conn, key pglocks.Key) {
	t.Helper()
	var err error
	if id, ok := key.Int64(); ok {
		_, err = c.Exec(t.Context(), "SELECT pg_advisory_lock($1::int8)", id)
	} else {
		a, b, _ := key.Int32s()
		_, err = c.Exec(t.Context(), "SELECT pg_advisory_lock($1::int4, $2::int4)", a, b)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// alive tells whether the server has a session with pid.
func alive(t *testing.T, s *pgtest.Server, pid int) bool {
	t.Helper()
	var ok bool
	if err := s.Admin.QueryRow(context.Background(), "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", pid).Scan(&ok); err != nil {
		t.Fatal(err)
	}
	return ok
}

// pidsIn are the pids of the advisory locks in db, held or awaited.
func pidsIn(t *testing.T, db string) []int {
	t.Helper()
	var out []int
	for _, r := range locks(t, db) {
		out = append(out, r.pid)
	}
	return out
}

// tryTake tells whether a new session can take key at once (and lets it
// go again).
func tryTake(t *testing.T, dsn string, key pglocks.Key) bool {
	t.Helper()
	c, _ := session(t, dsn, "taker")
	var ok bool
	if err := c.QueryRow(t.Context(), "SELECT pg_try_advisory_lock($1::int8)", mustID(key)).Scan(&ok); err != nil {
		t.Fatal(err)
	}
	if ok {
		if _, err := c.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
			t.Fatal(err)
		}
	}
	return ok
}

// pglocks kill NAME (exit 0) lists the holder, with every advisory lock of
// its session; --dry-run ends nothing; --yes ends the session, after which
// nothing is left in pg_locks and another session takes NAME at once.
func TestKill(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	holder, pid := session(t, dsn, "holder-app")
	lockKey(t, holder, pglocks.Name("job"))
	lockKey(t, holder, pglocks.ID(77))
	p := fmt.Sprint(pid)

	stdout, stderr, code := pglocksRun(t, dsn, "kill", "--dry-run", "job")
	if code != 0 || stderr != "" {
		t.Fatalf("kill --dry-run: exit %d, stderr %q", code, stderr)
	}
	_, ok1 := lineWith(stdout, "job", "exclusive", "held", p, "holder-app")
	_, ok2 := lineWith(stdout, "77", "held", p)
	_, ok3 := lineWith(stdout, "would end session pid "+p+" (holder-app from ")
	if !ok1 || !ok2 || !ok3 {
		t.Errorf("kill --dry-run: want the holder's two locks and what it would end:\n%s", stdout)
	}
	if got := pidsIn(t, db); len(got) != 2 || !alive(t, srv, pid) {
		t.Fatalf("after --dry-run: locks of %v, holder alive %v; want both of the holder's, alive", got, alive(t, srv, pid))
	}
	if _, err := holder.Exec(t.Context(), "SELECT 1"); err != nil {
		t.Fatalf("the holder after --dry-run: %v", err)
	}

	stdout, stderr, code = pglocksRun(t, dsn, "kill", "--yes", "job")
	if code != 0 || stderr != "" {
		t.Fatalf("kill --yes: exit %d, stderr %q\n%s", code, stderr, stdout)
	}
	if _, ok := lineWith(stdout, "ended pid "+p+" (holder-app"); !ok || !strings.Contains(stdout, "now no session holds or waits for job") {
		t.Errorf("kill --yes:\n%s", stdout)
	}
	if got := locks(t, db); len(got) != 0 {
		t.Errorf("after kill: pg_locks still has %v", got)
	}
	if alive(t, srv, pid) {
		t.Errorf("pid %d is still there", pid)
	}
	if !tryTake(t, dsn, pglocks.Name("job")) {
		t.Error("another session cannot take job after the kill")
	}
	if _, err := holder.Exec(t.Context(), "SELECT 1"); err == nil {
		t.Error("the killed holder's connection still works")
	}
	t.Logf("kill --yes job:\n%s", stdout)
}

// Exit 1 when there is nothing to end: nothing holds NAME, or nothing
// waits for it (--waiters), with --dry-run too; the holder is left alone.
func TestKillNothingHeld(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	for _, args := range [][]string{{"--yes", "job"}, {"--dry-run", "job"}, {"--yes", "-k", "id", "42"}} {
		stdout, stderr, code := pglocksRun(t, dsn, append([]string{"kill"}, args...)...)
		if code != exitNoneEnded || stderr != "" || !strings.HasPrefix(stdout, "no session holds ") {
			t.Errorf("kill %v with nothing held: exit %d, stdout %q, stderr %q", args, code, stdout, stderr)
		}
	}
	holder, pid := session(t, dsn, "holder")
	lockKey(t, holder, pglocks.Name("job"))
	stdout, stderr, code := pglocksRun(t, dsn, "kill", "--yes", "--waiters", "job")
	if code != exitNoneEnded || stdout != "no session waits for job\n" {
		t.Errorf("kill --waiters with no waiter: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	if !alive(t, srv, pid) {
		t.Error("kill --waiters ended the holder")
	}
	if _, err := holder.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
}

// Exit 2 for usage errors, each one line; with no terminal to ask on and
// no --yes, kill refuses rather than read stdin, and ends nothing.
func TestKillUsage(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	holder, pid := session(t, dsn, "holder")
	lockKey(t, holder, pglocks.Name("job"))
	for _, tt := range []struct {
		name string
		args []string
		msg  string
	}{
		{"no terminal, no --yes", []string{"job"}, "no terminal to ask on: pass --yes"},
		{"no NAME", []string{"--yes"}, "missing NAME (or --pid)"},
		{"two NAMEs", []string{"--yes", "job", "other"}, "want one NAME, got 2"},
		{"flag after NAME", []string{"job", "--yes"}, `flag --yes after NAME "job"`},
		{"empty NAME", []string{"--yes", ""}, "empty NAME"},
		{"--slots without NAME", []string{"--yes", "--pid", fmt.Sprint(pid), "--slots", "2"}, "--slots needs NAME"},
		{"--slots out of range", []string{"--yes", "--slots", "-1", "job"}, "--slots must be 1..1024"},
		{"--pid 0", []string{"--yes", "--pid", "0"}, "pid 0 is a prepared transaction"},
		{"--pid not a number", []string{"--yes", "--pid", "x"}, `--pid "x": want a session's pid`},
		{"-k all", []string{"--yes", "-k", "all", "job"}, "-k all is only for ls and key"},
		{"unknown flag", []string{"--force", "job"}, "unknown flag --force"},
	} {
		stdout, stderr, code := pglocksRun(t, dsn, append([]string{"kill"}, tt.args...)...)
		lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
		if code != exitUsage || !strings.Contains(stderr, tt.msg) || len(lines) != 1 || stdout != "" {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want exit 2 and one line with %q", tt.name, code, stdout, stderr, tt.msg)
		}
	}
	if !alive(t, srv, pid) || holderPID(t, dbName(dsn), pglocks.Name("job")) != pid {
		t.Error("a usage error ended the holder")
	}
	if _, err := holder.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}

	help, stderr, code := pglocksRun(t, dsn, "kill", "--help")
	for _, want := range []string{"Usage: pglocks kill [flags] NAME", "ROLLBACK PREPARED", "pg_signal_backend",
		"Exit status: 0", "1 none was", "2 usage", "3 database", "5 not allowed",
		"  --pid PID\n", "  -y, --yes\n", "  --slots N\n", "  --waiters\n", "  --dry-run\n", "  -k, --key SCHEME\n", "  -d, --dsn DSN\n"} {
		if code != 0 || stderr != "" || !strings.Contains(help, want) {
			t.Errorf("kill --help: exit %d, stderr %q, no %q in:\n%s", code, stderr, want, help)
		}
	}
	if strings.Contains(help, "all (") {
		t.Errorf("kill --help: -k should not list all:\n%s", help)
	}
	if usage, _, _ := pglocksRun(t, dsn, "--help"); !strings.Contains(usage, "pglocks kill [flags] NAME | --pid PID") {
		t.Errorf("usage without kill:\n%s", usage)
	}
}

// Exit 3 when the database cannot be reached.
func TestKillDatabase(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	_, stderr, code := pglocksRun(t, dsn, "kill", "--yes", "-d", "postgres://postgres@127.0.0.1:1/postgres?connect_timeout=2", "job")
	if code != exitDatabase || !strings.Contains(stderr, "cannot connect") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("server down: exit %d, stderr %q", code, stderr)
	}
}

// loginRole creates a plain login role named prefix_DB and returns dsn as
// that role.
func loginRole(t *testing.T, dsn, db, prefix string) (role, roleDSN string) {
	t.Helper()
	role = prefix + "_" + db
	if _, err := srv.Admin.Exec(context.Background(), "CREATE ROLE "+pgx.Identifier{role}.Sanitize()+" LOGIN"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = srv.Admin.Exec(context.Background(), "DROP ROLE "+pgx.Identifier{role}.Sanitize()) })
	return role, strings.Replace(dsn, "postgres://postgres@", "postgres://"+role+"@", 1)
}

// Exit 5 when the role may not end another role's session: it says so, and
// what to grant; the holder is left alone. Granted pg_signal_backend, the
// same role ends it.
func TestKillNotAllowed(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	_, holderDSN := loginRole(t, dsn, db, "kh")
	killer, killerDSN := loginRole(t, dsn, db, "kk")
	holder, pid := session(t, holderDSN, "holder")
	lockKey(t, holder, pglocks.Name("job"))

	stdout, stderr, code := pglocksRun(t, killerDSN, "kill", "--yes", "job")
	if code != exitNotAllowed || !strings.Contains(stderr, "not allowed to end pid "+fmt.Sprint(pid)) ||
		!strings.Contains(stderr, `GRANT pg_signal_backend TO "`+killer+`";`) || strings.Count(stderr, "\n") != 1 {
		t.Errorf("kill as %s: exit %d, stderr %q", killer, code, stderr)
	}
	if _, ok := lineWith(stdout, "job", "held", fmt.Sprint(pid)); !ok {
		t.Errorf("kill as %s: the holder is not still listed as holding job:\n%s", killer, stdout)
	}
	if !alive(t, srv, pid) || holderPID(t, db, pglocks.Name("job")) != pid {
		t.Fatal("the holder was ended, or lost job")
	}
	t.Logf("kill as %s: %s", killer, stderr)

	if _, err := srv.Admin.Exec(t.Context(), "GRANT pg_signal_backend TO "+pgx.Identifier{killer}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	if stdout, stderr, code := pglocksRun(t, killerDSN, "kill", "--yes", "job"); code != 0 || alive(t, srv, pid) {
		t.Errorf("kill with pg_signal_backend: exit %d: %s %s", code, stdout, stderr)
	}
}

// --waiters ends the sessions that wait for NAME in the server's queue,
// and leaves its holder alone.
func TestKillWaiters(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	holder, hp := session(t, dsn, "holder")
	lockKey(t, holder, pglocks.Name("job"))
	waiter, wp := session(t, dsn, "waiter")
	waited := make(chan error, 1)
	go func() {
		_, err := waiter.Exec(context.Background(), "SELECT pg_advisory_lock(hashtextextended('job', 0))")
		waited <- err
	}()
	waitFor(t, "the waiter to queue", func() bool { return waitsIn(t, db) == 1 })

	stdout, stderr, code := pglocksRun(t, dsn, "kill", "--yes", "--waiters", "job")
	if code != 0 || stderr != "" {
		t.Fatalf("kill --waiters: exit %d, stderr %q\n%s", code, stderr, stdout)
	}
	if _, ok := lineWith(stdout, "job", "waiting", fmt.Sprint(wp), "waiter", fmt.Sprint(hp)); !ok {
		t.Errorf("kill --waiters does not list the waiter, blocked by the holder:\n%s", stdout)
	}
	if _, ok := lineWith(stdout, fmt.Sprint(hp), "holder"); !ok || !strings.Contains(stdout, "ended pid "+fmt.Sprint(wp)) {
		t.Errorf("kill --waiters: the holder not shown afterwards, or the waiter not ended:\n%s", stdout)
	}
	if err := <-waited; err == nil {
		t.Error("the waiter got the lock: it was not ended")
	}
	if got := pidsIn(t, db); len(got) != 1 || got[0] != hp || !alive(t, srv, hp) {
		t.Errorf("after kill --waiters: locks of %v; want the holder's (%d) alone", got, hp)
	}
	if _, err := holder.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	t.Logf("kill --waiters job:\n%s", stdout)
}

// --slots N ends the holders of NAME's slots 0..N-1, and neither the holder
// of NAME itself nor that of slot N.
func TestKillSlots(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	key := pglocks.Name("pool")
	var pids []int
	var slot2 *pgx.Conn
	for i := range 3 {
		c, pid := session(t, dsn, fmt.Sprintf("slot-%d", i))
		lockKey(t, c, key.Slot(i))
		pids, slot2 = append(pids, pid), c
	}
	base, bp := session(t, dsn, "base")
	lockKey(t, base, key)

	stdout, stderr, code := pglocksRun(t, dsn, "kill", "--yes", "--slots", "2", "pool")
	if code != 0 || stderr != "" {
		t.Fatalf("kill --slots 2: exit %d, stderr %q\n%s", code, stderr, stdout)
	}
	for i, p := range pids[:2] {
		if _, ok := lineWith(stdout, fmt.Sprintf("pool[slot %d]", i), "held", fmt.Sprint(p)); !ok {
			t.Errorf("slot %d's holder %d not listed:\n%s", i, p, stdout)
		}
		if alive(t, srv, p) {
			t.Errorf("slot %d's holder %d is still there", i, p)
		}
	}
	if !strings.Contains(stdout, "now no session holds or waits for any of pool's 2 slots") {
		t.Errorf("kill --slots 2:\n%s", stdout)
	}
	got := pidsIn(t, db)
	if len(got) != 2 || !alive(t, srv, bp) || !alive(t, srv, pids[2]) || holderPID(t, db, key) != bp {
		t.Errorf("after kill --slots 2: locks of %v; want those of NAME's holder %d and slot 2's %d", got, bp, pids[2])
	}
	for _, c := range []*pgx.Conn{base, slot2} {
		if _, err := c.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("kill --slots 2 pool:\n%s", stdout)
}

// --pid ends a session only if it holds an advisory lock in this database
// (NAME's, with NAME; a wait, with --waiters): a session that holds none,
// one in another database, or another key is refused, with exit 1, and a
// refusal ends none of the pids given.
func TestKillPID(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	a, pa := session(t, dsn, "a")
	lockKey(t, a, pglocks.Name("job"))
	_, pb := session(t, dsn, "b") // holds nothing
	c, pc := session(t, dsn, "c")
	lockKey(t, c, pglocks.Name("other"))
	otherDSN := srv.DB(t)
	d, pd := session(t, otherDSN, "d") // in another database
	lockKey(t, d, pglocks.Name("job"))

	for _, tt := range []struct {
		name string
		args []string
		msg  string
	}{
		{"no lock", []string{"--pid", fmt.Sprint(pb)}, fmt.Sprintf("pid %d holds no advisory lock in this database: refusing", pb)},
		{"one of two", []string{"--pid", fmt.Sprintf("%d,%d", pa, pb)}, "ended none of the others either"},
		{"repeated", []string{"--pid", fmt.Sprint(pa), "--pid", fmt.Sprint(pb)}, "ended none of the others either"},
		{"another key", []string{"--pid", fmt.Sprint(pc), "job"}, fmt.Sprintf("pid %d does not hold job: refusing", pc)},
		{"another database", []string{"--pid", fmt.Sprint(pd)}, fmt.Sprintf("pid %d holds no advisory lock in this database", pd)},
		{"not a waiter", []string{"--waiters", "--pid", fmt.Sprint(pa)}, fmt.Sprintf("pid %d waits for no advisory lock in this database", pa)},
		{"no such session", []string{"--pid", "2147483647"}, "pid 2147483647 holds no advisory lock"},
	} {
		stdout, stderr, code := pglocksRun(t, dsn, append([]string{"kill", "--yes"}, tt.args...)...)
		if code != exitNoneEnded || !strings.Contains(stderr, tt.msg) || stdout != "" {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want exit 1 and %q", tt.name, code, stdout, stderr, tt.msg)
		}
	}
	for _, p := range []int{pa, pb, pc, pd} {
		if !alive(t, srv, p) {
			t.Fatalf("a refused kill ended pid %d", p)
		}
	}

	stdout, stderr, code := pglocksRun(t, dsn, "kill", "--yes", "--pid", fmt.Sprint(pa))
	if code != 0 || alive(t, srv, pa) || !strings.Contains(stdout, fmt.Sprintf("now pid %d has no advisory lock", pa)) {
		t.Errorf("kill --pid %d: exit %d, alive %v, stderr %q\n%s", pa, code, alive(t, srv, pa), stderr, stdout)
	}
	if got := pidsIn(t, db); len(got) != 1 || got[0] != pc {
		t.Errorf("after kill --pid: locks of %v; want c's alone", got)
	}
	for _, conn := range []*pgx.Conn{c, d} {
		if _, err := conn.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
			t.Fatal(err)
		}
	}
}

// A lock that a prepared transaction holds has no session to end: kill
// prints the exact ROLLBACK PREPARED that frees it (a gid with a quote
// in it quoted), runs nothing, and exits 1. The statement, run, frees it.
func TestKillPrepared(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := pgtest.Local(t, pgtest.Options{Settings: []string{"max_prepared_transactions=2"}})
	prep, err := pgx.Connect(ctx, s.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer prep.Close(ctx)
	for _, q := range []string{"BEGIN", "SELECT pg_advisory_xact_lock(4242)", "PREPARE TRANSACTION 'job o''clock'"} {
		if _, err := prep.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _, _ = s.Admin.Exec(ctx, "ROLLBACK PREPARED 'job o''clock'") })

	stdout, stderr, code := pglocksRun(t, s.URL, "kill", "--yes", "-k", "id", "4242")
	if code != exitNoneEnded || stderr != "" {
		t.Fatalf("kill: exit %d, stderr %q\n%s", code, stderr, stdout)
	}
	var stmt string
	for _, l := range strings.Split(stdout, "\n") {
		if s, ok := strings.CutPrefix(l, "  "); ok && strings.HasPrefix(s, "ROLLBACK PREPARED") {
			stmt = s
		}
	}
	if stmt != "ROLLBACK PREPARED 'job o''clock';" || !strings.Contains(stdout, "no session holds 4242, only a prepared transaction") {
		t.Errorf("kill:\n%s", stdout)
	}
	if _, ok := lineWith(stdout, "4242", "-", "held", " 0 ", "prepared transaction job o'clock"); !ok {
		t.Errorf("kill does not list the prepared transaction's lock:\n%s", stdout)
	}
	var n int
	if err := s.Admin.QueryRow(ctx, "SELECT count(*) FROM pg_prepared_xacts").Scan(&n); err != nil || n != 1 {
		t.Fatalf("pg_prepared_xacts: %d, %v; kill must leave the transaction alone", n, err)
	}
	if _, err := s.Admin.Exec(ctx, stmt); err != nil {
		t.Fatalf("%s: %v", stmt, err)
	}
	var free bool
	if err := s.Admin.QueryRow(ctx, "SELECT pg_try_advisory_lock(4242)").Scan(&free); err != nil || !free {
		t.Fatalf("4242 after %s: free %v, %v", stmt, free, err)
	}
	if _, err := s.Admin.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	t.Logf("kill -k id 4242:\n%s", stdout)
}

// terminate leaves alone a session that has exited or let go of the lock
// since it was listed (not an error), and its own session.
func TestKillGone(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var self int
	if err := pool.QueryRow(t.Context(), "SELECT pg_backend_pid()").Scan(&self); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(t.Context(), "SELECT pg_advisory_lock(5)"); err != nil {
		t.Fatal(err)
	}
	exited, pe := session(t, dsn, "exited")
	exited.Close(t.Context())
	waitFor(t, "the session to exit", func() bool { return !alive(t, srv, pe) })
	letGo, pl := session(t, dsn, "let-go")
	lockKey(t, letGo, pglocks.ID(6))
	if _, err := letGo.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		pid  int
		key  pglocks.Key
	}{{"exited", pe, pglocks.ID(5)}, {"own session", self, pglocks.ID(5)}, {"let go", pl, pglocks.ID(6)}} {
		sub, classid, objid := tt.key.PgLocks()
		r, err := terminate(t.Context(), pool, true, tt.pid, true, []int16{sub}, []int64{int64(classid)}, []int64{int64(objid)})
		if err != nil || r != terminateGone {
			t.Errorf("%s: %v, %v; want it left alone", tt.name, r, err)
		}
	}
	if !alive(t, srv, pl) || !alive(t, srv, self) {
		t.Error("a session that does not hold the lock was ended")
	}
	if _, err := pool.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
}

// The question takes y or yes, in any case; anything else, or nothing, is
// no.
func TestConfirm(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]bool{
		"y\n": true, "yes\n": true, " Y \n": true, "YES": true,
		"n\n": false, "\n": false, "": false, "yep\n": false, "no\n": false,
	} {
		var out strings.Builder
		if got := confirm(strings.NewReader(in), &out, "End it? [y/N] "); got != want || !strings.HasPrefix(out.String(), "End it? [y/N] ") {
			t.Errorf("answer %q: %v, asked %q; want %v", in, got, out.String(), want)
		}
	}
}

// On a terminal kill asks, and ends the sessions only on a yes. script(1)
// gives it the terminal.
func TestKillAsks(t *testing.T) {
	t.Parallel()
	script, err := exec.LookPath("script")
	if err != nil {
		t.Skip("no script(1) to run kill on a terminal")
	}
	dsn, _ := testDB(t)
	holder, pid := session(t, dsn, "holder")
	lockKey(t, holder, pglocks.Name("job"))
	ask := func(answer string) (string, int) {
		t.Helper()
		cmd := exec.Command(script, "-qec", bin+" kill job", "/dev/null")
		cmd.Env = append(os.Environ(), "DATABASE_URL="+dsn)
		cmd.Stdin = strings.NewReader(answer)
		out, _ := cmd.CombinedOutput()
		return string(out), cmd.ProcessState.ExitCode()
	}
	out, code := ask("n\n")
	if code != exitNoneEnded || !strings.Contains(out, fmt.Sprintf("End session pid %d (holder from 127.0.0.1)? [y/N] ", pid)) ||
		!strings.Contains(out, "nothing ended") || !alive(t, srv, pid) {
		t.Fatalf("answered n: exit %d, alive %v:\n%s", code, alive(t, srv, pid), out)
	}
	out, code = ask("y\n")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("ended pid %d", pid)) || alive(t, srv, pid) {
		t.Errorf("answered y: exit %d, alive %v:\n%s", code, alive(t, srv, pid), out)
	}
}
