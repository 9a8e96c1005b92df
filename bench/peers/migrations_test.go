package peers

import (
	"context"
	"database/sql"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/golang-migrate/migrate/v4"
	"github.com/golang-migrate/migrate/v4/database"
	"github.com/golang-migrate/migrate/v4/database/postgres"
	"github.com/golang-migrate/migrate/v4/source/iofs"
	"github.com/pressly/goose/v3/lock"

	"github.com/pglocks/pglocks"
)

// pglocks' keys of the migration tools are the tools' own: goose's
// DefaultLockID and golang-migrate's GenerateAdvisoryLockId, called here.
func TestMigrationKeysMatchTheTools(t *testing.T) {
	if k := pglocks.MigrationGoose(); k != pglocks.ID(lock.DefaultLockID) {
		t.Errorf("MigrationGoose() = %v, goose's DefaultLockID %d", k, lock.DefaultLockID)
	}
	for _, n := range [][3]string{
		{"postgres", "public", "schema_migrations"},
		{"app_production", "public", "schema_migrations"},
		{"x", "tenant", "migs"},
		{"ünïcode-db", "s", "t"},
		{"", "public", "schema_migrations"},
	} {
		want, err := database.GenerateAdvisoryLockId(n[0], n[1], n[2])
		if err != nil {
			t.Fatal(err)
		}
		if got := pglocks.MigrationGolangMigrate(n[0], n[1], n[2]); got.String() != want {
			t.Errorf("MigrationGolangMigrate(%q, %q, %q) = %v, golang-migrate's %s", n[0], n[1], n[2], got, want)
		}
	}
}

// pglocks ls names the lock of a golang-migrate run that it watches (a
// migration that takes two seconds), in the database it migrates.
func TestLsNamesGolangMigrateRun(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "pglocks")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/pglocks/pglocks/cmd/pglocks").CombinedOutput(); err != nil {
		t.Fatalf("building pglocks: %v\n%s", err, out)
	}
	dsn := srv.DB(t)
	dbName := dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	src, err := iofs.New(fstest.MapFS{
		"1_slow.up.sql":   {Data: []byte("SELECT pg_sleep(2); CREATE TABLE t (id int);")},
		"1_slow.down.sql": {Data: []byte("DROP TABLE t;")},
	}, ".")
	if err != nil {
		t.Fatal(err)
	}
	drv, err := postgres.WithInstance(db, &postgres.Config{})
	if err != nil {
		t.Fatal(err)
	}
	m, err := migrate.NewWithInstance("iofs", src, "postgres", drv)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- m.Up() }()
	label := "golang-migrate migrations (" + dbName + ")"
	var out []byte
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		cmd := exec.Command(bin, "ls")
		cmd.Env = append(os.Environ(), "DATABASE_URL="+dsn)
		out, _ = cmd.CombinedOutput()
		if strings.Contains(string(out), label) {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("pglocks ls never named %q:\n%s", label, out)
		}
	}
	if want := pglocks.MigrationGolangMigrate(dbName, "", "").String(); !strings.Contains(string(out), want) {
		t.Errorf("ls does not show golang-migrate's key %s:\n%s", want, out)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	_, _ = m.Close()
	left, err := srv.AdvisoryLocks(context.Background(), dbName)
	if err != nil || len(left) != 0 {
		t.Fatalf("left behind: %v %v", left, err)
	}
}
