package goosepglocks_test

import (
	"bufio"
	"context"
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/pglocks/pglocks/goosepglocks"
)

// migrateEnv makes the test binary a migrating process instead of the
// tests: its value is the DSN, and migrateSleepEnv how long the second
// migration sleeps.
const (
	migrateEnv      = "GOOSEPGLOCKS_MIGRATE"
	migrateSleepEnv = "GOOSEPGLOCKS_SLEEP"
)

func init() {
	// Before TestMain: a migrating process starts no test server.
	if dsn := os.Getenv(migrateEnv); dsn != "" {
		os.Exit(migrateMain(dsn))
	}
}

// migrateMain migrates the database of dsn with goosepglocks' session
// locker, as a replica does at start, and prints how many migrations it
// applied.
func migrateMain(dsn string) int {
	sleep, _ := time.ParseDuration(os.Getenv(migrateSleepEnv))
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer db.Close()
	locker, err := goosepglocks.NewSessionLocker()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations(sleep), goose.WithSessionLocker(locker))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("started")
	res, err := p.Up(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("applied", len(res))
	return 0
}

// migrator is a migrating process.
type migrator struct {
	cmd  *exec.Cmd
	out  chan string // its stdout lines
	done chan error
}

func startMigrator(t *testing.T, dsn string, sleep time.Duration) *migrator {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), migrateEnv+"="+dsn, migrateSleepEnv+"="+sleep.String())
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	m := &migrator{cmd: cmd, out: make(chan string, 16), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			m.out <- sc.Text()
		}
		close(m.out)
		m.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		for range m.out {
		}
		<-m.done
	})
	return m
}

// applied waits for m to exit and returns how many migrations it applied.
func (m *migrator) applied(t *testing.T) int {
	t.Helper()
	n := -1
	timeout := time.After(60 * time.Second)
	for {
		select {
		case line, ok := <-m.out:
			if !ok {
				if err := <-m.done; err != nil {
					t.Fatalf("migrating process: %v", err)
				}
				m.done <- nil
				return n
			}
			fmt.Sscanf(line, "applied %d", &n)
		case <-timeout:
			t.Fatal("a migrating process did not finish within 60 s")
		}
	}
}

// Four processes migrate one database at once: each migration is applied
// once, by one of them.
func TestProcessesMigrateOnce(t *testing.T) {
	t.Parallel()
	dsn := srv.DB(t)
	stop := watchWaits(t, dsn, gooseKey)
	var ms []*migrator
	for range 4 {
		ms = append(ms, startMigrator(t, dsn, time.Second))
	}
	total := 0
	for _, m := range ms {
		total += m.applied(t)
	}
	if !stop() {
		t.Error("no process was seen waiting in the server's queue")
	}
	if total != 3 {
		t.Errorf("the processes applied %d migrations, want 3", total)
	}
	checkApplied(t, dsn, "1,2,3")
}

// A process SIGKILLed in the middle of a long migration frees goose's key
// within about a second (its backend notices that its client is gone,
// rolls the migration back and ends), not when the statement would have
// ended: the process waiting behind it then applies what is left, once.
func TestKilledMigratorFreesTheKey(t *testing.T) {
	t.Parallel()
	dsn := srv.DB(t)
	first := startMigrator(t, dsn, time.Minute)
	// Once it has applied the first migration and sleeps in the second,
	// holding the key, another process starts and waits.
	db := dbOf(dsn)
	waitUntil(t, "the first process to sleep in its second migration", func() bool {
		var n int
		_ = srv.Admin.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = $1 AND query LIKE '%pg_sleep(60)%' AND state = 'active'`, db).Scan(&n)
		return n > 0
	})
	second := startMigrator(t, dsn, 0)
	waitUntil(t, "the second process to wait for goose's key", func() bool {
		var n int
		_ = srv.Admin.QueryRow(context.Background(), `SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
			WHERE d.datname = $1 AND l.locktype = 'advisory' AND NOT l.granted AND l.objid = $2`, db, uint32(lock.DefaultLockID)).Scan(&n)
		return n > 0
	})
	killed := time.Now()
	if err := first.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if n := second.applied(t); n != 2 {
		t.Errorf("the second process applied %d migrations, want 2 (the killed one's second was rolled back)", n)
	}
	if d := time.Since(killed); d > 20*time.Second {
		t.Errorf("the second process finished %v after the first was killed, in its minute-long migration", d)
	}
	t.Logf("the waiting process finished %v after the holder was SIGKILLed", time.Since(killed).Round(time.Millisecond))
	checkApplied(t, dsn, "1,2,3")
}

func dbOf(dsn string) string { return dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")] }

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(30 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("gave up waiting for %s", what)
		}
	}
}

func checkApplied(t *testing.T, dsn, want string) {
	t.Helper()
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var versions string
	if err := db.QueryRow("SELECT string_agg(version::text, ',' ORDER BY version) FROM applied").Scan(&versions); err != nil || versions != want {
		t.Errorf("applied: %q, %v; want %s", versions, err, want)
	}
}
