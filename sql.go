package pglocks

import (
	"strconv"
	"strings"
	"time"
)

// Every statement pglocks sends is built here, from the shapes below, so a
// reviewer can audit them in one place. $1 (and $2 for a pair key) are the
// key; the next parameter, where there is one, is lock_timeout in
// milliseconds.
//
//	try:          SELECT pg_try_advisory_lock[_shared](key), <token>
//	wait:         SELECT '', pg_advisory_lock[_shared](key)::text, <token>
//	wait+timeout: SELECT set_config('lock_timeout', $n, true), pg_advisory_lock[_shared](key)::text, <token>
//	unlock:       SELECT pg_advisory_unlock[_shared](key)
//
// <token> is 0, or with fencing tokens pg_current_xact_id() read after the
// lock is granted (columns are evaluated left to right; the try reads it only
// when it got the lock). Outside a transaction block each statement is its
// own transaction, so set_config(…, true) scopes lock_timeout to that one
// statement.
//
// Sessions the Locker readies have statement_timeout and lock_timeout off
// (see sessionSettings), so the plain wait has no limit but the caller's ctx.
//
// Transaction locks use pg_[try_]advisory_xact_lock[_shared] in the caller's
// transaction, whose settings are the caller's. Their try returns NULL on a
// server in recovery (a standby), and the transaction's statement_timeout.
// The wait runs inside a savepoint:
//
//	SAVEPOINT pglocks_wait; SELECT set_config('statement_timeout', '0', true)
//	SELECT set_config('lock_timeout', $n, true), pg_advisory_xact_lock[_shared](key),
//	       set_config('lock_timeout', <old>, true), set_config('statement_timeout', $n+1, true)
//	RELEASE SAVEPOINT pglocks_wait   (or ROLLBACK TO SAVEPOINT pglocks_wait, then RELEASE)
//
// statement_timeout is read when a statement starts, so it is turned off by
// the statement before the wait; lock_timeout is read when the wait starts,
// so the wait's own statement sets it ('0' without a deadline). Inside a
// transaction set_config(…, true) lasts until the transaction ends, so the
// wait restores both in the same statement once granted, and the rollback to
// the savepoint restores them when it fails.

// stmtKind names one statement shape.
type stmtKind int

const (
	stmtTry stmtKind = iota
	stmtWait
	stmtWaitTimeout
	stmtUnlock
	stmtXactTry
	stmtXactWait
	numStmtKinds
)

// sessionSettings are the server settings that readying a session (for
// holding or waiting: see Locker.take) replaces, in the order of their
// values in sqlInitSession's arguments and of holder.orig. Each is set only
// if the server has it (idle_session_timeout and
// client_connection_check_interval are PostgreSQL 14+, transaction_timeout
// 17+) and its value is not NULL; the values it had are put back by
// sqlRestoreSession before the connection returns to the pool.
//
//   - The TCP keepalives and user timeout bound how long the server keeps a
//     vanished holder's locks (WithServerKeepalive). They are set after
//     connecting because PgBouncer refuses them as startup parameters.
//   - statement_timeout, lock_timeout and transaction_timeout, often set on
//     a role, would end a wait that the caller's ctx allows, or (the latter)
//     a holder's session; the wait is bounded by ctx instead.
//   - idle_session_timeout and idle_in_transaction_session_timeout would end
//     an idle holder's session, freeing its locks before the holder hears.
//   - client_connection_check_interval makes a backend that waits in the
//     lock queue notice that its client died (kill -9, a crashed machine)
//     and leave the queue, instead of waiting on until it is granted.
//   - application_name, when WithApplicationName is set.
var sessionSettings = [...]string{
	"tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout",
	"statement_timeout", "lock_timeout", "transaction_timeout",
	"idle_session_timeout", "idle_in_transaction_session_timeout",
	"client_connection_check_interval",
	"application_name",
}

// Indexes into sessionSettings.
const (
	setKeepalivesIdle = iota
	setKeepalivesInterval
	setKeepalivesCount
	setTCPUserTimeout
	setStatementTimeout
	setLockTimeout
	setTransactionTimeout
	setIdleSession
	setIdleInTransaction
	setConnectionCheck
	setAppName
	numSessionSettings
)

