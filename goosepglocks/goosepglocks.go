// Package goosepglocks makes goose (pressly/goose v3) migrations wait for
// each other in PostgreSQL's lock queue instead of polling for the lock, on
// a fleet where every replica migrates at start.
//
// goose's own session locker tries pg_try_advisory_lock every 5 s, 60 times:
// a replica that starts just after another waits up to 5 s for nothing, and
// one whose turn does not come in 5 minutes fails. [SessionLocker] waits in
// the server's queue instead, for as long as goose's context allows, on the
// connection goose migrates on, and takes goose's own key by default, so
// replicas that still run goose's locker are excluded too:
//
//	locker, err := goosepglocks.NewSessionLocker()
//	...
//	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations,
//		goose.WithSessionLocker(locker))
//
// [Locker] is goose's other kind (goose.WithLocker): it holds the key on a
// [pglocks.Locker] session of its own, beside goose's connection, so that a
// lock lost while migrating is reported by goose's Up.
//
// # What is guaranteed
//
// With either, no two goose providers (of this package or goose's own
// session locker, on the same key) migrate one database at once. With
// [SessionLocker] the lock lives in the session that runs the migrations:
// if that session ends (its backend terminated, the connection cut), the
// lock and the migration's statements end together, so a migration never
// goes on unprotected. A wait lasts as long as goose's context, whatever
// lock_timeout or statement_timeout the role or the database sets (both
// are turned off for the wait only, and the migrations run with them); a wait that ends without
// the lock (the context done, an error) leaves nothing held: the key is let
// go if the server granted it anyway, and a connection that cannot be shown
// to hold nothing is closed, not returned to database/sql's pool. `pglocks
// ls` shows the key as "goose migrations" (or by its number with
// [WithKey]).
//
// # What is not guaranteed
//
// Only goose runs that take a lock are excluded: goose's table locker
// (lock.NewPostgresTableLocker) takes no advisory lock and excludes
// nothing here. [SessionLocker] has no way to tell goose that its session
// ended mid-migration but the migration's own errors; [Locker] reports a
// lost lock only when goose unlocks, after the migrations ran. Locks are per
// database: providers on different databases do not exclude each other.
package goosepglocks

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/pressly/goose/v3/lock"

	"github.com/pglocks/pglocks"
)

// cleanupTimeout bounds the statements that put a connection right after a
// failed wait or unlock; past it the connection is closed instead.
const cleanupTimeout = 5 * time.Second

// The statements, with the key as a bigint. The wait turns off, for its
// own statement only (set_config's is_local outside a transaction),
// lock_timeout. statement_timeout is armed when a statement starts, so it is
// turned off for the session before the wait and put back after it. On
// servers that have it (PostgreSQL 14+), client_connection_check_interval
// is 1 s while the session waits and holds the key, and put back at the
// unlock: a backend whose client died leaves the queue, or ends the
// migration statement it runs (rolling it back) and frees the key, within a
// second, instead of when the statement ends.
const (
	noTimeoutSQL = `SELECT current_setting('statement_timeout'),
	CASE WHEN current_setting('server_version_num')::int >= 140000
	     THEN current_setting('client_connection_check_interval') ELSE '' END,
	set_config('statement_timeout', '0', false)`
	waitSQL = `SELECT set_config('lock_timeout', '0', true),
	CASE WHEN current_setting('server_version_num')::int >= 140000
	     THEN set_config('client_connection_check_interval', '1000', true) END,
	pg_advisory_lock($1)`
	restoreSQL = `SELECT set_config('statement_timeout', $1::text, false),
	CASE WHEN $2::text <> '' THEN set_config('client_connection_check_interval', $2::text, false) END`
	unlockSQL = `SELECT pg_advisory_unlock($1),
	CASE WHEN $2::text <> '' THEN set_config('client_connection_check_interval', $2::text, false) END`
)

// An Option configures a [SessionLocker] or a [Locker].
type Option func(*config)

type config struct {
	key     pglocks.Key
	options []pglocks.Option
}

