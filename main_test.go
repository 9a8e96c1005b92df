package pglocks_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	_ "github.com/lib/pq"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

var srv *pgtest.Server

func TestMain(m *testing.M) {
	if h := os.Getenv("PGLOCKS_HELPER"); h != "" {
		// A process started by a test (see helpers).
		os.Exit(runHelper(h))
	}
	pgtest.Main(m, &srv, pgtest.CheckLeaks)
}

// helpers are what a test can run in a process of its own, by name.
var helpers = map[string]func() error{
	"lockall": lockAllHelper,
}

func runHelper(name string) int {
	f := helpers[name]
	if f == nil {
		fmt.Fprintf(os.Stderr, "unknown helper %q\n", name)
		return 2
	}
	if err := f(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// driver is one way to reach PostgreSQL that the Locker supports.
type driver struct {
	name string
	// open opens a pool on dsn with at most max connections, shared by a
	// Locker and the application.
	open func(t *testing.T, dsn string, max int) testPool
	// beginOn starts a transaction on a new connection to dsn, closed
	// with e.
	beginOn func(t *testing.T, e *env, dsn string) testTx
}

// testPool is a pool that a Locker and the application share.
type testPool struct {
	newLocker func(...pglocks.Option) (*pglocks.Locker, error)
	close     func()
	// acquire takes a connection of the pool for the application, as its
	// own queries do, and runs SELECT 1 on it.
	acquire func(ctx context.Context) (release func(), err error)
}

// pool opens a pool on dsn, for a Locker, with at most max connections.
func (d driver) pool(t *testing.T, dsn string, max int) (newLocker func(...pglocks.Option) (*pglocks.Locker, error), closePool func()) {
	p := d.open(t, dsn, max)
	return p.newLocker, p.close
}

// begin starts a transaction on a new connection to e's database.
func (d driver) begin(t *testing.T, e *env) testTx { return d.beginOn(t, e, e.dsn) }

// testTx is a transaction of either driver family.
type testTx interface {
	lock(ctx context.Context, key pglocks.Key, wait bool, opts ...pglocks.LockOption) error
	exec(ctx context.Context, q string) error
	queryString(ctx context.Context, q string) (string, error)
	commit() error
	rollback() error
}

var drivers = []driver{
	{
		name: "pgxpool",
		open: func(t *testing.T, dsn string, max int) testPool {
			cfg, err := pgxpool.ParseConfig(dsn)
			if err != nil {
				t.Fatal(err)
			}
			cfg.MaxConns = int32(max)
			p, err := pgxpool.NewWithConfig(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			return testPool{
				newLocker: func(o ...pglocks.Option) (*pglocks.Locker, error) { return pglocks.New(p, o...) },
				close:     p.Close,
				acquire: func(ctx context.Context) (func(), error) {
					c, err := p.Acquire(ctx)
					if err != nil {
						return nil, err
					}
					if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
						c.Release()
						return nil, err
					}
					return c.Release, nil
				},
			}
		},
		beginOn: func(t *testing.T, e *env, dsn string) testTx {
			c, err := pgx.Connect(context.Background(), dsn)
			if err != nil {
				t.Fatal(err)
			}
			tx, err := c.Begin(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			x := &pgxTestTx{c: c, tx: tx}
			e.onClose(func() { _ = tx.Rollback(context.Background()); _ = c.Close(context.Background()) })
			return x
		},
	},
	sqlDriver("stdlib", "pgx"),
	sqlDriver("libpq", "postgres"),
}

func sqlDriver(name, driverName string) driver {
	open := func(t *testing.T, dsn string, max int) *sql.DB {
		db, err := sql.Open(driverName, dsn)
		if err != nil {
			t.Fatal(err)
		}
		db.SetMaxOpenConns(max)
		return db
	}
	return driver{
		name: name,
		open: func(t *testing.T, dsn string, max int) testPool {
			db := open(t, dsn, max)
			return testPool{
				newLocker: func(o ...pglocks.Option) (*pglocks.Locker, error) { return pglocks.NewDB(db, o...) },
				close:     func() { _ = db.Close() },
				acquire: func(ctx context.Context) (func(), error) {
					c, err := db.Conn(ctx)
					if err != nil {
						return nil, err
					}
					if _, err := c.ExecContext(ctx, "SELECT 1"); err != nil {
						_ = c.Close()
						return nil, err
					}
					return func() { _ = c.Close() }, nil
				},
			}
		},
		beginOn: func(t *testing.T, e *env, dsn string) testTx {
			db := open(t, dsn, 1)
			tx, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			e.onClose(func() { _ = tx.Rollback(); _ = db.Close() })
			return &sqlTestTx{tx: tx}
		},
	}
}

var _ = stdlib.GetDefaultDriver // registers "pgx" with database/sql

type pgxTestTx struct {
	c  *pgx.Conn
	tx pgx.Tx
}

func (x *pgxTestTx) lock(ctx context.Context, key pglocks.Key, wait bool, opts ...pglocks.LockOption) error {
	if wait {
		return pglocks.LockTx(ctx, x.tx, key, opts...)
	}
	return pglocks.TryLockTx(ctx, x.tx, key, opts...)
}
func (x *pgxTestTx) exec(ctx context.Context, q string) error {
	_, err := x.tx.Exec(ctx, q)
	return err
}
func (x *pgxTestTx) queryString(ctx context.Context, q string) (s string, err error) {
	err = x.tx.QueryRow(ctx, q).Scan(&s)
	return s, err
}
func (x *pgxTestTx) commit() error   { return x.tx.Commit(context.Background()) }
func (x *pgxTestTx) rollback() error { return x.tx.Rollback(context.Background()) }

type sqlTestTx struct{ tx *sql.Tx }

func (x *sqlTestTx) lock(ctx context.Context, key pglocks.Key, wait bool, opts ...pglocks.LockOption) error {
	if wait {
		return pglocks.LockSQLTx(ctx, x.tx, key, opts...)
	}
	return pglocks.TryLockSQLTx(ctx, x.tx, key, opts...)
}
func (x *sqlTestTx) exec(ctx context.Context, q string) error {
	_, err := x.tx.ExecContext(ctx, q)
	return err
}
func (x *sqlTestTx) queryString(ctx context.Context, q string) (s string, err error) {
	err = x.tx.QueryRowContext(ctx, q).Scan(&s)
	return s, err
}
func (x *sqlTestTx) commit() error   { return x.tx.Commit() }
func (x *sqlTestTx) rollback() error { return x.tx.Rollback() }

// env is one test's database, reached through one driver.
type env struct {
	t      *testing.T
	drv    driver
	db     string // database name
	dsn    string
	mu     sync.Mutex
	closes []func()
}

// forEachDriver runs f as a parallel subtest for every driver, each in a
// database of its own. When f ends, the env closes the Lockers it made,
// checks (with their pools still open) that no advisory lock is left in the
// database, then closes the pools.
func forEachDriver(t *testing.T, f func(t *testing.T, e *env)) {
	t.Parallel()
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) {
			t.Parallel()
			f(t, newEnv(t, d))
		})
	}
}

