package pglocks

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"net"
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
	query(ctx context.Context, q string, args []any, dest ...any) error
	exec(ctx context.Context, q string, args ...any) error
	// cancel sends a cancel request for the statement running on the
	// session. It may be called while another goroutine runs that
	// statement. Only pgx connections can: for others it returns
	// errNoCancelRequest.
	cancel(ctx context.Context) error
	// pgConn returns pgx's connection under this session, or nil if the
	// driver is not pgx. It gives the socket and the pid of the
	// BackendKeyData, which differs from pg_backend_pid() behind a proxy.
	pgConn() *pgconn.PgConn
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

func (c *pgxConn) query(ctx context.Context, q string, args []any, dest ...any) error {
	return c.c.QueryRow(ctx, q, args...).Scan(dest...)
}

func (c *pgxConn) exec(ctx context.Context, q string, args ...any) error {
	_, err := c.c.Exec(ctx, q, args...)
	return err
}

func (c *pgxConn) cancel(ctx context.Context) error { return c.c.PgConn().CancelRequest(ctx) }

func (c *pgxConn) pgConn() *pgconn.PgConn { return c.c.PgConn() }

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
	sc := &sqlConn{c: c}
	_ = c.Raw(func(dc any) error {
		if p, ok := dc.(interface{ Conn() *pgx.Conn }); ok {
			sc.pg = p.Conn().PgConn()
		}
		return nil
	})
	return sc, nil
}

// sqlConn is a session taken from a *sql.DB, with any PostgreSQL driver.
type sqlConn struct {
	c *sql.Conn
	// pg is the driver's connection when it is pgx's stdlib. database/sql
	// says not to use it outside Raw; pglocks only reads its socket and
	// pid and sends cancel requests, which pgx itself does from another
	// goroutine.
	pg *pgconn.PgConn
}

func (c *sqlConn) query(ctx context.Context, q string, args []any, dest ...any) error {
	return c.c.QueryRowContext(ctx, q, args...).Scan(dest...)
}

func (c *sqlConn) exec(ctx context.Context, q string, args ...any) error {
	_, err := c.c.ExecContext(ctx, q, args...)
	return err
}

// cancel sends pgx's cancel request for pgx's stdlib driver. database/sql
// has no driver-independent cancel request.
func (c *sqlConn) cancel(ctx context.Context) error {
	if c.pg != nil {
		return c.pg.CancelRequest(ctx)
	}
	return errNoCancelRequest
}

// errNoCancelRequest says a driver cannot send a cancel request.
var errNoCancelRequest = errors.New("the driver cannot send a cancel request")

func (c *sqlConn) pgConn() *pgconn.PgConn { return c.pg }

func (c *sqlConn) destroy() {
	// Returning driver.ErrBadConn from Raw makes database/sql close the
	// driver connection instead of pooling it.
	_ = c.c.Raw(func(any) error { return driver.ErrBadConn })
	_ = c.c.Close()
}

func (c *sqlConn) release() { _ = c.c.Close() }

// tcpConn returns the TCP connection under a pgx connection, or nil (a Unix
// socket, or a driver that does not show it).
func tcpConn(pg *pgconn.PgConn) *net.TCPConn {
	if pg == nil {
		return nil
	}
	nc := pg.Conn()
	if u, ok := nc.(interface{ NetConn() net.Conn }); ok { // TLS
		nc = u.NetConn()
	}
	tc, _ := nc.(*net.TCPConn)
	return tc
}
