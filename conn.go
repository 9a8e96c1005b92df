package pglocks

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// source hands out server sessions for the Locker's exclusive use: a
// pgxpool.Pool or a *sql.DB.
type source interface {
	acquire(ctx context.Context) (conn, error)
	// maxConns is the most sessions the pool opens, or 0 for no limit.
	maxConns() int
	// exhausted reports whether a session taken from the pool now would
	// have to wait for one to be given back: every session it may open is
	// open and in use.
	exhausted() bool
	// activity changes when the application uses the pool (a count of
	// acquires where the driver keeps one): the Locker checks for pressure
	// often while it changes, and backs off while it does not.
	activity() uint64
}

// conn is one server session, used by one goroutine at a time. What the
// drivers can do differs; the capabilities say what this one can, so that
// nothing else in pglocks needs to know the driver.
type conn interface {
	query(ctx context.Context, q string, args []any, dest ...any) error
	exec(ctx context.Context, q string, args ...any) error

	// pipelines reports whether batch sends many statements in one round
	// trip (pgx); otherwise batch is not to be called.
	pipelines() bool
	// batch runs the statements in one round trip, scanning the row each
	// returns into its dest. It returns the index of the first statement
	// that failed (the server skips those after it) and its error, or -1,
	// and the error that ended the batch.
	batch(ctx context.Context, rows []row) (failed int, err, closeErr error)

	// interruptible reports whether a statement stops when its ctx ends
	// (pgx closes the socket). lib/pq instead sends a cancel request and
	// waits for the server's answer, which a silent network never brings.
	interruptible() bool
	// cancel sends a cancel request for the statement running on the
	// session, and may be called while another goroutine runs it. Drivers
	// that cannot return errNoCancelRequest.
	cancel(ctx context.Context) error
	// backendPID is the pid of the BackendKeyData, which differs from
	// pg_backend_pid() behind a proxy; ok is false when the driver does not
	// show it.
	backendPID() (pid uint32, ok bool)
	// tcp is the session's TCP connection, or nil (a Unix socket, or a
	// driver that does not show it).
	tcp() *net.TCPConn

	// watchable reports whether the session's socket can be read while it
	// is idle (see watch.go): waitIdle and setReadDeadline work.
	watchable() bool
	// waitIdle reads the idle session until a notification arrives (it is
	// returned), the read deadline passes (an error for which
	// pgconn.Timeout is true; the session stays usable), or the session
	// ends. Notifications that arrived during earlier statements are
	// returned first.
	waitIdle(ctx context.Context) (*pgconn.Notification, error)
	setReadDeadline(t time.Time) error
	// closeSocket closes the socket under a statement that runs too long, so
	// that it fails. It may be called from another goroutine.
	closeSocket()

	// simple makes every later statement go by the simple protocol, with its
	// arguments as literals, whatever the driver or the application's
	// QueryExecMode: no prepared statement and no portal outlives the
	// statement. For a pinned session (see sql.go): a pooler's server session
	// may not keep a prepared statement, and a portal left open keeps its
	// snapshot, and so a backend_xmin, while the session idles.
	simple()

	// forget drops what pglocks prepared on the session, before release.
	forget(ctx context.Context) error

	// destroy closes the session, which frees every lock it holds.
	destroy()
	// release gives the session back to its pool. Only a session that holds
	// no lock may be released.
	release()
}

// row is one statement of a batch.
type row struct {
	q    string
	args []any
	dest []any
}

// errNoCancelRequest says a driver cannot send a cancel request.
var errNoCancelRequest = errors.New("the driver cannot send a cancel request")

// destroyTimeout bounds the polite close of a session we discard.
const destroyTimeout = 5 * time.Second

type pgxSource struct{ p *pgxpool.Pool }

func (s pgxSource) acquire(ctx context.Context) (conn, error) {
	c, err := s.p.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	return &pgxConn{pc: c, pgxSession: pgxSession{c: c.Conn()}}, nil
}

