package main

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

const killHead = `Usage: pglocks kill [flags] NAME
       pglocks kill [flags] --pid PID[,PID...] [NAME]

Ends the server sessions that hold the advisory lock NAME (with --slots N,
one of NAME's N slots; with --waiters, the sessions that wait for it in the
server's queue instead), to clear a stuck holder. It lists them as 'pglocks
ls' does, with every advisory lock each one has (they all go with its
session), asks, ends each with pg_terminate_backend, waits up to 5s for it
to exit, and shows who holds NAME then: a waiter in the queue usually takes
it at once. It asks on the terminal (y/N); with no terminal to ask on it
refuses unless --yes. --dry-run only lists.

--pid ends only the sessions given, and only if they hold (with --waiters,
wait for) an advisory lock in this database, NAME's with NAME: it refuses
any other pid, and then ends none, so it is not a general
pg_terminate_backend. A session that released the lock or exited since it
was listed is left alone; kill's own session, always.

A lock that a prepared transaction holds (pid 0 in ls) has no session to
end: kill prints the ROLLBACK PREPARED statement that would free it, and
does not run it, since the transaction is one half of a two-phase commit
that its transaction manager may still mean to commit. A multiplexed wait
(for any of N slots, as pglocks run --slots waits) is not in pg_locks and
has no session of its own to end: --waiters does not see it.

Ending another role's session takes superuser or membership in
pg_signal_backend; a superuser's session, superuser.

Flags go before NAME. Exit status: 0 a session was ended (with --dry-run:
one would be); 1 none was: nothing holds NAME (with --waiters, waits for
it), a --pid does not, only a prepared transaction holds it, the answer
was no, or a session is still there 5s after it was told to end; 2 usage
(and no terminal to ask on without --yes); 3 database unreachable, failing
or a standby; 5 not allowed: the role may not end the session (it lacks
pg_signal_backend).
`

// killWait is how long kill waits for a session it ended to exit.
const killWait = 5 * time.Second

// The statements kill sends, besides listLocks's.
const (
	// killTarget matches session $1 when it holds ($2 true) or awaits
	// an advisory lock in this database, one of the keys ($3 objsubid, $4
	// classid, $5 objid, as pg_locks has them; any, when they are empty),
	// and is not this session: a session that has released the lock since
	// it was listed, or exited, and a new one with its pid, are left alone.
	killTarget = `
		WHERE $1::int4 <> pg_backend_pid() AND EXISTS (
			SELECT FROM pg_locks l
			WHERE l.pid = $1::int4 AND l.locktype = 'advisory' AND l.granted = $2::bool
			  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
			  AND (coalesce(cardinality($3::int2[]), 0) = 0 OR (l.objsubid, l.classid::int8, l.objid::int8) IN
			       (SELECT * FROM unnest($3::int2[], $4::int8[], $5::int8[]))))`
	// terminateSQL ends the session and waits up to $6 ms for it to exit
	// (PostgreSQL 14+): false with a warning when it does not, or when it
	// is no session.
	terminateSQL = `SELECT pg_terminate_backend($1::int4, $6::int8)` + killTarget
	// terminateSQL13 ends the session without waiting (before 14).
	terminateSQL13 = `SELECT pg_terminate_backend($1::int4)` + killTarget
	hasTimeoutSQL  = `SELECT current_setting('server_version_num')::int >= 140000`
	aliveSQL       = `SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1::int4)`
	preparedSQL    = `SELECT owner, database FROM pg_prepared_xacts WHERE gid = $1`
	currentUserSQL = `SELECT current_user`
)

// pidList is the repeatable --pid flag; each value may list pids, as
// ls's BLOCKED BY column does: 10794,10808.
type pidList []int

func (p *pidList) String() string {
	var s []string
	for _, pid := range *p {
		s = append(s, strconv.Itoa(pid))
	}
	return strings.Join(s, ",")
}