func newEnv(t *testing.T, d driver) *env {
	dsn := srv.DB(t)
	e := &env{t: t, drv: d, dsn: dsn, db: dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]}
	t.Cleanup(func() {
		e.mu.Lock()
		closes := e.closes
		e.mu.Unlock()
		// Lockers first (they were added last), then the lock check, then pools.
		for i := len(closes) - 1; i >= 0; i-- {
			closes[i]()
		}
	})
	e.onClose(func() {
		if left := waitNoLocks(e, 3*time.Second); len(left) > 0 {
			t.Errorf("advisory locks left behind:\n%s", strings.Join(left, "\n"))
		}
	})
	return e
}

func (e *env) onClose(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.closes = append(e.closes, f)
}

// locker returns a new Locker on a new pool of at most max connections: a
// separate set of server sessions.
func (e *env) locker(max int, opts ...pglocks.Option) *pglocks.Locker {
	e.t.Helper()
	newLocker, closePool := e.drv.pool(e.t, e.dsn, max)
	e.onClose(closePool)
	l, err := newLocker(opts...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.onClose(func() { _ = l.Close() })
	return l
}

// lockerOn opens a Locker through d on a pool of its own on dsn; both are
// closed when t ends, the Locker first.
func lockerOn(t *testing.T, d driver, dsn string, opts ...pglocks.Option) *pglocks.Locker {
	t.Helper()
	newLocker, closePool := d.pool(t, dsn, 4)
	t.Cleanup(closePool)
	l, err := newLocker(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func waitNoLocks(e *env, d time.Duration) []string {
	end := time.Now().Add(d)
	for {
		left, err := srv.AdvisoryLocks(context.Background(), e.db)
		if err != nil {
			return []string{err.Error()}
		}
		if len(left) == 0 || time.Now().After(end) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// lockRow is one advisory lock in pg_locks.
type lockRow struct {
	pid     int
	key     string // "bigint N" or "pair A,B"
	mode    string
	granted bool
}

// locks returns the advisory locks in e's database.
func (e *env) locks() []lockRow {
	e.t.Helper()
	rows, err := srv.Admin.Query(context.Background(), `
		SELECT l.pid,
		       CASE l.objsubid WHEN 1 THEN 'bigint ' || ((l.classid::bigint << 32) | l.objid::bigint)
		                       ELSE 'pair ' || l.classid::int4 || ',' || l.objid::bigint::bit(32)::int4 END,
		       l.mode, l.granted
		FROM pg_locks l JOIN pg_database d ON d.oid = l.database
		WHERE l.locktype = 'advisory' AND d.datname = $1
		ORDER BY 1, 2`, e.db)
	if err != nil {
		e.t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (x lockRow, err error) {
		err = r.Scan(&x.pid, &x.key, &x.mode, &x.granted)
		return x, err
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// backends returns how many server sessions are connected to e's database,
// not counting the admin pool.
func (e *env) backends() int {
	e.t.Helper()
	var n int
	err := srv.Admin.QueryRow(context.Background(),
		`SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'`, e.db).Scan(&n)
	if err != nil {
		e.t.Fatal(err)
	}
	return n
}

// waitFor polls cond until it holds or d passes. It is for waiting on the
// server's view of things (a waiter showing up in pg_locks), never a timed
// assertion: d is generous.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(d)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("gave up after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waiting reports whether some session waits for key in e's database.
func (e *env) waiting(key string) bool {
	for _, r := range e.locks() {
		if r.key == key && !r.granted {
			return true
		}
	}
	return false
}

// held returns the pids that hold key.
func (e *env) held(key string) []int {
	var pids []int
	for _, r := range e.locks() {
		if r.key == key && r.granted {
			pids = append(pids, r.pid)
		}
	}
	return pids
}

// testKey returns a key unique to t (and n).
func testKey(t *testing.T, n int) pglocks.Key { return pglocks.Name(fmt.Sprintf("%s#%d", t.Name(), n)) }

func bigint(k pglocks.Key) string { return "bigint " + k.String() }

func mustLock(t *testing.T, l *pglocks.Locker, key pglocks.Key, opts ...pglocks.LockOption) *pglocks.Lock {
	t.Helper()
	lk, err := l.Lock(t.Context(), key, opts...)
	if err != nil {
		t.Fatalf("Lock(%v): %v", key, err)
	}
	return lk
}

func mustRelease(t *testing.T, lk *pglocks.Lock) {
	t.Helper()
	if err := lk.Release(context.Background()); err != nil {
		t.Fatalf("Release(%v): %v", lk.Key(), err)
	}
}

func wantErr(t *testing.T, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("got error %v, want one matching %v", err, target)
	}
}

// rawConn returns a plain pgx connection to e's database, closed with e.
func (e *env) rawConn(t *testing.T) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), e.dsn)
	if err != nil {
		t.Fatal(err)
	}
	e.onClose(func() { _ = c.Close(context.Background()) })
	return c
}

// appName returns the application_name of the session with pid.
func (e *env) appName(pid int) string {
	e.t.Helper()
	var name string
	if err := srv.Admin.QueryRow(context.Background(), "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid).Scan(&name); err != nil {
		e.t.Fatal(err)
	}
	return name
}

// appNames returns the application_name of every session on e's database.
func (e *env) appNames() []string {
	e.t.Helper()
	rows, err := srv.Admin.Query(context.Background(), "SELECT application_name FROM pg_stat_activity WHERE datname = $1", e.db)
	if err != nil {
		e.t.Fatal(err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		e.t.Fatal(err)
	}
	return names
}