func (s pgxSource) maxConns() int { return int(s.p.Config().MaxConns) }

func (s pgxSource) exhausted() bool {
	st := s.p.Stat()
	return st.IdleConns() == 0 && st.TotalConns() >= st.MaxConns()
}

func (s pgxSource) activity() uint64 { return uint64(s.p.Stat().AcquireCount()) }

// pgxSession is what pgx's connection can do, for pgxpool and for pgx's
// stdlib driver alike.
type pgxSession struct {
	c          *pgx.Conn // kept: pgxpool.Conn.Conn() panics once it is hijacked
	simpleMode bool      // see conn.simple
	fast       fastConn  // the hot statements, sent through pgconn (fast.go)
}

// fastQuery reports whether q goes through s.fast: a hot statement, and
// the session's statements may be prepared.
func (s *pgxSession) fastQuery(q string) bool { return !s.simpleMode && hot[q] }

// forget drops the statements s.fast prepared, before the session goes
// back to its pool.
func (s *pgxSession) forget(ctx context.Context) error {
	q := s.fast.deallocate()
	if q == "" {
		return nil
	}
	if err := s.c.PgConn().Exec(ctx, q).Close(); err != nil {
		return err
	}
	s.fast.stmts = nil
	return nil
}

// args are a statement's arguments as pgx takes them: after
// QueryExecModeSimpleProtocol once simple was called.
func (s *pgxSession) args(args []any) []any {
	if !s.simpleMode {
		return args
	}
	return append([]any{pgx.QueryExecModeSimpleProtocol}, args...)
}

func (s *pgxSession) simple() { s.simpleMode = true }

func (s *pgxSession) pipelines() bool     { return true }
func (s *pgxSession) interruptible() bool { return true }
func (s *pgxSession) watchable() bool     { return true }

func (s *pgxSession) batch(ctx context.Context, rows []row) (failed int, err, closeErr error) {
	if !s.simpleMode && s.fast.usable(rows) {
		return s.fast.batch(ctx, s.c.PgConn(), rows)
	}
	b := &pgx.Batch{}
	for _, r := range rows {
		b.Queue(r.q, r.args...)
	}
	br := s.c.SendBatch(ctx, b)
	failed = -1
	for i, r := range rows {
		if len(r.dest) == 0 {
			_, err = br.Exec() // a statement that returns no row (SAVEPOINT)
		} else {
			err = br.QueryRow().Scan(r.dest...)
		}
		if err != nil {
			failed = i
			break
		}
	}
	return failed, err, br.Close()
}

func (s *pgxSession) cancel(ctx context.Context) error { return s.c.PgConn().CancelRequest(ctx) }

func (s *pgxSession) backendPID() (uint32, bool) { return s.c.PgConn().PID(), true }

func (s *pgxSession) tcp() *net.TCPConn { return tcpConn(s.c.PgConn().Conn()) }

func (s *pgxSession) waitIdle(ctx context.Context) (*pgconn.Notification, error) {
	return s.c.WaitForNotification(ctx)
}

func (s *pgxSession) setReadDeadline(t time.Time) error {
	return s.c.PgConn().Conn().SetReadDeadline(t)
}

func (s *pgxSession) closeSocket() { _ = s.c.PgConn().Conn().Close() }

// pgxConn is a session taken from a pgxpool.Pool.
type pgxConn struct {
	pc *pgxpool.Conn
	pgxSession
}

func (c *pgxConn) query(ctx context.Context, q string, args []any, dest ...any) error {
	if c.fastQuery(q) {
		return c.fast.query(ctx, c.c.PgConn(), q, args, dest)
	}
	return c.c.QueryRow(ctx, q, c.args(args)...).Scan(dest...)
}

func (c *pgxConn) exec(ctx context.Context, q string, args ...any) error {
	_, err := c.c.Exec(ctx, q, c.args(args)...)
	return err
}

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
			sc.pgx = &pgxSession{c: p.Conn()}
		}
		return nil
	})
	return sc, nil
}

