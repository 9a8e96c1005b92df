package pglocks

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"time"
	"unicode/utf8"
)

// config is what the Options set.
type config struct {
	logger     *slog.Logger
	appName    string
	stmtTime   time.Duration
	hbInterval time.Duration
	hbTimeout  time.Duration
	kaIdle     time.Duration
	kaInterval time.Duration
	kaCount    int
	fencing    bool
	maxLocks   int
	maxConns   int
	tracers    tracers
	err        error
}

func defaultConfig() config {
	return config{
		logger:     slog.New(slog.DiscardHandler),
		stmtTime:   10 * time.Second,
		hbInterval: time.Second,
		hbTimeout:  time.Second,
		kaIdle:     5 * time.Second,
		kaInterval: 2 * time.Second,
		kaCount:    3,
		maxLocks:   1000,
		maxConns:   defaultMaxConns,
	}
}

// serverBound is how long the server may take to notice a silent client:
// its keepalive probes, and its TCP user timeout for unacknowledged data.
// The limits WithServerKeepalive checks keep it from overflowing.
func (c *config) serverBound() time.Duration {
	return c.kaIdle + time.Duration(c.kaCount)*c.kaInterval
}

// Limits on the options' values.
const (
	// maxTimeout is the longest timeout the server accepts (its timeouts
	// are int milliseconds), and the longest the options take.
	maxTimeout = math.MaxInt32 * time.Millisecond
	// maxTimeoutText is maxTimeout as the docs say it, for errors.
	maxTimeoutText = "24.8 days (2147483647 ms)"
	// minStatementTimeout and minHeartbeat are floors below which a
	// statement, even on a local server, would fail often enough to make
	// the Locker useless: every session checked away as lost.
	minStatementTimeout = 100 * time.Millisecond
	minHeartbeat        = 100 * time.Millisecond // the check's timeout
	minHeartbeatEvery   = 50 * time.Millisecond  // its interval
	// maxKeepalive and maxKeepaliveCount are Linux's limits on a socket's
	// TCP_KEEPIDLE, TCP_KEEPINTVL (seconds) and TCP_KEEPCNT, which the
	// server applies to its socket and the Locker to its own.
	maxKeepalive      = 32767 * time.Second
	maxKeepaliveCount = 127
)

// Option configures a [Locker]. Options with invalid values make [New] and
// [NewDB] return an error; they are never silently replaced by defaults.
type Option func(*config)

// maxAppName is the longest application_name the server keeps, in bytes.
const maxAppName = 63

func (c *config) fail(err error) {
	if c.err == nil {
		c.err = err
	}
}

// WithLogger makes the Locker log what happens to it to logger, with one
// policy for levels: Warn when locks were lost (a session ended or was
// closed after an error; a minimum hold cut short) or a leader's fn
// failed; Info for elections, resignations and retried campaigns; Debug for
// sessions that ended idle (nothing lost) and polls that found no session.
// Nothing is logged per acquisition or release: a tracer ([WithTracer]) sees
// those. By default it logs nothing.
func WithLogger(logger *slog.Logger) Option {
	return func(c *config) {
		if logger == nil {
			c.fail(errors.New("pglocks: WithLogger: nil logger"))
			return
		}
		c.logger = logger
	}
}

// WithApplicationName sets the application_name of every server session the
// Locker takes from the pool, for as long as it uses it, so that pg_locks
// joined with pg_stat_activity shows who holds a lock. The session's own
// value is put back before the connection goes back to the pool. By
// default the Locker leaves application_name as the pool set it. name must
// be valid UTF-8 without NUL bytes, and at most 63 bytes (the server's
// NAMEDATALEN-1, beyond which it would cut the name); the server shows
// characters other than printable ASCII as '?'.
func WithApplicationName(name string) Option {
	return func(c *config) {
		switch {
		case name == "":
			c.fail(errors.New("pglocks: WithApplicationName: empty name"))
		case !utf8.ValidString(name) || strings.ContainsRune(name, 0):
			c.fail(fmt.Errorf("pglocks: WithApplicationName: %q is not valid UTF-8 without NUL bytes", name))
		case len(name) > maxAppName:
			c.fail(fmt.Errorf("pglocks: WithApplicationName: %d bytes; the server keeps at most %d", len(name), maxAppName))
		default:
			c.appName = name
		}
	}
}

// WithStatementTimeout bounds the Locker's housekeeping statements (readying a
// connection, releasing everything at Close), and how long it waits for the
// server to confirm that a cancelled wait has stopped before it closes the
// connection instead. Statements on connections that hold locks are bounded
// by the heartbeat timeout ([WithHeartbeat]) instead. Waiting for a lock is
// bounded by the caller's context. The default is 10 seconds; d must be at
// least 100 milliseconds and at most 24.8 days (the server's limit on
// timeouts).
func WithStatementTimeout(d time.Duration) Option {
	return func(c *config) {
		if d < minStatementTimeout || d > maxTimeout {
			c.fail(fmt.Errorf("pglocks: WithStatementTimeout: %v is not within %v and %s", d, minStatementTimeout, maxTimeoutText))
			return
		}
		c.stmtTime = d
	}
}