func (p *pidList) Set(v string) error {
	for _, f := range strings.Split(v, ",") {
		pid, err := strconv.ParseInt(strings.TrimSpace(f), 10, 32)
		switch {
		case err != nil:
			return fmt.Errorf("want a session's pid, a whole number (or several, as 10794,10808)")
		case pid == 0:
			return fmt.Errorf("pid 0 is a prepared transaction, which has no session to end: kill NAME prints the ROLLBACK PREPARED that frees it")
		case pid < 0:
			return fmt.Errorf("want a session's pid, a whole number above 0")
		}
		if !slices.Contains(*p, int(pid)) {
			*p = append(*p, int(pid))
		}
	}
	return nil
}

// killTargets is what kill looks for.
type killTargets struct {
	keys    []pglocks.Key // NAME's key or slots; none with --pid alone: any
	pids    []int         // --pid; none: any
	waiters bool          // waits instead of holds
	shown   string        // what NAME is called in what kill says: NAME, "one of NAME's 2 slots"
	anyOf   string        // the same, after the kill: NAME, "any of NAME's 2 slots"
}

// matches tells whether l is a lock that t looks for.
func (t killTargets) matches(l lockInfo) bool {
	return l.Granted != t.waiters && !l.Multiplexed &&
		(len(t.keys) == 0 || slices.Contains(t.keys, l.key)) &&
		(len(t.pids) == 0 || slices.Contains(t.pids, l.PID))
}

// what is what the sessions kill looks for do: "holds NAME", "waits for
// NAME", "holds an advisory lock in this database".
func (t killTargets) what() string {
	verb := "holds"
	if t.waiters {
		verb = "waits for"
	}
	if t.shown == "" {
		return verb + " an advisory lock in this database"
	}
	return verb + " " + t.shown
}

// whatNot says that a session does not do what(): "does not hold NAME",
// "waits for no advisory lock in this database".
func (t killTargets) whatNot() string {
	switch {
	case t.shown != "" && t.waiters:
		return "does not wait for " + t.shown
	case t.shown != "":
		return "does not hold " + t.shown
	case t.waiters:
		return "waits for no advisory lock in this database"
	}
	return "holds no advisory lock in this database"
}