func (s sqlSource) maxConns() int { return s.db.Stats().MaxOpenConnections }

func (s sqlSource) exhausted() bool {
	st := s.db.Stats()
	return st.MaxOpenConnections > 0 && st.Idle == 0 && st.OpenConnections >= st.MaxOpenConnections
}

// activity is what database/sql counts that moves as the application uses
// it: no count of acquires, so the connections in use and the waits.
func (s sqlSource) activity() uint64 {
	st := s.db.Stats()
	return uint64(st.InUse)<<48 ^ uint64(st.OpenConnections)<<32 ^ uint64(st.WaitCount)
}

// sqlConn is a session taken from a *sql.DB, with any PostgreSQL driver.
type sqlConn struct {
	c *sql.Conn
	// pgx is the driver's connection when it is pgx's stdlib. database/sql
	// says not to use it outside Raw; pglocks uses it only while it holds
	// the *sql.Conn, to read its socket while it is idle, to pipeline and
	// to send cancel requests, which pgx itself does from another
	// goroutine.
	pgx        *pgxSession
	simpleMode bool // see conn.simple
	// pinned is set by simple, which only a pinned session calls.
	pinned bool
}

func (c *sqlConn) query(ctx context.Context, q string, args []any, dest ...any) error {
	if c.pgx != nil && c.pgx.fastQuery(q) {
		return c.pgx.fast.query(ctx, c.pgx.c.PgConn(), q, args, dest)
	}
	q, args, err := c.args(q, args)
	if err != nil {
		return err
	}
	return c.c.QueryRowContext(ctx, q, args...).Scan(dest...)
}

func (c *sqlConn) exec(ctx context.Context, q string, args ...any) error {
	q, args, err := c.args(q, args)
	if err != nil {
		return err
	}
	_, err = c.c.ExecContext(ctx, q, args...)
	return err
}

// args are a statement and its arguments as the driver takes them: pgx's
// stdlib passes QueryExecModeSimpleProtocol on to pgx once simple was
// called. Other drivers (lib/pq) get the arguments as literals in the
// statement's text, always: lib/pq sends a statement with arguments as a
// Parse and a Describe, waits for the answer, then binds and executes it,
// two round trips; without arguments it uses the simple protocol, one.
func (c *sqlConn) args(q string, args []any) (string, []any, error) {
	switch {
	case len(args) == 0, !c.simpleMode && c.pgx != nil:
		return q, args, nil
	case c.pgx != nil:
		return q, append([]any{pgx.QueryExecModeSimpleProtocol}, args...), nil
	}
	q, err := inline(q, args)
	return q, nil, err
}

func (c *sqlConn) simple() {
	c.simpleMode, c.pinned = true, true
	if c.pgx != nil {
		c.pgx.simple()
	}
}

// pipelines: pgx's stdlib pipelines; other drivers send a batch as one
// query of several statements by the simple protocol, with the arguments as
// literals, except on a pinned session (whose batches have statements that
// return no row, which lib/pq does not tell apart).
func (c *sqlConn) pipelines() bool     { return c.pgx != nil || !c.pinned }
func (c *sqlConn) interruptible() bool { return c.pgx != nil }
func (c *sqlConn) watchable() bool     { return c.pgx != nil }