// WithKey sets the key to take instead of goose's own,
// [pglocks.MigrationGoose] (ID(4097083626), goose's lock.DefaultLockID): a
// key of the bigint space ([pglocks.ID], [pglocks.Name]) for a
// [SessionLocker]; any key for a [Locker]. Providers exclude each other only
// when they take the same key: give one to each set of migrations that may
// run beside the others (goose's lock.WithLockID does the same for its
// locker).
func WithKey(k pglocks.Key) Option { return func(c *config) { c.key = k } }

// WithLockerOptions passes options to the [pglocks.Locker] that a [Locker]
// opens on goose's *sql.DB (pglocks.NewDB); a [SessionLocker] opens none
// and refuses it.
func WithLockerOptions(opts ...pglocks.Option) Option {
	return func(c *config) { c.options = append(c.options, opts...) }
}

func newConfig(opts []Option) config {
	c := config{key: pglocks.MigrationGoose()}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// SessionLocker is goose's lock.SessionLocker: it holds the key on the
// *sql.Conn goose passes, the one goose runs the migrations on, waiting for
// it in the server's queue. It is safe for concurrent use, and may serve
// several providers (each on its own connection).
type SessionLocker struct {
	id int64

	mu    sync.Mutex
	check map[*sql.Conn]string // client_connection_check_interval before SessionLock ("": none)
}

var _ lock.SessionLocker = (*SessionLocker)(nil)

// NewSessionLocker returns a [SessionLocker] for goose.WithSessionLocker. It
// returns an error for a key that is not in the bigint space (a
// [pglocks.Pair] or slotted key), or for [WithLockerOptions].
func NewSessionLocker(opts ...Option) (*SessionLocker, error) {
	c := newConfig(opts)
	id, ok := c.key.Int64()
	switch {
	case !ok:
		return nil, fmt.Errorf("goosepglocks: NewSessionLocker: key %v is not a bigint key (pglocks.ID or pglocks.Name)", c.key)
	case len(c.options) > 0:
		return nil, errors.New("goosepglocks: NewSessionLocker: WithLockerOptions is for a Locker; a SessionLocker opens no pglocks.Locker")
	}
	return &SessionLocker{id: id, check: map[*sql.Conn]string{}}, nil
}

// SessionLock waits in the server's queue until conn's session holds the
// key, or until ctx is done (then it returns ctx's error). If it returns an
// error, conn holds nothing: the key is let go if the server granted it as
// the wait ended, and a connection on which that cannot be done is marked
// bad, so that database/sql closes it instead of reusing it. The
// session's statement_timeout is as it was before, once it returns.
func (l *SessionLocker) SessionLock(ctx context.Context, conn *sql.Conn) error {
	var timeout, check, set string
	if err := conn.QueryRowContext(ctx, noTimeoutSQL).Scan(&timeout, &check, &set); err != nil {
		return fmt.Errorf("goosepglocks: lock %d: %w", l.id, err)
	}
	_, err := conn.ExecContext(ctx, waitSQL, l.id)
	if ctx.Err() != nil {
		// Even a wait that returned the lock: a driver may close the
		// connection as the context ends (lib/pq does, once the statement
		// is done), and with it the lock.
		err = ctx.Err()
	}
	cleanup, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	during := check // put back at once after a failed wait
	if err == nil && check != "" {
		during = "1000" // while the migrations run (see the statements)
	}
	if _, rerr := conn.ExecContext(cleanup, restoreSQL, timeout, during); rerr != nil && err == nil {
		err = rerr
	}
	if err != nil {
		l.letGo(cleanup, conn, check)
		return fmt.Errorf("goosepglocks: lock %d: %w", l.id, err)
	}
	l.mu.Lock()
	l.check[conn] = check
	l.mu.Unlock()
	return nil
}

// letGo makes conn hold nothing after a wait that failed: a cancelled wait
// may have been granted (the cancel crossing the grant), so the key is let
// go, on ctx; if that fails, conn is discarded.
func (l *SessionLocker) letGo(ctx context.Context, conn *sql.Conn, check string) {
	var held bool
	var set *string
	if err := conn.QueryRowContext(ctx, unlockSQL, l.id, check).Scan(&held, &set); err != nil {
		discard(conn)
	}
}

// SessionUnlock lets the key go on conn, and puts its
// client_connection_check_interval back. It returns an error if conn's
// session did not hold the key (it was never locked there, or the session
// was replaced: then the migrations it guarded may not have been alone), or
// if the unlock failed; conn is then marked bad, so that database/sql does
// not reuse a connection that may still hold the key.
func (l *SessionLocker) SessionUnlock(ctx context.Context, conn *sql.Conn) error {
	l.mu.Lock()
	check := l.check[conn] // "" if SessionLock did not run here
	delete(l.check, conn)
	l.mu.Unlock()
	var held bool
	var set *string
	if err := conn.QueryRowContext(ctx, unlockSQL, l.id, check).Scan(&held, &set); err != nil {
		discard(conn)
		return fmt.Errorf("goosepglocks: unlock %d: %w", l.id, err)
	}
	if !held {
		return fmt.Errorf("goosepglocks: unlock %d: %w", l.id, pglocks.ErrLockLost)
	}
	return nil
}

// discard marks conn bad: database/sql closes it when it is given back.
func discard(conn *sql.Conn) {
	_ = conn.Raw(func(any) error { return driver.ErrBadConn })
}

// Locker is goose's lock.Locker: it holds the key on a [pglocks.Locker]
// that it opens on goose's *sql.DB for each Lock (so it takes one more
// connection of that pool than goose does: a pool of one connection
// deadlocks), waiting in the server's queue, and closes it at Unlock. The
// Locker's heartbeat watches the lock while the migrations run; Unlock
// returns [pglocks.ErrLockLost] if it was lost, which goose's Up returns.
type Locker struct {
	cfg config

	mu   sync.Mutex
	held map[*sql.DB]*hold
}

// hold is one Lock's lock and its Locker.
type hold struct {
	l  *pglocks.Locker
	lk *pglocks.Lock
}

var _ lock.Locker = (*Locker)(nil)

// NewLocker returns a [Locker] for goose.WithLocker. It returns an error for
// the zero key.
func NewLocker(opts ...Option) (*Locker, error) {
	c := newConfig(opts)
	if _, ok := c.key.Int64(); !ok {
		if _, _, ok := c.key.Int32s(); !ok {
			return nil, fmt.Errorf("goosepglocks: NewLocker: %w", pglocks.ErrInvalidKey)
		}
	}
	return &Locker{cfg: c, held: map[*sql.DB]*hold{}}, nil
}

// Lock waits in the server's queue until the key is held for db's
// migrations, or until ctx is done. It returns an error if db already holds
// it through l (goose locks once per run).
func (l *Locker) Lock(ctx context.Context, db *sql.DB) error {
	l.mu.Lock()
	_, dup := l.held[db]
	l.mu.Unlock()
	if dup {
		return errors.New("goosepglocks: Lock: this *sql.DB holds the lock already")
	}
	pl, err := pglocks.NewDB(db, l.cfg.options...)
	if err != nil {
		return fmt.Errorf("goosepglocks: %w", err)
	}
	lk, err := pl.Lock(ctx, l.cfg.key, pglocks.Label("goose migrations"))
	if err != nil {
		_ = pl.Close()
		return fmt.Errorf("goosepglocks: %w", err)
	}
	l.mu.Lock()
	l.held[db] = &hold{pl, lk}
	l.mu.Unlock()
	return nil
}

// Unlock lets the key go and closes the Locker that Lock opened. It returns
// [pglocks.ErrLockLost] (wrapped) if the lock was lost while it was held:
// the migrations that ran since may not have been alone.
func (l *Locker) Unlock(ctx context.Context, db *sql.DB) error {
	l.mu.Lock()
	h := l.held[db]
	delete(l.held, db)
	l.mu.Unlock()
	if h == nil {
		return errors.New("goosepglocks: Unlock: this *sql.DB does not hold the lock")
	}
	err := h.lk.Release(ctx)
	if cerr := h.l.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("goosepglocks: unlock: %w", err)
	}
	return nil
}