// killCommand is "pglocks kill".
func killCommand(args []string, stdin *os.File, stdout, stderr io.Writer) int {
	fs := flagSet("kill", killHead, stderr)
	var (
		yes, dryRun, waiters bool
		slots                int
		pids                 pidList
		scheme, dsn          string
	)
	fs.Var(&pids, "pid", "end only the session `PID` (repeatable, or PID,PID,...), if it holds NAME or, without NAME, an advisory lock in this database")
	fs.IntVar(&slots, "slots", 0, fmt.Sprintf("end the holders of NAME's `N` slots (1..%d; pglocks run --slots N), not of NAME", pglocks.MaxSlots))
	fs.BoolVar(&waiters, "waiters", false, "end the sessions that wait for the lock in the server's queue, not those that hold it")
	for _, n := range []string{"y", "yes"} {
		fs.BoolVar(&yes, n, false, "do not ask")
	}
	fs.BoolVar(&dryRun, "dry-run", false, "only list the sessions it would end")
	oneKeyFlag(fs, &scheme)
	dsnFlag(fs, &dsn)
	if code := parseFlags(fs, args, stdout); code >= 0 {
		return code
	}
	rest := fs.Args()
	var name string
	switch {
	case len(rest) > 1 && strings.HasPrefix(rest[1], "-"):
		return usageError(stderr, "kill", "flag %s after NAME %q: flags go before NAME", rest[1], rest[0])
	case len(rest) > 1:
		return usageError(stderr, "kill", "want one NAME, got %d", len(rest))
	case len(rest) == 1 && rest[0] == "":
		// An unset variable ($JOB).
		return usageError(stderr, "kill", "empty NAME")
	case len(rest) == 1:
		name = rest[0]
	case len(pids) == 0 && !migrationSchemes[scheme]:
		return usageError(stderr, "kill", "missing NAME (or --pid)")
	}
	hasKey := name != "" || migrationSchemes[scheme]
	switch {
	case slots < 0 || slots > pglocks.MaxSlots:
		return usageError(stderr, "kill", "--slots must be 1..%d", pglocks.MaxSlots)
	case slots > 0 && !hasKey:
		return usageError(stderr, "kill", "--slots needs NAME")
	case !yes && !dryRun && !isTerminal(stdin):
		// Do not wait on a pipe, or read someone's "y" meant for another.
		return usageError(stderr, "kill", "no terminal to ask on: pass --yes to end the sessions, or --dry-run to list them")
	}
	cfg, err := poolConfig(dsn)
	if err != nil {
		return usageError(stderr, "kill", "%v", err)
	}
	t := killTargets{pids: pids, waiters: waiters}
	labels := map[pglocks.Key]label{}
	if hasKey {
		db := orDatabase(scheme, name, cfg)
		key, err := parseKey(scheme, db)
		if err != nil {
			return usageError(stderr, "kill", "%v", err)
		}
		t.shown = name
		if migrationSchemes[scheme] {
			t.shown, _ = pglocks.MigrationLabel(key, db)
		} else {
			if scheme != "id" && scheme != "pair" {
				// Not for a NAME that is the key itself: 42 42.
				addLabel(labels, key, key, name, -1, "")
			}
			for i := range pglocks.MaxSlots {
				addLabel(labels, key.Slot(i), key, name, i, "")
			}
		}
		t.keys = []pglocks.Key{key}
		if slots > 0 {
			t.keys = t.keys[:0]
			for i := range slots {
				t.keys = append(t.keys, key.Slot(i))
			}
			t.shown, t.anyOf = fmt.Sprintf("one of %s's %d slots", t.shown, slots), fmt.Sprintf("any of %s's %d slots", t.shown, slots)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	host, _ := os.Hostname()
	cfg.ConnConfig.RuntimeParams["application_name"] = appName("kill", cmp.Or(name, t.shown, "--pid"), host, os.Getpid(), maxAppName)
	cfg.MaxConns = 1
	pool, err := connect(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "pglocks kill: %v\n", err)
		return exitDatabase
	}
	defer pool.Close()
	dbFail := func(err error) int {
		fmt.Fprintf(stderr, "pglocks kill: %s\n", oneLine(err))
		return exitDatabase
	}
	var standby bool
	if err := pool.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&standby); err != nil {
		return dbFail(err)
	}
	if standby {
		fmt.Fprintln(stderr, "pglocks kill: this server is a standby: its pg_locks does not show the primary's advisory locks; ask the primary")
		return exitDatabase
	}
	all, err := listLocks(ctx, pool, labels)
	if err != nil {
		return dbFail(err)
	}
	victims, prepared := t.find(all)
	if missing := t.missing(victims); len(missing) > 0 {
		// A pid given by hand that is not what kill is for: end none.
		for _, pid := range missing {
			fmt.Fprintf(stderr, "pglocks kill: pid %d %s: refusing to end it\n", pid, t.whatNot())
		}
		if len(missing) < len(t.pids) {
			fmt.Fprintln(stderr, "pglocks kill: ended none of the others either")
		}
		return exitNoneEnded
	}
	if len(victims) == 0 && len(prepared) == 0 {
		fmt.Fprintf(stdout, "no session %s\n", t.what())
		return exitNoneEnded
	}

	// Who they are: every advisory lock of each session (they all go
	// with it), and the prepared transactions.
	var shown []lockInfo
	for _, l := range all {
		if slices.Contains(victims, l.PID) || l.Prepared != "" && slices.ContainsFunc(prepared, func(p lockInfo) bool { return p.Prepared == l.Prepared }) {
			l.Label = labelText(l)
			shown = append(shown, l)
		}
	}
	sortLocks(shown, []string{name})
	printLocks(stdout, shown)
	for _, gid := range preparedGIDs(prepared) {
		var owner, db string
		if err := pool.QueryRow(ctx, preparedSQL, gid).Scan(&owner, &db); err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return dbFail(err)
		}
		fmt.Fprintf(stdout, "prepared transaction %s has no session to end: it holds its locks until COMMIT PREPARED or ROLLBACK PREPARED;\n"+
			"if its transaction manager will not finish it, free them (in database %s, as %s or a superuser) with:\n  %s\n",
			quoteLiteral(gid), cmp.Or(db, "?"), cmp.Or(owner, "its owner"), rollbackPrepared(gid))
	}
	if len(victims) == 0 {
		fmt.Fprintf(stdout, "no session %s, only a prepared transaction: nothing ended\n", t.what())
		return exitNoneEnded
	}
	sessions := sessionList(victims, all)
	if dryRun {
		fmt.Fprintf(stdout, "would end %s (--dry-run)\n", sessions)
		return 0
	}
	if !yes {
		answer := make(chan bool, 1)
		go func() { answer <- confirm(stdin, stderr, fmt.Sprintf("End %s? [y/N] ", sessions)) }()
		var ok bool
		select {
		case ok = <-answer:
		case <-ctx.Done(): // ^C at the question
			fmt.Fprintln(stderr)
		}
		if !ok {
			fmt.Fprintln(stdout, "nothing ended")
			return exitNoneEnded
		}
	}

	hasTimeout := true
	if err := pool.QueryRow(ctx, hasTimeoutSQL).Scan(&hasTimeout); err != nil {
		return dbFail(err)
	}
	var subs []int16
	var classids, objids []int64
	for _, k := range t.keys {
		s, c, o := k.PgLocks()
		subs, classids, objids = append(subs, s), append(classids, int64(c)), append(objids, int64(o))
	}
	ended, stuck, denied := 0, 0, 0
	for _, pid := range victims {
		who := describePID(pid, all)
		switch r, err := terminate(ctx, pool, hasTimeout, pid, !t.waiters, subs, classids, objids); {
		case isPermissionDenied(err):
			denied++
			var user string
			_ = pool.QueryRow(ctx, currentUserSQL).Scan(&user)
			fmt.Fprintf(stderr, "pglocks kill: not allowed to end %s: %s; to let role %s end other roles' sessions "+
				"(but a superuser's): GRANT pg_signal_backend TO %s;\n", who, oneLine(pgErrorText(err)), user, pgx.Identifier{user}.Sanitize())
		case err != nil:
			return dbFail(err)
		case r == terminateGone:
			fmt.Fprintf(stdout, "%s no longer %s (it let go, or exited): left alone\n", who, t.what())
		case r == terminateStuck:
			stuck++
			fmt.Fprintf(stderr, "pglocks kill: %s was told to end, but is still there after %v\n", who, killWait)
		default:
			ended++
			fmt.Fprintf(stdout, "ended %s\n", who)
		}
	}

	// What is left of what it was after.
	after, err := listLocks(ctx, pool, labels)
	if err != nil {
		return dbFail(err)
	}
	var left []lockInfo
	for _, l := range after {
		if len(t.keys) > 0 && slices.Contains(t.keys, l.key) || len(t.keys) == 0 && slices.Contains(victims, l.PID) {
			l.Label = labelText(l)
			left = append(left, l)
		}
	}
	switch {
	case len(left) == 0 && t.shown != "":
		fmt.Fprintf(stdout, "now no session holds or waits for %s\n", cmp.Or(t.anyOf, t.shown))
	case len(left) == 0:
		fmt.Fprintf(stdout, "now %s no advisory lock\n", pidsHave(victims))
	default:
		sortLocks(left, []string{name})
		fmt.Fprintln(stdout, "now:")
		printLocks(stdout, left)
	}
	switch {
	case denied > 0:
		return exitNotAllowed
	case ended == 0 || stuck > 0:
		return exitNoneEnded
	}
	return 0
}