func (c *sqlConn) batch(ctx context.Context, rows []row) (int, error, error) {
	if c.pgx != nil {
		return c.pgx.batch(ctx, rows)
	}
	var q strings.Builder
	for i, r := range rows {
		rq, err := inline(r.q, r.args)
		if err != nil {
			return i, err, nil
		}
		if i > 0 {
			q.WriteString("; ")
		}
		q.WriteString(rq)
	}
	rs, err := c.c.QueryContext(ctx, q.String())
	if err != nil {
		if sqlState(err) != "" {
			return 0, err, nil // the first statement failed
		}
		return -1, nil, err
	}
	// One result set a statement, each of one row.
	for i, r := range rows {
		if i > 0 && !rs.NextResultSet() || !rs.Next() {
			err := rs.Err()
			if err == nil {
				err = fmt.Errorf("statement %d of a batch returned no row", i+1)
			}
			return i, err, rs.Close()
		}
		if err := rs.Scan(r.dest...); err != nil {
			_ = rs.Close()
			return i, err, nil
		}
		for rs.Next() { // to the set's end: only then is the next one read
		}
		if err := rs.Err(); err != nil {
			// After the set's row: the statement's own error, or, after
			// the last, the implicit transaction's at its commit (a
			// notification queue full), which undid what the batch did.
			_ = rs.Close()
			if i == len(rows)-1 {
				return -1, nil, err
			}
			return i, err, nil
		}
	}
	return -1, nil, rs.Close()
}

// cancel sends pgx's cancel request for pgx's stdlib driver. database/sql
// has no driver-independent cancel request.
func (c *sqlConn) cancel(ctx context.Context) error {
	if c.pgx != nil {
		return c.pgx.cancel(ctx)
	}
	return errNoCancelRequest
}

func (c *sqlConn) backendPID() (uint32, bool) {
	if c.pgx != nil {
		return c.pgx.backendPID()
	}
	return 0, false
}

func (c *sqlConn) tcp() *net.TCPConn {
	if c.pgx != nil {
		return c.pgx.tcp()
	}
	return nil
}

func (c *sqlConn) waitIdle(ctx context.Context) (*pgconn.Notification, error) {
	return c.pgx.waitIdle(ctx)
}

func (c *sqlConn) setReadDeadline(t time.Time) error { return c.pgx.setReadDeadline(t) }

func (c *sqlConn) forget(ctx context.Context) error {
	if c.pgx != nil {
		return c.pgx.forget(ctx)
	}
	return nil
}

func (c *sqlConn) closeSocket() {
	if c.pgx != nil {
		c.pgx.closeSocket()
	}
}

func (c *sqlConn) destroy() {
	// Returning driver.ErrBadConn from Raw makes database/sql close the
	// driver connection instead of pooling it.
	_ = c.c.Raw(func(any) error { return driver.ErrBadConn })
	_ = c.c.Close()
}

func (c *sqlConn) release() { _ = c.c.Close() }

// tcpConn returns the TCP connection under nc, or nil (a Unix socket).
func tcpConn(nc net.Conn) *net.TCPConn {
	if u, ok := nc.(interface{ NetConn() net.Conn }); ok { // TLS
		nc = u.NetConn()
	}
	tc, _ := nc.(*net.TCPConn)
	return tc
}

// inline replaces the parameters $1, $2, ... of q by args as SQL literals.
// It knows the values pglocks sends: integers, booleans, strings (nil:
// NULL). A string literal is written E'...' with quotes and backslashes
// doubled, which reads the same whatever standard_conforming_strings says.
func inline(q string, args []any) (string, error) {
	lits := make([]string, len(args))
	for i, a := range args {
		if v, ok := a.(driver.Valuer); ok { // sql.NullString
			var err error
			if a, err = v.Value(); err != nil {
				return "", err
			}
		}
		switch v := a.(type) {
		case nil:
			lits[i] = "NULL"
		case int64:
			lits[i] = strconv.FormatInt(v, 10)
		case int32:
			lits[i] = strconv.FormatInt(int64(v), 10)
		case int:
			lits[i] = strconv.Itoa(v)
		case bool:
			lits[i] = strconv.FormatBool(v)
		case string:
			lits[i] = "E'" + strings.NewReplacer(`\`, `\\`, `'`, `''`).Replace(v) + "'"
		default:
			return "", fmt.Errorf("pglocks: cannot send %T as a literal", a)
		}
	}
	// Highest first, so that $1 does not match the start of $10.
	for i := len(lits) - 1; i >= 0; i-- {
		q = strings.ReplaceAll(q, "$"+strconv.Itoa(i+1), lits[i])
	}
	return q, nil
}