// sessionValues are the values that sqlInitSession sets, in the order of
// sessionSettings (nil: leave the setting as it is).
func sessionValues(c *config) []any {
	v := make([]any, numSessionSettings)
	v[setKeepalivesIdle] = seconds(c.kaIdle)
	v[setKeepalivesInterval] = seconds(c.kaInterval)
	v[setKeepalivesCount] = strconv.Itoa(c.kaCount)
	v[setTCPUserTimeout] = strconv.FormatInt(c.serverBound().Milliseconds(), 10)
	for _, i := range []int{setStatementTimeout, setLockTimeout, setTransactionTimeout, setIdleSession, setIdleInTransaction} {
		v[i] = "0"
	}
	v[setConnectionCheck] = connectionCheck
	if c.appName != "" {
		v[setAppName] = c.appName
	}
	return v
}

func seconds(d time.Duration) string { return strconv.FormatInt(int64(d/time.Second), 10) }

// connectionCheck is client_connection_check_interval on the Locker's
// sessions: a waiter whose process died leaves the server's queue within
// about this long.
const connectionCheck = "1s"

// sqlInitSession readies a session for holding locks: it learns the
// backend's pid and whether the server is a standby, reads the settings it
// replaces (columns are evaluated left to right) and sets sessionSettings to
// $1, $2, ... (NULL: leave as it is).
//
// sqlRestoreSession sets them back to $1, $2, ... (NULL: the server does not
// have it).
//
// sqlInitPinned is sqlInitSession for a session pinned by a transaction of
// its own (behind a transaction pooler: see pinning below): its settings are
// made for that transaction only (set_config(…, true)), and end with it.
var sqlInitSession, sqlRestoreSession, sqlInitPinned = func() (initQ, restoreQ, pinnedQ string) {
	var reads, sets, locals, restores []string
	for i, name := range sessionSettings {
		p := "$" + strconv.Itoa(i+1) + "::text"
		reads = append(reads, "current_setting('"+name+"', true)")
		set := "CASE WHEN " + p + " IS NOT NULL AND current_setting('" + name + "', true) IS NOT NULL THEN set_config('" + name + "', " + p
		sets = append(sets, set+", false) END")
		locals = append(locals, set+", true) END")
		restores = append(restores, "CASE WHEN "+p+" IS NOT NULL THEN set_config('"+name+"', "+p+", false) END")
	}
	head := "SELECT pg_backend_pid(), pg_is_in_recovery(), " + strings.Join(reads, ", ")
	initQ = head + ", concat(" + strings.Join(sets, ", ") + ")"
	pinnedQ = head + ", concat(" + strings.Join(locals, ", ") + ")"
	restoreQ = "SELECT concat(" + strings.Join(restores, ", ") + ")"
	return initQ, restoreQ, pinnedQ
}()

// Behind a transaction pooler (PgBouncer's pool_mode=transaction), a server
// session belongs to a client only while the client is in a transaction.
// The Locker then pins each session it uses with a transaction of its own,
// from readying it to giving it back:
//
//	BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; sqlInitPinned
//	... the Locker's statements, those that may fail between
//	    SAVEPOINT pglocks_stmt and RELEASE (or ROLLBACK TO) SAVEPOINT pglocks_stmt,
//	    a wait after SAVEPOINT pglocks_pin_wait (kept after the grant, and
//	    released with the session's next wait) ...
//	SELECT pg_advisory_unlock_all(); COMMIT
//
// READ COMMITTED keeps no snapshot between statements, so an idle pinned
// session shows no backend_xmin; nothing in it writes, so it never gets a
// transaction id (backend_xid): fencing tokens are read on another
// connection (sqlToken, in a transaction of its own). A failed statement
// would abort the transaction, and ending that would hand the server
// session, with its locks, to the pooler's next client: so what may fail
// runs inside a savepoint, and a session whose transaction cannot be
// recovered is closed, which the pooler answers by closing its server
// session (PgBouncer: "client disconnect while server was not ready").
const (
	sqlProbe       = "SELECT pg_backend_pid(), pg_is_in_recovery()"
	sqlPin         = "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY"
	sqlUnpin       = "COMMIT"
	sqlStmtSave    = "SAVEPOINT pglocks_stmt"
	sqlStmtRelease = "RELEASE SAVEPOINT pglocks_stmt"
	sqlStmtUndo    = "ROLLBACK TO SAVEPOINT pglocks_stmt"
	sqlWaitSave    = "SAVEPOINT pglocks_pin_wait"
	sqlWaitRelease = "RELEASE SAVEPOINT pglocks_pin_wait"
	sqlWaitUndo    = "ROLLBACK TO SAVEPOINT pglocks_pin_wait"
)

