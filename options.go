package pglocks

import (
	"errors"
	"log/slog"
	"time"
)

// config is what the Options set.
type config struct {
	logger   *slog.Logger
	appName  string
	stmtTime time.Duration
	err      error
}

func defaultConfig() config {
	return config{
		logger:   slog.New(slog.DiscardHandler),
		stmtTime: 10 * time.Second,
	}
}

// Option configures a [Locker]. Options with invalid values make [New] and
// [NewDB] return an error; they are never silently replaced by defaults.
type Option func(*config)

func (c *config) fail(err error) {
	if c.err == nil {
		c.err = err
	}
}

// WithLogger makes the Locker log what it does to logger: connections it
// discards (Warn), acquisitions and releases (Debug). By default it logs
// nothing.
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
// value is restored (RESET) before the connection goes back to the pool. By
// default the Locker leaves application_name as the pool set it. The server
// cuts names to 63 bytes.
func WithApplicationName(name string) Option {
	return func(c *config) {
		if name == "" {
			c.fail(errors.New("pglocks: WithApplicationName: empty name"))
			return
		}
		c.appName = name
	}
}

// WithStatementTimeout bounds every statement the Locker sends on a connection
// that holds locks (taking, releasing, checking them), and how long it waits
// for the server to confirm that a cancelled wait has stopped. If a statement
// does not finish in time, the connection is closed, which frees its locks on
// the server, and the locks it held are reported lost. Waiting for a lock is
// not a statement in this sense: it is bounded by the caller's context. The
// default is 10 seconds; d must be positive.
func WithStatementTimeout(d time.Duration) Option {
	return func(c *config) {
		if d <= 0 {
			c.fail(errors.New("pglocks: WithStatementTimeout: duration must be positive"))
			return
		}
		c.stmtTime = d
	}
}

// lockConfig is what the LockOptions set.
type lockConfig struct {
	shared bool
}

// LockOption configures one acquisition.
type LockOption func(*lockConfig)

// Shared takes the lock in shared mode: any number of sessions may hold it
// shared at once, while an exclusive holder excludes all of them. Without
// Shared, locks are exclusive.
func Shared() LockOption { return func(c *lockConfig) { c.shared = true } }

func lockOptions(opts []LockOption) lockConfig {
	var c lockConfig
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	return c
}
