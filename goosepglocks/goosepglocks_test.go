package goosepglocks_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	_ "github.com/lib/pq"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/goosepglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

var srv *pgtest.Server

func TestMain(m *testing.M) { pgtest.Main(m, &srv, pgtest.CheckLeaks) }

// drivers are the database/sql drivers goose users run on PostgreSQL.
var drivers = []string{"pgx", "postgres"}

func openDB(t *testing.T, driver, dsn string) *sql.DB {
	t.Helper()
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// migrations are three goose SQL migrations; the second takes a second, so
// that providers started together overlap. Each records itself in applied,
// whose primary key fails a migration applied twice.
func migrations(sleep time.Duration) fstest.MapFS {
	return fstest.MapFS{
		"00001_applied.sql": {Data: []byte(`-- +goose Up
CREATE TABLE applied (version int PRIMARY KEY, by_pid int NOT NULL DEFAULT pg_backend_pid());
INSERT INTO applied (version) VALUES (1);
-- +goose Down
DROP TABLE applied;
`)},
		"00002_slow.sql": {Data: []byte(fmt.Sprintf(`-- +goose Up
SELECT pg_sleep(%g);
INSERT INTO applied (version) VALUES (2);
-- +goose Down
DELETE FROM applied WHERE version = 2;
`, sleep.Seconds()))},
		"00003_more.sql": {Data: []byte(`-- +goose Up
CREATE TABLE more (id int);
INSERT INTO applied (version) VALUES (3);
-- +goose Down
DROP TABLE more;
`)},
	}
}

func provider(t *testing.T, db *sql.DB, fsys fstest.MapFS, opt goose.ProviderOption) *goose.Provider {
	t.Helper()
	p, err := goose.NewProvider(goose.DialectPostgres, db, fsys, opt)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// gooseKey is goose's own key, as goose has it.
var gooseKey = pglocks.ID(lock.DefaultLockID)

// watchWaits reports, once stop is called, whether a session was seen
// waiting in the server's queue for key in the database of dsn.
func watchWaits(t *testing.T, dsn string, key pglocks.Key) (stop func() bool) {
	t.Helper()
	id, _ := key.Int64()
	db := dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]
	var seen atomic.Bool
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			var n int
			err := srv.Admin.QueryRow(context.Background(), `
				SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
				WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = $1
				  AND ((l.classid::bigint << 32) | l.objid::bigint) = $2 AND l.objsubid = 1`, db, id).Scan(&n)
			if err == nil && n > 0 {
				seen.Store(true)
			}
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	})
	return func() bool {
		close(done)
		wg.Wait()
		return seen.Load()
	}
}

// Six providers on six pools migrate one database at once, as six replicas
// starting together do: each migration is applied exactly once, the others
// wait in the server's queue (not polling), and nothing is left held.
func TestProvidersMigrateOnce(t *testing.T) {
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			t.Parallel()
			dsn := srv.DB(t)
			locker, err := goosepglocks.NewSessionLocker()
			if err != nil {
				t.Fatal(err)
			}
			fsys := migrations(time.Second)
			stop := watchWaits(t, dsn, gooseKey)
			var wg sync.WaitGroup
			var applied atomic.Int64
			errs := make(chan error, 6)
			for range 6 {
				p := provider(t, openDB(t, driver, dsn), fsys, goose.WithSessionLocker(locker))
				wg.Go(func() {
					res, err := p.Up(context.Background())
					applied.Add(int64(len(res)))
					errs <- err
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatalf("Up: %v", err)
				}
			}
			if !stop() {
				t.Error("no provider was seen waiting in the server's queue for goose's key")
			}
			if n := applied.Load(); n != 3 {
				t.Errorf("%d migrations applied across the providers, want 3", n)
			}
			db := openDB(t, driver, dsn)
			var versions string
			if err := db.QueryRow("SELECT string_agg(version::text, ',' ORDER BY version) FROM applied").Scan(&versions); err != nil || versions != "1,2,3" {
				t.Errorf("applied: %q, %v; want 1,2,3", versions, err)
			}
		})
	}
}