// notifyChannel is where Lockers tell each other of keys wanted and freed
// (see mux.go). Notifications are per database, as locks are.
const notifyChannel = "pglocks"

const (
	sqlListen   = "LISTEN " + notifyChannel
	sqlUnlisten = "UNLISTEN " + notifyChannel

	// sqlNotify sends $1, a payload, on notifyChannel.
	sqlNotify = "SELECT pg_notify('" + notifyChannel + "', $1)::text"
	// sqlToken is a fencing token read in a transaction of its own, after
	// the grants it stands for (see mux.poll).
	sqlToken = "SELECT pg_current_xact_id()::text::bigint"

	sqlUnlockAll  = "SELECT pg_advisory_unlock_all()"
	sqlBackendPID = "SELECT pg_backend_pid()"
	sqlCancel     = "SELECT pg_cancel_backend($1)"

	// sqlMarkLeader ends the session's application_name with the server's
	// time, for Lead: $1 is the name and the " @" mark; $2 is true on a
	// pinned session, where the name lasts as long as its transaction.
	sqlMarkLeader = `SELECT set_config('application_name',
	$1::text || to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYYMMDD"T"HH24MISS.MS"Z"'), $2::bool)`

	// sqlHolders lists the sessions that hold a key in the current
	// database, as JSON: $1 objsubid, $2 classid, $3 objid. It returns one
	// row: whether the server is a standby (whose pg_locks does not show the
	// primary's locks), and the holders.
	sqlHolders = `SELECT pg_is_in_recovery(), coalesce(json_agg(json_build_object(
		'pid', l.pid, 'mode', l.mode, 'app', coalesce(a.application_name, ''),
		'addr', coalesce(host(a.client_addr), ''), 'port', coalesce(a.client_port, 0),
		'start', a.backend_start) ORDER BY l.pid)::text, '[]')
	FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
	WHERE l.locktype = 'advisory' AND l.granted
		AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
		AND l.objsubid = $1::int4 AND l.classid::bigint = $2::bigint AND l.objid::bigint = $3::bigint`

	sqlSavepoint         = "SAVEPOINT pglocks_wait; SELECT set_config('statement_timeout', '0', true)"
	sqlReleaseSavepoint  = "RELEASE SAVEPOINT pglocks_wait"
	sqlRollbackSavepoint = "ROLLBACK TO SAVEPOINT pglocks_wait"
)

// statements[kind][shared][pair][fenced] is the SQL text of every lock
// statement. fenced is always 0 for the kinds that have no token.
var statements = func() (s [numStmtKinds][2][2][2]string) {
	for shared := range 2 {
		mode := ""
		if shared == 1 {
			mode = "_shared"
		}
		for pair := range 2 {
			args, next, after := "$1::bigint", "$2", "$3"
			if pair == 1 {
				args, next, after = "$1::int4, $2::int4", "$3", "$4"
			}
			call := func(fn string) string { return "pg_" + fn + mode + "(" + args + ")" }
			for fenced := range 2 {
				token := "0::bigint"
				try := "SELECT " + call("try_advisory_lock") + ", " + token
				if fenced == 1 {
					token = "pg_current_xact_id()::text::bigint"
					try = "SELECT l, CASE WHEN l THEN " + token + " ELSE 0 END FROM (SELECT " +
						call("try_advisory_lock") + " AS l OFFSET 0) s"
				}
				s[stmtTry][shared][pair][fenced] = try
				s[stmtWait][shared][pair][fenced] = "SELECT ''::text, " + call("advisory_lock") + "::text, " + token
				s[stmtWaitTimeout][shared][pair][fenced] = "SELECT set_config('lock_timeout', " + next + ", true), " +
					call("advisory_lock") + "::text, " + token
			}
			s[stmtUnlock][shared][pair][0] = "SELECT " + call("advisory_unlock")
			s[stmtXactTry][shared][pair][0] = "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE " +
				call("try_advisory_xact_lock") + " END, current_setting('statement_timeout')"
			// OFFSET 0 keeps the subquery from being flattened, so the old
			// value is read before the first set_config runs.
			s[stmtXactWait][shared][pair][0] = "SELECT set_config('lock_timeout', " + next + ", true), " +
				call("advisory_xact_lock") + "::text, set_config('lock_timeout', p.v, true), " +
				"set_config('statement_timeout', " + after + ", true) " +
				"FROM (SELECT current_setting('lock_timeout') AS v OFFSET 0) p"
		}
	}
	return s
}()

