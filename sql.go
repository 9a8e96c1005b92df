package pglocks

// Every statement pglocks sends is built here, from the shapes below, so a
// reviewer can audit them in one place. $1 (and $2 for a pair key) are the
// key; the next parameter, where there is one, is lock_timeout in
// milliseconds.
//
//	try:          SELECT pg_try_advisory_lock[_shared](key)
//	wait:         SELECT pg_advisory_lock[_shared](key)
//	wait+timeout: SELECT set_config('lock_timeout', $n, true), pg_advisory_lock[_shared](key)
//	unlock:       SELECT pg_advisory_unlock[_shared](key)
//
// and the same try/wait shapes for pg_advisory_xact_lock[_shared]. Outside a
// transaction block each statement is its own transaction, so
// set_config(…, true) scopes lock_timeout to that one statement. Inside a
// transaction it would last until the transaction ends, so the transaction
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
	sqlUnlockAll    = "SELECT pg_advisory_unlock_all()"
	sqlBackendPID   = "SELECT pg_backend_pid()"
	sqlCancel       = "SELECT pg_cancel_backend($1)"
	sqlSetAppName   = "SELECT set_config('application_name', $1, false)"
	sqlResetAppName = "RESET application_name"

	sqlSavepoint         = "SAVEPOINT pglocks_wait"
	sqlReleaseSavepoint  = "RELEASE SAVEPOINT pglocks_wait"
	sqlRollbackSavepoint = "ROLLBACK TO SAVEPOINT pglocks_wait"
)

// statements[kind][shared][pair] is the SQL text of every lock statement.
var statements = func() (s [numStmtKinds][2][2]string) {
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
			s[stmtTry][shared][pair] = "SELECT " + call("try_advisory_lock")
			s[stmtWait][shared][pair] = "SELECT " + call("advisory_lock")
			s[stmtWaitTimeout][shared][pair] = "SELECT set_config('lock_timeout', " + next + ", true), " + call("advisory_lock")
			s[stmtUnlock][shared][pair] = "SELECT " + call("advisory_unlock")
			s[stmtXactTry][shared][pair] = "SELECT " + call("try_advisory_xact_lock")
			s[stmtXactWait][shared][pair] = "SELECT " + call("advisory_xact_lock")
			// OFFSET 0 keeps the subquery from being flattened, so the old
			// value is read before the first set_config runs.
			s[stmtXactWaitTimeout][shared][pair] = "SELECT set_config('lock_timeout', " + next + ", true), " +
				call("advisory_xact_lock") + ", set_config('lock_timeout', p.v, true) " +
				"FROM (SELECT current_setting('lock_timeout') AS v OFFSET 0) p"
		}
	}
	return s
}()

// stmt returns the SQL text and the key's arguments for one statement.
func stmt(kind stmtKind, key Key, shared bool) (string, []any) {
	sh := 0
	if shared {
		sh = 1
	}
	if key.kind == kindPair {
		a, b := key.pair()
		return statements[kind][sh][1], []any{a, b}
	}
	return statements[kind][sh][0], []any{key.v}
}