// goose's own session locker and this one take the same key: a provider
// with this one waits while one with goose's migrates, and each migration
// is applied once.
func TestExcludesGooseOwnLocker(t *testing.T) {
	t.Parallel()
	dsn := srv.DB(t)
	fsys := migrations(time.Second)
	theirs, err := lock.NewPostgresSessionLocker()
	if err != nil {
		t.Fatal(err)
	}
	ours, err := goosepglocks.NewSessionLocker()
	if err != nil {
		t.Fatal(err)
	}
	first := provider(t, openDB(t, "pgx", dsn), fsys, goose.WithSessionLocker(theirs))
	second := provider(t, openDB(t, "pgx", dsn), fsys, goose.WithSessionLocker(ours))
	stop := watchWaits(t, dsn, gooseKey)
	firstDone := make(chan error, 1)
	go func() {
		_, err := first.Up(context.Background())
		firstDone <- err
	}()
	// Once goose's locker holds its key (the first migration applied),
	// start ours.
	admin := openDB(t, "pgx", dsn)
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		var n int
		_ = admin.QueryRow("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = $1", uint32(lock.DefaultLockID)).Scan(&n)
		if n > 0 {
			break
		}
		if time.Now().After(end) {
			t.Fatal("goose's own locker never took its key")
		}
	}
	res, err := second.Up(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := <-firstDone; err != nil {
		t.Fatal(err)
	}
	if !stop() {
		t.Error("ours did not wait in the server's queue behind goose's own locker")
	}
	if len(res) != 0 {
		t.Errorf("ours applied %d migrations that goose's had applied", len(res))
	}
}

// A wait that ends without the lock leaves nothing: deadlines landing
// around the moment the holder lets go (the grant and the cancel crossing),
// on both drivers; a SessionLock that returned an error leaves no lock on
// its connection, given back to database/sql's pool or not.
func TestSessionLockGivesUpCleanly(t *testing.T) {
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			t.Parallel()
			dsn := srv.DB(t)
			db := openDB(t, driver, dsn)
			holderDB := openDB(t, "pgx", dsn)
			locker, err := goosepglocks.NewSessionLocker()
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			var got, gaveUp int
			for i := range 40 {
				holder, err := holderDB.Conn(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := holder.ExecContext(ctx, "SELECT pg_advisory_lock($1)", lock.DefaultLockID); err != nil {
					t.Fatal(err)
				}
				conn, err := db.Conn(ctx)
				if err != nil {
					t.Fatal(err)
				}
				// The holder lets go 20 ms in; the wait's deadline lands
				// from 2 ms before that to 2 ms after.
				wait := 18*time.Millisecond + time.Duration(i%5)*time.Millisecond
				time.AfterFunc(20*time.Millisecond, func() {
					_, _ = holder.ExecContext(ctx, "SELECT pg_advisory_unlock($1)", lock.DefaultLockID)
					holder.Close()
				})
				wctx, cancel := context.WithTimeout(ctx, wait)
				err = locker.SessionLock(wctx, conn)
				cancel()
				if err == nil {
					got++
					if err := locker.SessionUnlock(ctx, conn); err != nil {
						t.Fatalf("SessionUnlock: %v", err)
					}
				} else {
					gaveUp++
					if !errors.Is(err, context.DeadlineExceeded) {
						t.Fatalf("SessionLock with a deadline: %v, want context.DeadlineExceeded", err)
					}
				}
				conn.Close()
				// Nothing held once both are given back.
				for end := time.Now().Add(5 * time.Second); ; time.Sleep(2 * time.Millisecond) {
					left, err := srv.AdvisoryLocks(ctx, dsn[strings.LastIndex(dsn, "/")+1:strings.Index(dsn, "?")])
					if err != nil {
						t.Fatal(err)
					}
					if len(left) == 0 {
						break
					}
					if time.Now().After(end) {
						t.Fatalf("round %d (err %v): left behind: %v", i, err, left)
					}
				}
			}
			t.Logf("%s: %d waits got the lock, %d gave up", driver, got, gaveUp)
			if gaveUp == 0 {
				t.Error("no wait gave up: the test's deadlines did not land before the grant")
			}
		})
	}
}