// Statements over many keys at once, for multiplexed waits (keysStmt).
const (
	stmtMuxTry = iota
	stmtMuxUnlock
)

// keysStmt returns a statement that tries (stmtMuxTry) or unlocks
// (stmtMuxUnlock) every key of keys in one mode, in one statement, and
// returns one row: the keys it got (or unlocked), as Key.String separated
// by spaces. Keys travel as text ($1 the bigint keys, $2 and $3 the pairs'
// halves, space-separated), which every driver can send.
//
//	SELECT coalesce(string_agg(x, ' ') FILTER (WHERE g), '') FROM (
//	  SELECT k::text AS x, pg_try_advisory_lock(k) AS g FROM unnest(string_to_array($1, ' ')::bigint[]) AS k
//	  UNION ALL
//	  SELECT a || ',' || b, pg_try_advisory_lock(a, b) FROM unnest(string_to_array($2, ' ')::int4[], string_to_array($3, ' ')::int4[]) AS u(a, b)
//	) t
func keysStmt(kind int, keys []Key, shared bool) (string, []any) {
	q := keysStatements[kind][0]
	if shared {
		q = keysStatements[kind][1]
	}
	var ids, as, bs []string
	for _, k := range keys {
		if a, b, ok := k.Int32s(); ok {
			as = append(as, strconv.FormatInt(int64(a), 10))
			bs = append(bs, strconv.FormatInt(int64(b), 10))
			continue
		}
		ids = append(ids, strconv.FormatInt(k.v, 10))
	}
	return q, []any{strings.Join(ids, " "), strings.Join(as, " "), strings.Join(bs, " ")}
}

// keysStatements[kind][shared] are keysStmt's texts.
var keysStatements = func() (s [2][2]string) {
	for kind, fn := range []string{"try_advisory_lock", "advisory_unlock"} {
		for shared, mode := range []string{"", "_shared"} {
			s[kind][shared] = "SELECT coalesce(string_agg(x, ' ') FILTER (WHERE g), '') FROM (" +
				"SELECT k::text AS x, pg_" + fn + mode + "(k) AS g FROM unnest(string_to_array($1, ' ')::bigint[]) AS k " +
				"UNION ALL " +
				"SELECT a::text || ',' || b::text, pg_" + fn + mode + "(a, b) " +
				"FROM unnest(string_to_array($2, ' ')::int4[], string_to_array($3, ' ')::int4[]) AS u(a, b)) t"
		}
	}
	return s
}()

// stmt returns the SQL text and the key's arguments for one statement.
func stmt(kind stmtKind, key Key, shared, fenced bool) (string, []any) {
	q, n := stmtQ(kind, key, shared, fenced)
	if n == 2 {
		a, b := key.pair()
		return q, []any{a, b}
	}
	return q, []any{key.v}
}

// stmtQ is stmt's statement and how many arguments it takes (the key's:
// 1 for a bigint, 2 for a pair), for a req that keeps them in its own
// buffer (req.setKey).
func stmtQ(kind stmtKind, key Key, shared, fenced bool) (string, int) {
	sh, fe := 0, 0
	if shared {
		sh = 1
	}
	if fenced && (kind == stmtTry || kind == stmtWait || kind == stmtWaitTimeout) {
		fe = 1
	}
	if key.kind == kindPair {
		return statements[kind][sh][1][fe], 2
	}
	return statements[kind][sh][0][fe], 1
}

// sessionWait returns the wait statement of a session lock, for waitSpec.
// On a pinned session, whose set_config(…, true) lasts until the transaction
// ends, a wait without a deadline sets lock_timeout to 0 itself.
func sessionWait(key Key, shared, fenced, pinned bool) func(ms string) (string, []any) {
	return func(ms string) (string, []any) {
		if ms == "" && pinned {
			ms = "0"
		}
		if ms == "" {
			return stmt(stmtWait, key, shared, fenced)
		}
		q, args := stmt(stmtWaitTimeout, key, shared, fenced)
		return q, append(args, ms)
	}
}

// xactWait returns the wait statement of a transaction lock, for waitSpec:
// it restores statement_timeout to st once granted.
func xactWait(key Key, shared bool, st string) func(ms string) (string, []any) {
	return func(ms string) (string, []any) {
		if ms == "" {
			ms = "0" // the transaction's lock_timeout does not bound the wait
		}
		q, args := stmt(stmtXactWait, key, shared, false)
		return q, append(args, ms, st)
	}
}
