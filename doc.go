// Package pglocks provides PostgreSQL advisory locks for Go: processes on many
// machines that share one PostgreSQL database agree that only one of them does
// a thing at a time. It needs nothing but the database.
//
// # Keys
//
// A [Key] names a lock. PostgreSQL has two key spaces that never collide: one
// bigint ([ID], [Name], [NameCRC32]) and two int4 ([Pair]). [Name] hashes a
// string exactly as the server's hashtextextended(name, 0) does, so plain SQL
// and other languages can take the same lock; [NameCRC32] matches
// django-pglocks. Locks are per database.
//
// # Session locks
//
// A [Locker] holds session-level locks for a process, over a pgxpool.Pool
// ([New]) or a *sql.DB ([NewDB]). [Locker.Lock] waits for a lock inside the
// server's queue; [Locker.TryLock] never waits and returns [ErrLocked];
// [Locker.Do] and [Locker.TryDo] run a function under a lock and release it
// afterwards. A [Lock] is held until [Lock.Release], [Locker.Close] or its
// loss, which [Lock.Done] and [Lock.Err] report. [Shared] takes a lock in
// shared mode.
//
//	locker, err := pglocks.New(pool)
//	...
//	err = locker.Do(ctx, pglocks.Name("nightly-report"), func(ctx context.Context) error {
//		return runReport(ctx) // no other process runs it meanwhile
//	})
//
// # Transaction locks
//
// [LockTx] and [TryLockTx] (or [LockSQLTx] and [TryLockSQLTx] for
// database/sql) take a lock that the transaction holds until it commits or
// rolls back; [Locker.DoTx] and [Locker.DoSQLTx] wrap a whole transaction.
//
// # What is guaranteed
//
//   - Mutual exclusion between sessions, as PostgreSQL grants it, and between
//     goroutines of one Locker, which the Locker arbitrates itself (the server
//     would let one session take its own lock twice). Shared holders coexist;
//     an exclusive one excludes all.
//   - Lock waits in the server's lock queue, so a waiter gets the lock as soon
//     as it is released; there is no polling.
//   - A context deadline on Lock is enforced by the server (lock_timeout for
//     that one statement) and the error matches context.DeadlineExceeded. When
//     Lock or TryLock returns an error, nothing of it is held or queued on the
//     server: a wait that is given up is cancelled on the server, and its
//     connection is cleared of locks and closed (a cancel can race with the
//     grant, so the library never trusts the error alone).
//   - A connection never goes back to the pool holding a lock. If an unlock
//     fails, the connection is closed, which frees its locks on the server.
//   - Held locks share a few connections: holding a thousand uncontended locks
//     uses one server session. Only a wait for a lock held elsewhere needs a
//     connection of its own, which then holds that lock.
//   - Transaction locks end with their transaction, including a rollback to a
//     savepoint taken before them. A failed transaction-lock wait is rolled
//     back to a savepoint of its own and leaves lock_timeout as it was.
//
// # What is not guaranteed
//
//   - A lock is only as good as the session that holds it. If the session
//     ends (the backend is terminated, the server restarts, the network
//     fails), the server frees the lock and another process may take it while
//     the old holder still runs. The Locker reports the loss through
//     [Lock.Done] when it next uses that connection; it does not yet probe
//     idle holder connections, so a loss can go unnoticed until then. Guard
//     writes that must not happen twice with a check in the database itself.
//   - Locks taken on a standby are not seen by the primary, and PgBouncer in
//     transaction mode strands session locks: point the Locker at the
//     primary, directly or through session pooling.
//   - The Locker must own the session locks on its connections. Do not take
//     session advisory locks yourself on connections of the same pool and
//     return them to it.
//   - [Name] equals hashtextextended only in UTF-8 databases with a
//     deterministic default collation (the usual case).
//   - With database/sql, a transaction-lock wait cancelled before its
//     deadline ends the transaction's connection (see [LockSQLTx]).
//   - No deadlock detection for session locks: a Locker waits for a lock on
//     a session of its own, separate from the sessions holding its other
//     locks, so the server's deadlock detector cannot see a cycle through it,
//     and goroutines of one Locker that take two locks in opposite orders
//     wait for each other. Take locks in one global order and use deadlines.
//   - If the server stops answering, a cancelled wait is abandoned after the
//     statement timeout ([WithStatementTimeout]) by closing its connection;
//     the server drops the wait when it notices.
package pglocks