// A role's or database's lock_timeout and statement_timeout do not end the
// wait: it lasts as long as goose's context.
func TestWaitOutlivesTimeouts(t *testing.T) {
	t.Parallel()
	dsn := srv.DB(t)
	dbName := dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]
	if _, err := srv.Admin.Exec(context.Background(), fmt.Sprintf(
		"ALTER DATABASE %s SET lock_timeout = '50ms'; ALTER DATABASE %s SET statement_timeout = '50ms'", dbName, dbName)); err != nil {
		t.Fatal(err)
	}
	for _, driver := range drivers {
		db := openDB(t, driver, dsn)
		ctx := context.Background()
		holder, err := db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := holder.ExecContext(ctx, "SELECT set_config('statement_timeout', '0', false), pg_advisory_lock($1)", lock.DefaultLockID); err != nil {
			t.Fatal(err)
		}
		time.AfterFunc(400*time.Millisecond, func() {
			_, _ = holder.ExecContext(ctx, "SELECT pg_advisory_unlock($1)", lock.DefaultLockID)
			holder.Close()
		})
		locker, _ := goosepglocks.NewSessionLocker()
		conn, err := db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		began := time.Now()
		if err := locker.SessionLock(ctx, conn); err != nil {
			t.Fatalf("%s: SessionLock under a 50 ms lock_timeout and statement_timeout: %v", driver, err)
		}
		if d := time.Since(began); d < 300*time.Millisecond {
			t.Fatalf("%s: got the lock after %v, while the holder held it for 400 ms", driver, d)
		}
		// The timeouts were turned off for the wait's statement only.
		var lt string
		if err := conn.QueryRowContext(ctx, "SHOW lock_timeout").Scan(&lt); err != nil || lt != "50ms" {
			t.Errorf("%s: lock_timeout after the wait: %q, %v; want the database's 50ms", driver, lt, err)
		}
		if err := locker.SessionUnlock(ctx, conn); err != nil {
			t.Fatal(err)
		}
		conn.Close()
	}
}

// goose.WithLocker: providers migrate once each way, and a lock lost while
// the migrations run is Unlock's error, which Up returns.
func TestLocker(t *testing.T) {
	t.Parallel()
	dsn := srv.DB(t)
	locker, err := goosepglocks.NewLocker()
	if err != nil {
		t.Fatal(err)
	}
	fsys := migrations(500 * time.Millisecond)
	var wg sync.WaitGroup
	var applied atomic.Int64
	for range 3 {
		p := provider(t, openDB(t, "pgx", dsn), fsys, goose.WithLocker(locker))
		wg.Go(func() {
			res, err := p.Up(context.Background())
			if err != nil {
				t.Errorf("Up: %v", err)
			}
			applied.Add(int64(len(res)))
		})
	}
	wg.Wait()
	if n := applied.Load(); n != 3 {
		t.Errorf("%d migrations applied, want 3", n)
	}

	// Lost: the holder's session is ended while a migration sleeps.
	dsn = srv.DB(t)
	db := openDB(t, "pgx", dsn)
	p := provider(t, db, migrations(2*time.Second), goose.WithLocker(locker))
	done := make(chan error, 1)
	go func() {
		_, err := p.Up(context.Background())
		done <- err
	}()
	dbName := dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		var n int
		err := srv.Admin.QueryRow(context.Background(), `
			SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
			WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1 AND l.objid = $2`, dbName, uint32(lock.DefaultLockID)).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			break
		}
		if time.Now().After(end) {
			t.Fatal("the Locker never took goose's key")
		}
	}
	if err := <-done; !errors.Is(err, pglocks.ErrLockLost) && !errors.Is(err, pglocks.ErrSessionEnded) {
		t.Fatalf("Up after the lock's session was ended: %v, want pglocks.ErrLockLost", err)
	}
}