// WithHeartbeat sets how often each connection that holds locks is checked
// (interval), and how long the check, or any statement on such a connection,
// may take (timeout). When a check fails or times out, or the session turns
// out to be another one (a transaction-pooling proxy), the connection is
// closed and every lock on it is reported lost through [Lock.Done]. A loss is
// therefore reported at most interval+timeout after the server stops
// answering: 2 seconds with the defaults of 1 second each. interval must be
// at least 50 milliseconds and timeout at least 100 (a check must have time
// to make a round trip), both at most 24.8 days, and
// their sum shorter than the server-side bound of [WithServerKeepalive], so
// that the holder always learns of a loss before the server can give the
// lock to someone else.
func WithHeartbeat(interval, timeout time.Duration) Option {
	return func(c *config) {
		if interval < minHeartbeatEvery || timeout < minHeartbeat || interval > maxTimeout || timeout > maxTimeout {
			c.fail(fmt.Errorf("pglocks: WithHeartbeat: interval %v and timeout %v must be within %v and %s, and %v and %s",
				interval, timeout, minHeartbeatEvery, maxTimeoutText, minHeartbeat, maxTimeoutText))
			return
		}
		c.hbInterval, c.hbTimeout = interval, timeout
	}
}

// WithServerKeepalive sets how soon the server gives up on a holder that has
// gone silent (a crashed machine, a network partition), and so frees its
// locks. The Locker sets tcp_keepalives_idle, tcp_keepalives_interval and
// tcp_keepalives_count on the sessions that hold its locks, tcp_user_timeout
// to idle+interval×count, and the same keepalive and user timeout on its own
// sockets (pgx drivers, Linux). The server then frees a silent holder's locks
// about idle+interval×count after the last exchange: 11 seconds with the
// defaults of 5 s, 2 s and 3 (PostgreSQL's defaults leave them held for over
// two hours). idle and interval are whole seconds from 1 to 32767, and
// count is from 1 to 127 (Linux's limits on a socket's keepalives); the
// bound must be at most 24.8 days (the server's limit on tcp_user_timeout).
// The settings are put back when a connection returns to the pool.
func WithServerKeepalive(idle, interval time.Duration, count int) Option {
	return func(c *config) {
		switch {
		case idle < time.Second || interval < time.Second || idle > maxKeepalive || interval > maxKeepalive ||
			idle%time.Second != 0 || interval%time.Second != 0:
			c.fail(fmt.Errorf("pglocks: WithServerKeepalive: idle %v and interval %v must be whole seconds from 1s to %v",
				idle, interval, maxKeepalive))
		case count < 1 || count > maxKeepaliveCount:
			c.fail(fmt.Errorf("pglocks: WithServerKeepalive: count %d is not within 1 and %d", count, maxKeepaliveCount))
		case idle+time.Duration(count)*interval > maxTimeout:
			c.fail(fmt.Errorf("pglocks: WithServerKeepalive: the bound idle+interval×count (%v) is longer than the server's tcp_user_timeout allows (%s)",
				idle+time.Duration(count)*interval, maxTimeoutText))
		default:
			c.kaIdle, c.kaInterval, c.kaCount = idle, interval, count
		}
	}
}

// WithFencingTokens gives every lock a fencing token ([Lock.Token]): the
// server's pg_current_xact_id() read right after the lock is granted, which
// increases strictly from one holder of a key to the next. It costs a
// transaction id and a commit record (a WAL flush, under synchronous_commit)
// per acquisition, so it is off by default and Token returns 0.
func WithFencingTokens() Option { return func(c *config) { c.fencing = true } }

// WithMaxLocks caps how many locks the Locker holds on the server at once
// (locks shared by several goroutines of the Locker count once), counting the
// keys it is waiting for, which it will hold once granted. Beyond it, Lock
// and TryLock fail with [ErrTooManyLocks] before asking the server. The
// server's shared lock table is small (about 12,800 locks on default
// settings, for all sessions together) and a full table stops every session
// from taking any lock, so the cap protects the whole server from one runaway
// process. The default is 1000; n must be at least 1.
func WithMaxLocks(n int) Option {
	return func(c *config) {
		if n < 1 {
			c.fail(errors.New("pglocks: WithMaxLocks: n must be at least 1"))
			return
		}
		c.maxLocks = n
	}
}

// defaultMaxConns is WithMaxConns's default: pgxpool's smallest default
// pool is 4, and the application keeps the other 2.
const defaultMaxConns = 2