// find returns the sessions that t looks for, by pid, and the locks of
// prepared transactions among them, which have none.
func (t killTargets) find(all []lockInfo) (pids []int, prepared []lockInfo) {
	for _, l := range all {
		switch {
		case !t.matches(l):
		case l.Prepared != "":
			prepared = append(prepared, l)
		case l.PID > 0 && !slices.Contains(pids, l.PID):
			pids = append(pids, l.PID)
		}
	}
	slices.Sort(pids)
	return pids, prepared
}

// missing returns the --pid values that are not among found.
func (t killTargets) missing(found []int) []int {
	var out []int
	for _, p := range t.pids {
		if !slices.Contains(found, p) {
			out = append(out, p)
		}
	}
	return out
}

// terminateResult is what became of a session kill told to end.
type terminateResult int

const (
	terminateEnded terminateResult = iota // it has exited
	terminateGone                         // it no longer had the lock, or had exited, before
	terminateStuck                        // it is still there
)

// terminate ends session pid if it still holds (granted) or awaits one of
// the keys given as pg_locks has them (any advisory lock when there are
// none), and waits up to killWait for it to exit.
func terminate(ctx context.Context, pool *pgxpool.Pool, hasTimeout bool, pid int, granted bool, subs []int16, classids, objids []int64) (terminateResult, error) {
	var ok bool
	var err error
	if hasTimeout {
		err = pool.QueryRow(ctx, terminateSQL, pid, granted, subs, classids, objids, killWait.Milliseconds()).Scan(&ok)
	} else {
		err = pool.QueryRow(ctx, terminateSQL13, pid, granted, subs, classids, objids).Scan(&ok)
	}
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return terminateGone, nil
	case err != nil:
		return 0, err
	case ok && hasTimeout:
		return terminateEnded, nil
	}
	// Without the timeout, or past it (false, with a warning), watch for
	// it to go.
	for end := time.Now().Add(killWait); ; {
		var alive bool
		if err := pool.QueryRow(ctx, aliveSQL, pid).Scan(&alive); err != nil {
			return 0, err
		}
		switch {
		case !alive:
			return terminateEnded, nil
		case hasTimeout || time.Now().After(end):
			return terminateStuck, nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// isPermissionDenied tells whether err is the server's refusal to end
// another role's session (SQLSTATE 42501, insufficient_privilege).
func isPermissionDenied(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "42501"
}

// pgErrorText is a server error's message and detail.
func pgErrorText(err error) error {
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Detail != "" {
		return fmt.Errorf("%s (%s)", pe.Message, strings.TrimSuffix(pe.Detail, "."))
	}
	if errors.As(err, &pe) {
		return errors.New(pe.Message)
	}
	return err
}

// describePID is a session as kill names it: pid 123 (app from client).
func describePID(pid int, all []lockInfo) string {
	for _, l := range all {
		if l.PID != pid {
			continue
		}
		var about []string
		if l.Application != "" {
			about = append(about, l.Application)
		}
		if l.Client != "" {
			about = append(about, "from "+l.Client)
		}
		if len(about) > 0 {
			return fmt.Sprintf("pid %d (%s)", pid, strings.Join(about, " "))
		}
		break
	}
	return fmt.Sprintf("pid %d", pid)
}

// sessionList names pids for the question: "session pid 1 (app)", "2
// sessions: pid 1 (app), pid 2".
func sessionList(pids []int, all []lockInfo) string {
	var s []string
	for _, p := range pids {
		s = append(s, describePID(p, all))
	}
	if len(s) == 1 {
		return "session " + s[0]
	}
	return fmt.Sprintf("%d sessions: %s", len(s), strings.Join(s, ", "))
}

// confirm asks question on w and reads the answer from r: yes for y or
// yes, in any case; no for anything else, or nothing.
func confirm(r io.Reader, w io.Writer, question string) bool {
	fmt.Fprint(w, question)
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintln(w)
	}
	a := strings.ToLower(strings.TrimSpace(line))
	return a == "y" || a == "yes"
}

// pidsHave is "pid 1 has", "pids 1, 2 have".
func pidsHave(pids []int) string {
	var s []string
	for _, p := range pids {
		s = append(s, strconv.Itoa(p))
	}
	if len(s) == 1 {
		return "pid " + s[0] + " has"
	}
	return "pids " + strings.Join(s, ", ") + " have"
}

// preparedGIDs are the prepared transactions of locks, once each, in order.
func preparedGIDs(locks []lockInfo) []string {
	var out []string
	for _, l := range locks {
		if !slices.Contains(out, l.Prepared) {
			out = append(out, l.Prepared)
		}
	}
	return out
}

// rollbackPrepared is the statement that rolls back prepared transaction gid.
func rollbackPrepared(gid string) string {
	return "ROLLBACK PREPARED " + quoteLiteral(gid) + ";"
}

// quoteLiteral is s as an SQL string literal.
func quoteLiteral(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}