func TestBadInput(t *testing.T) {
	if l, err := goosepglocks.NewSessionLocker(goosepglocks.WithKey(pglocks.Pair(1, 2))); err == nil || l != nil {
		t.Errorf("NewSessionLocker with a pair key: %v, %v", l, err)
	}
	if l, err := goosepglocks.NewSessionLocker(goosepglocks.WithKey(pglocks.Key{})); err == nil || l != nil {
		t.Errorf("NewSessionLocker with the zero key: %v, %v", l, err)
	}
	if l, err := goosepglocks.NewSessionLocker(goosepglocks.WithLockerOptions(pglocks.WithMaxConns(2))); err == nil || l != nil {
		t.Errorf("NewSessionLocker with Locker options: %v, %v", l, err)
	}
	if l, err := goosepglocks.NewLocker(goosepglocks.WithKey(pglocks.Key{})); !errors.Is(err, pglocks.ErrInvalidKey) || l != nil {
		t.Errorf("NewLocker with the zero key: %v, %v", l, err)
	}

	// Unlocking what this session does not hold says so.
	dsn := srv.DB(t)
	db := openDB(t, "pgx", dsn)
	conn, err := db.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	s, _ := goosepglocks.NewSessionLocker()
	if err := s.SessionUnlock(context.Background(), conn); !errors.Is(err, pglocks.ErrLockLost) {
		t.Errorf("SessionUnlock without SessionLock: %v, want pglocks.ErrLockLost", err)
	}
	l, _ := goosepglocks.NewLocker()
	if err := l.Unlock(context.Background(), db); err == nil {
		t.Error("Locker.Unlock without Lock: nil")
	}
}

// The key goose takes by default is pglocks' MigrationGoose, and `pglocks
// ls` names it while a goose run migrates (with goose's own locker or this
// one).
func TestLsNamesGooseRun(t *testing.T) {
	t.Parallel()
	if pglocks.MigrationGoose() != gooseKey {
		t.Fatalf("pglocks.MigrationGoose() = %v, goose's DefaultLockID is %d", pglocks.MigrationGoose(), lock.DefaultLockID)
	}
	bin := filepath.Join(t.TempDir(), "pglocks")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/pglocks/pglocks/cmd/pglocks").CombinedOutput(); err != nil {
		t.Fatalf("building pglocks: %v\n%s", err, out)
	}
	ours, _ := goosepglocks.NewSessionLocker()
	theirs, _ := lock.NewPostgresSessionLocker()
	for _, l := range []lock.SessionLocker{theirs, ours} {
		dsn := srv.DB(t)
		p := provider(t, openDB(t, "pgx", dsn), migrations(2*time.Second), goose.WithSessionLocker(l))
		done := make(chan error, 1)
		go func() {
			_, err := p.Up(context.Background())
			done <- err
		}()
		var out []byte
		for end := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			cmd := exec.Command(bin, "ls")
			cmd.Env = append(os.Environ(), "DATABASE_URL="+dsn)
			out, _ = cmd.CombinedOutput()
			if strings.Contains(string(out), "goose migrations") {
				break
			}
			if time.Now().After(end) {
				t.Fatalf("pglocks ls never named goose's lock (%T):\n%s", l, out)
			}
		}
		if !strings.Contains(string(out), "4097083626") {
			t.Errorf("ls: %s", out)
		}
		t.Logf("pglocks ls while goose migrates (%T):\n%s", l, out)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}