// WithMaxConns bounds how many connections the Locker takes from its pool,
// for holding locks and waiting for them together: n, or the pool's own
// maximum if that is smaller. The default is 2, which leaves half of a pool
// of pgxpool's smallest default size (4) to the application however many
// goroutines wait: one connection (the primary) holds the Locker's locks
// and tries new ones, the others wait in the server's queue for a key held
// elsewhere and then hold it. Beyond them waits are multiplexed (see
// [Locker.Lock]): they cost no connection, and locks granted to them are
// held on the primary. Idle connections kept ready for waits count against
// n too, and go back to the pool when it has no other to give: within 10 ms
// while the application uses the pool, within the heartbeat interval after
// a quiet spell.
// With n = 1 every wait is multiplexed; n must be at least 1. (Holders,
// Leader and Observe take a pool connection for their one query, as an
// application query would, outside this bound.)
func WithMaxConns(n int) Option {
	return func(c *config) {
		if n < 1 {
			c.fail(errors.New("pglocks: WithMaxConns: n must be at least 1"))
			return
		}
		c.maxConns = n
	}
}

// lockConfig is what the LockOptions set.
type lockConfig struct {
	shared bool
	// own takes the lock on a session of its own, waiting in the server's
	// queue at once (Lead): the session can then be watched, and named.
	own     bool
	slots   int32         // Slots: take one of this many slots of the key (int32: lockConfig stays in a 48-byte size class)
	minHold time.Duration // MinHold
	label   string        // Label
	err     error         // the first invalid option
}

// LockOption configures one acquisition. An invalid one makes the
// acquisition fail with an error that says why, before anything is taken.
type LockOption func(*lockConfig)

// Shared takes the lock in shared mode: any number of sessions may hold it
// shared at once, while an exclusive holder excludes all of them. Without
// Shared, locks are exclusive. It cannot be combined with [Slots].
func Shared() LockOption { return func(c *lockConfig) { c.shared = true } }

// Slots takes any one of n slots of the key instead of the key itself, so
// that at most n holders, in all processes, hold one at a time: a
// fleet-wide semaphore with no table. [Locker.TryLock] fails with
// [ErrLocked] when all n are held; [Locker.Lock] waits for the first slot
// to free, multiplexed (it costs no connection per slot, and a slot freed by
// a pglocks Locker is told at once, as for any multiplexed wait). The
// returned [Lock] says which slot it holds ([Lock.Slot]); slot i is the key
// [Key.Slot](i), which psql and other clients can take too.
//
// Everyone must agree on n. Slot i is the same key whatever n, so with
// different n the holders are limited by the largest n among them: those
// with a smaller n only ever take its first slots. n is from 1 to
// [MaxSlots]; Slots cannot be combined with [Shared], and works with
// [Locker.Lock], [Locker.TryLock], [Locker.Do] and [Locker.TryDo] only.
// Waits for slots are not first come, first served: among waiting
// goroutines and processes, whichever tries first once a slot frees gets it,
// except that a Locker that frees a slot which a waiter elsewhere asked for
// leaves it to that waiter for a few milliseconds (its own goroutines'
// tries skip it meanwhile, so a TryLock can answer ErrLocked then). A
// TryLock that finds the free slots claimed by the tries of other
// goroutines of its Locker waits for those tries to end before it answers.
func Slots(n int) LockOption {
	return func(c *lockConfig) {
		if n < 1 || n > MaxSlots {
			c.setErr(fmt.Errorf("Slots(%d): n must be from 1 to %d", n, MaxSlots))
			return
		}
		c.slots = int32(n)
	}
}

// MinHold keeps the lock held on the server until at least d after it was
// granted, even when [Lock.Release] is called (or [Locker.Do]'s fn returns)
// sooner: for jobs that must run once per window rather than merely not at
// the same time. Release then returns at once, and the handle reports
// [ErrReleased] as usual; the Locker lets the lock go when d is up, in the
// background. A loss is still reported while the handle is held; a loss
// during the rest of the hold after Release ends it early (logged at Warn).
// [Locker.Close] ends such holds at once. A key in the rest of its hold
// still counts against [WithMaxLocks], and other goroutines of the same
// Locker wait for it like everyone else. d must be positive and at most
// 24.8 days.
func MinHold(d time.Duration) LockOption {
	return func(c *lockConfig) {
		if d <= 0 || d > maxTimeout {
			c.setErr(fmt.Errorf("MinHold(%v): d must be positive and at most %s", d, maxTimeoutText))
			return
		}
		c.minHold = d
	}
}

func (c *lockConfig) setErr(err error) {
	if c.err == nil {
		c.err = err
	}
}

func lockOptions(opts []LockOption) lockConfig {
	var c lockConfig
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	if c.slots > 0 && c.shared {
		c.setErr(errors.New("Shared and Slots cannot be combined: a slot is taken exclusively"))
	}
	return c
}
