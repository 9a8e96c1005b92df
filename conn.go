package pglocks

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// source hands out server sessions for the Locker's exclusive use: a
// pgxpool.Pool or a *sql.DB.
type source interface {
	acquire(ctx context.Context) (conn, error)
}

// conn is one server session, used by one goroutine at a time.
type conn interface {
	queryBool(ctx context.Context, q string, args ...any) (bool, error)
	exec(ctx context.Context, q string, args ...any) error
	// prepareCancel readies cancel; it is called before a wait starts.
	prepareCancel(ctx context.Context) error
	// cancel asks the server to cancel the statement running on the session.
	// It may be called while another goroutine runs that statement.
	cancel(ctx context.Context) error
	// destroy closes the session, which frees every lock it holds.
	destroy()
	// release gives the session back to its pool. Only a session that holds
	// no lock may be released.
	release()
}

// destroyTimeout bounds the polite close of a session we discard.
const destroyTimeout = 5 * time.Second

type pgxSource struct{ pool *pgxpool.Pool }

func (s pgxSource) acquire(ctx context.Context) (conn, error) {
	c, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	return &pgxConn{pc: c, c: c.Conn()}, nil
}

// pgxConn is a session taken from a pgxpool.Pool.
type pgxConn struct {
	pc *pgxpool.Conn
	c  *pgx.Conn // kept: pc.Conn() panics once pc is hijacked
}

func (c *pgxConn) queryBool(ctx context.Context, q string, args ...any) (b bool, err error) {
	err = c.c.QueryRow(ctx, q, args...).Scan(&b)
	return b, err
}

func (c *pgxConn) exec(ctx context.Context, q string, args ...any) error {
	_, err := c.c.Exec(ctx, q, args...)
	return err
}

func (c *pgxConn) prepareCancel(context.Context) error { return nil }

func (c *pgxConn) cancel(ctx context.Context) error { return c.c.PgConn().CancelRequest(ctx) }

func (c *pgxConn) destroy() {
	ctx, cancel := context.WithTimeout(context.Background(), destroyTimeout)
	defer cancel()
	_ = c.pc.Hijack().Close(ctx)
}

func (c *pgxConn) release() { c.pc.Release() }

type sqlSource struct{ db *sql.DB }

func (s sqlSource) acquire(ctx context.Context) (conn, error) {
	c, err := s.db.Conn(ctx)
	if err != nil {
		return nil, err
	}
	return &sqlConn{db: s.db, c: c}, nil
}

// sqlConn is a session taken from a *sql.DB, with any PostgreSQL driver.
type sqlConn struct {
	db  *sql.DB
	c   *sql.Conn
	pid int64 // the backend's pid, once prepareCancel has run
	// pg is the driver's connection when it is pgx's stdlib, whose cancel
	// request needs no pooled connection.
	pg *pgconn.PgConn
}

func (c *sqlConn) queryBool(ctx context.Context, q string, args ...any) (b bool, err error) {
	err = c.c.QueryRowContext(ctx, q, args...).Scan(&b)
	return b, err
}

func (c *sqlConn) exec(ctx context.Context, q string, args ...any) error {
	_, err := c.c.ExecContext(ctx, q, args...)
	return err
}

func (c *sqlConn) prepareCancel(ctx context.Context) error {
	if c.pid != 0 || c.pg != nil {
		return nil
	}
	_ = c.c.Raw(func(dc any) error {
		if p, ok := dc.(interface{ Conn() *pgx.Conn }); ok {
			c.pg = p.Conn().PgConn()
		}
		return nil
	})
	if c.pg != nil {
		return nil
	}
	return c.c.QueryRowContext(ctx, sqlBackendPID).Scan(&c.pid)
}

// cancel sends pgx's cancel request for pgx's stdlib driver, which is safe
// while the connection runs a statement (pgx's own context watcher does the
// same). database/sql has no driver-independent cancel, so for other drivers
// it runs pg_cancel_backend on another pooled session.
func (c *sqlConn) cancel(ctx context.Context) error {
	if c.pg != nil {
		return c.pg.CancelRequest(ctx)
	}
	if c.pid == 0 {
		return errors.New("pglocks: backend pid unknown")
	}
	_, err := c.db.ExecContext(ctx, sqlCancel, c.pid)
	return err
}

func (c *sqlConn) destroy() {
	// Returning driver.ErrBadConn from Raw makes database/sql close the
	// driver connection instead of pooling it.
	_ = c.c.Raw(func(any) error { return driver.ErrBadConn })
	_ = c.c.Close()
}

func (c *sqlConn) release() { _ = c.c.Close() }
