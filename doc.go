// Package pglocks provides PostgreSQL advisory locks for Go: processes on many
// machines that share one PostgreSQL database agree that only one of them does
// a thing at a time. It needs nothing but the database.
//
// # Keys
//
// A [Key] names a lock. PostgreSQL has two key spaces that never collide: one
// bigint ([ID], [Name], [NameCRC32], [NameDjangoPglock]) and two int4
// ([Pair]); [NameDotNet] makes keys of either, as .NET's library does. [Name] hashes a
// string exactly as the server's hashtextextended(name, 0) does, so plain SQL
// and other languages can take the same lock; [NameCRC32] matches
// django-pglocks, [NameDjangoPglock] the maintained django-pglock,
// [NameDotNet] .NET's DistributedLock, [NameRails] and [IDRails] Ruby's
// with_advisory_lock, and [NameNode] the npm package advisory-lock. Locks are
// per database.
//
// # Session locks
//
// A [Locker] holds session-level locks for a process, over a pgxpool.Pool
// ([New]) or a *sql.DB ([NewDB]). [Locker.Lock] waits for a lock inside the
// server's queue; [Locker.TryLock] never waits and returns [ErrLocked];
// [Locker.Do] and [Locker.TryDo] run a function under a lock and release it
// afterwards. A [Lock] is held until [Lock.Release], [Locker.Close] or its
// loss, which [Lock.Done] and [Lock.Err] report. [Shared] takes a lock in
// shared mode. Release waits for the server's answer and reports a loss;
// [Lock.ReleaseNoWait] sends the unlock with the Locker's next statement
// instead, one round trip a Lock/Release cycle, without that proof.
//
//	locker, err := pglocks.New(pool)
//	...
//	err = locker.Do(ctx, pglocks.Name("nightly-report"), func(ctx context.Context) error {
//		return runReport(ctx) // no other process runs it meanwhile
//	})
//
// # Several keys
//
// [Locker.LockAll], [Locker.TryLockAll] and [Locker.DoAll] take several keys
// all or nothing, in one global order (so two of them never deadlock each
// other), as a [LockSet]. Duplicate keys are merged.
//
// # Slots and minimum holds
//
// [Slots](n) takes any one of n slots of a key ([Key.Slot]), so that at
// most n holders in all processes hold one at a time: a fleet-wide
// semaphore. [MinHold](d) keeps a lock held until at least d after its grant
// however soon it is released, for jobs that must run once per window.
//
// # Leader election
//
// [Locker.Lead] runs a function on one process at a time among all that
// campaign for a key: it waits in the server's queue, runs fn while leading
// with a ctx cancelled when leadership is lost, resigns when fn returns and
// campaigns again until its ctx ends. [Locker.Leader] and [Locker.Observe]
// tell who leads, from pg_locks and pg_stat_activity; [FencingToken] orders
// the terms.
//
//	err = locker.Lead(ctx, pglocks.Name("outbox-relay"), func(ctx context.Context) error {
//		return relay(ctx) // on one replica at a time
//	})
//
// # Observability
//
// [Locker.Stat] is a snapshot of what a Locker holds and waits for and of
// its running totals, cheap enough to take every second. [WithTracer] calls
// optional hooks ([AcquireTracer], [ReleaseTracer], [LossTracer],
// [LeaderTracer], [LockerTracer]) at every acquisition, release, loss and
// change of leadership; without one, tracing costs one nil check per hook.
// [Label] names an acquisition for them. Module
// github.com/pglocks/pglocks/otelpglocks records them as OpenTelemetry
// metrics and spans. [WithLogger] logs losses at Warn, retries at Info or
// Debug, and nothing per acquisition.
//
// # Errors
//
// An error about a key reads "pglocks: lock KEY: why", KEY written as
// [Key.String] writes it, after the name (quoted) for a key that [Name] or
// another Name function made, such as
//
//	pglocks: lock "tick" (-546921001532167208): held by another session
//
// and says each cause once. It matches (errors.Is) the sentinel of its
// cause: [ErrLocked], [ErrDeadlock], [ErrServerTimeout] or
// context.DeadlineExceeded for a wait, [ErrSessionEnded] for one whose
// server session ended, [ErrTooManyLocks], [ErrLockTableFull],
// [ErrStandby], [ErrTransactionPooling], [ErrClosed], [ErrInvalidKey]; and
// the driver's error stays reachable with errors.As. [Lock.Err] reports a
// loss with an error matching [ErrLockLost], and ErrSessionEnded as well
// when the server ended the session.
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
//   - A Locker takes at most [WithMaxConns] connections of its pool (default
//     2), for holding and waiting together, however many goroutines wait:
//     the application's own queries through the pool go on. Up to that many
//     waits, less one, wait in the server's lock queue on sessions of their
//     own and get the lock the moment it is free, in queue order. Waits
//     beyond them are multiplexed: the Locker tries their keys together on
//     its primary session; a key freed by a pglocks Locker of any process
//     (pgx drivers) reaches such a waiter at once, by notification, and one
//     freed by any other client within 250 ms plus a round trip. The oldest
//     multiplexed wait moves into the server's queue when a session frees.
//   - Waits last as long as ctx allows, whatever timeouts the role, the
//     database or the server's configuration set. Every session a Locker
//     readies sets statement_timeout, lock_timeout, idle_session_timeout,
//     idle_in_transaction_session_timeout and transaction_timeout to 0 (the
//     ones the server has), so that none of them ends a wait or an idle
//     holder's session, and client_connection_check_interval to 1s, so that
//     a waiter whose process died leaves the server's queue; it puts the old
//     values back before the connection returns to the pool. Transaction
//     locks turn statement_timeout and lock_timeout off for their wait only,
//     and restore them for the caller's own statements. A wait the server
//     ends anyway (a cancel from another session) fails with
//     [ErrServerTimeout], and one whose session it ends (pg_terminate_backend,
//     a restart) with [ErrSessionEnded]: never a bare SQLSTATE.
//   - A context deadline on Lock is enforced by the server (lock_timeout for
//     that one statement) and the error matches context.DeadlineExceeded. When
//     Lock or TryLock returns an error, nothing of it is held or queued on the
//     server: a wait that is given up is cancelled on the server, and its
//     connection is cleared of locks and closed (a cancel can race with the
//     grant, so the library never trusts the error alone).
//   - A connection never goes back to the pool holding a lock. If an unlock
//     fails, the connection is closed, which frees its locks on the server.
//   - Held locks share a few connections: holding a thousand locks, contended
//     or not, uses at most [WithMaxConns] server sessions.
//   - Transaction locks end with their transaction, including a rollback to a
//     savepoint taken before them. A failed transaction-lock wait is rolled
//     back to a savepoint of its own and leaves lock_timeout as it was.
//   - A holder is told when its lock is gone. Every session that holds locks
//     is checked by a heartbeat ([WithHeartbeat]); when its session ends (the
//     backend is terminated, the server restarts or is killed, an idle
//     timeout, a network partition) every lock on it is reported through
//     [Lock.Done] and [Lock.Err] (matching [ErrLockLost]) at most
//     interval+timeout (2 s by default) after the server stops answering, and
//     [Locker.Do] cancels fn's context with that cause. With pgx drivers an
//     idle session that holds locks is also watched (from its first
//     heartbeat, or from the grant of a lock that was waited for), so a
//     session that the server ends is reported within milliseconds.
//   - A silent holder's locks are freed by the server in a bound, and the
//     holder hears first. Holder sessions set TCP keepalives and a TCP user
//     timeout on the server's side and on their own socket
//     ([WithServerKeepalive]), so the server drops a vanished client after
//     about 11 s instead of more than two hours; the Locker refuses settings
//     under which it could learn of a loss after the server frees the lock.
//   - Fencing tokens ([WithFencingTokens], [Lock.Token]) increase strictly
//     from one holder of a key to the next, so the resource a lock guards can
//     refuse a stale holder's write.
//   - Locks are refused on a standby ([ErrStandby]), where [Locker.Leader]
//     returns ErrStandby too and [Locker.Observe] stops, and through a
//     statement-pooling proxy ([ErrTransactionPooling]). Behind a transaction
//     pooler (PgBouncer's pool_mode=transaction) every session the Locker uses
//     is pinned by a transaction of its own (READ COMMITTED, READ ONLY: it
//     holds back no VACUUM and gets no transaction id), whose settings end
//     with it; a statement that may fail runs inside a savepoint, and a
//     session whose transaction cannot be recovered is closed, so the pooler
//     never hands a server session with the Locker's locks to another client.
//     A full server lock table fails one acquire with [ErrLockTableFull] and
//     loses nothing else; [WithMaxLocks] caps what one Locker holds.
//
// # What is not guaranteed
//
//   - A lock is only as good as the session that holds it. When the session
//     ends, the server frees the lock at once (a terminated backend, a
//     restart) and another process may take it up to the heartbeat bound
//     before the old holder hears of it; a holder that pauses (a GC, a stopped
//     VM) hears nothing until it runs again. Use fencing tokens for writes
//     that must not come from a stale holder.
//   - Transaction pooling is detected from the outside: behind a proxy whose
//     BackendKeyData differs from the backend's pid (or with lib/pq, which
//     does not show it), a second client must land on the holder's server
//     session, as PgBouncer's default reuse order makes it. Point the Locker
//     at the primary, directly or through session pooling.
//   - Deadlocks between transaction locks, and between [Locker.LockAll] and
//     another client, are detected by the server ([ErrDeadlock]).
//   - The Locker must own the session locks on its connections. Do not take
//     session advisory locks yourself on connections of the same pool and
//     return them to it.
//   - [Name] equals hashtextextended only in UTF-8 databases with a
//     deterministic default collation (the usual case).
//   - With database/sql, a transaction-lock wait cancelled before its
//     deadline ends the transaction's connection (see [LockSQLTx]).
//   - First come, first served holds among the goroutines of one Locker that
//     want a key, and among waits in the server's queue; not among
//     multiplexed waits of different processes, whose tries race (a try
//     never jumps the server's queue). A multiplexed LockAll tries all its
//     keys at once, all or nothing, so the server cannot see a deadlock
//     through it. A multiplexed waiter of a Locker on lib/pq finds freed keys
//     by polling only (the driver hides notifications).
//   - No deadlock detection for separate Lock calls: a Locker waits for a
//     lock on a session of its own, separate from the sessions holding its
//     other locks, so the server's deadlock detector cannot see a cycle
//     through it, and goroutines of one Locker that take two locks in
//     opposite orders wait for each other. Use [Locker.LockAll], or take
//     locks in one global order and use deadlines.
//   - Two leaders can overlap when the server itself ends the leader's
//     session: the next candidate is elected at once, and the old leader is
//     told within milliseconds with pgx drivers, within the heartbeat bound
//     with lib/pq. Guard what leaders write with [FencingToken].
//   - If the server stops answering, a cancelled wait is abandoned after the
//     statement timeout ([WithStatementTimeout]) by closing its connection;
//     the server drops the wait when it notices. lib/pq cannot interrupt a
//     statement on a silent network; pglocks then reports the loss on time
//     and closes the connection when the driver returns.
//   - Fencing tokens cost a transaction id and a commit (a WAL flush) per
//     acquisition, which is why they are off by default.
package pglocks
