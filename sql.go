package pglocks

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
// Transaction locks use pg_[try_]advisory_xact_lock[_shared]. Their try
// returns NULL on a server in recovery (a standby). Inside a transaction
// set_config(…, true) would last until the transaction ends, so the waiting
// form restores the previous value in the same statement.

// stmtKind names one statement shape.
type stmtKind int

const (
	stmtTry stmtKind = iota
	stmtWait
	stmtWaitTimeout
	stmtUnlock
	stmtXactTry
	stmtXactWait
	stmtXactWaitTimeout
	numStmtKinds
)

const (
	sqlUnlockAll  = "SELECT pg_advisory_unlock_all()"
	sqlBackendPID = "SELECT pg_backend_pid()"
	sqlCancel     = "SELECT pg_cancel_backend($1)"

	// sqlInitSession readies a session for holding locks: it learns the
	// backend's pid and whether the server is a standby, and sets the
	// server-side keepalives (after connecting, since PgBouncer refuses them
	// as startup parameters) and, optionally, application_name, returning
	// the values it replaces so that sqlRestoreSession can put them back.
	sqlInitSession = `SELECT pg_backend_pid(), pg_is_in_recovery(),
	current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'),
	current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout'),
	current_setting('application_name'),
	set_config('tcp_keepalives_idle', $1, false), set_config('tcp_keepalives_interval', $2, false),
	set_config('tcp_keepalives_count', $3, false), set_config('tcp_user_timeout', $4, false),
	set_config('application_name', coalesce($5::text, current_setting('application_name')), false)`
	sqlRestoreSession = `SELECT set_config('tcp_keepalives_idle', $1, false), set_config('tcp_keepalives_interval', $2, false),
	set_config('tcp_keepalives_count', $3, false), set_config('tcp_user_timeout', $4, false),
	set_config('application_name', $5, false)`

	// sqlMarkLeader ends the session's application_name with the server's
	// time, for Lead: $1 is the name and the " since=" mark.
	sqlMarkLeader = `SELECT set_config('application_name',
	$1::text || to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), false)`

	// sqlLeader finds the session that holds a key exclusively in the
	// current database: $1 objsubid, $2 classid, $3 objid. It returns one
	// row, whose first column says whether there is such a session.
	sqlLeader = `SELECT l.pid IS NOT NULL, coalesce(l.pid, 0)::int4, coalesce(a.application_name, ''),
	coalesce(host(a.client_addr), ''), coalesce(a.client_port, 0)::int4, a.backend_start
	FROM (SELECT 1) one
	LEFT JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock'
		AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
		AND l.objsubid = $1::int4 AND l.classid::bigint = $2::bigint AND l.objid::bigint = $3::bigint
	LEFT JOIN pg_stat_activity a ON a.pid = l.pid
	LIMIT 1`

	sqlSavepoint         = "SAVEPOINT pglocks_wait"
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
			args, next := "$1::bigint", "$2"
			if pair == 1 {
				args, next = "$1::int4, $2::int4", "$3"
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
				call("try_advisory_xact_lock") + " END"
			s[stmtXactWait][shared][pair][0] = "SELECT " + call("advisory_xact_lock")
			// OFFSET 0 keeps the subquery from being flattened, so the old
			// value is read before the first set_config runs.
			s[stmtXactWaitTimeout][shared][pair][0] = "SELECT set_config('lock_timeout', " + next + ", true), " +
				call("advisory_xact_lock") + ", set_config('lock_timeout', p.v, true) " +
				"FROM (SELECT current_setting('lock_timeout') AS v OFFSET 0) p"
		}
	}
	return s
}()

// stmt returns the SQL text and the key's arguments for one statement.
func stmt(kind stmtKind, key Key, shared, fenced bool) (string, []any) {
	sh, fe := 0, 0
	if shared {
		sh = 1
	}
	if fenced && (kind == stmtTry || kind == stmtWait || kind == stmtWaitTimeout) {
		fe = 1
	}
	if key.kind == kindPair {
		a, b := key.pair()
		return statements[kind][sh][1][fe], []any{a, b}
	}
	return statements[kind][sh][0][fe], []any{key.v}
}
