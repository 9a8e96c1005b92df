package goosepglocks_test

import (
	"context"
	"database/sql"
	"fmt"
	"io/fs"
	"os"

	"github.com/jackc/pgx/v5"
	"github.com/pressly/goose/v3"

	"github.com/pglocks/pglocks/goosepglocks"
)

// The examples are README.md's code, between the README markers (see
// DEVELOPERS.md); what comes before sets up what that code is handed.

// Three replicas start at once and migrate: each migration is applied
// once, the others waiting their turn in the server's queue.
func Example() {
	ctx := context.Background()
	dsn, done := exampleDB()
	defer done()
	errs := make(chan error, 3)
	for range 3 {
		db, err := sql.Open("pgx", dsn)
		if err != nil {
			panic(err)
		}
		defer db.Close()
		var migrations fs.FS = migrations(0)
		go func() {
			errs <- func() error {
				// README:begin
				locker, err := goosepglocks.NewSessionLocker()
				if err != nil {
					return err
				}
				p, err := goose.NewProvider(goose.DialectPostgres, db, migrations,
					goose.WithSessionLocker(locker))
				if err != nil {
					return err
				}
				_, err = p.Up(ctx)
				// README:end
				return err
			}()
		}()
	}
	for range 3 {
		if err := <-errs; err != nil {
			fmt.Println(err)
		}
	}
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		panic(err)
	}
	defer db.Close()
	var versions string
	if err := db.QueryRow("SELECT string_agg(version::text, ',' ORDER BY version) FROM applied").Scan(&versions); err != nil {
		panic(err)
	}
	fmt.Println("applied:", versions)
	// Output: applied: 1,2,3
}

// exampleDB returns a database of its own on the test server, and done,
// which prints the advisory locks left in it (failing the Example) and
// drops it.
func exampleDB() (dsn string, done func()) {
	ctx := context.Background()
	name := fmt.Sprintf("example_%d", os.Getpid())
	if _, err := srv.Admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		panic(err)
	}
	cfg, err := pgx.ParseConfig(srv.URL)
	if err != nil {
		panic(err)
	}
	dsn = fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Host, cfg.Port, name)
	return dsn, func() {
		left, err := srv.AdvisoryLocks(ctx, name)
		if err != nil {
			panic(err)
		}
		for _, l := range left {
			fmt.Println("left behind:", l)
		}
		if _, err := srv.Admin.Exec(ctx, "DROP DATABASE "+name+" WITH (FORCE)"); err != nil {
			panic(err)
		}
	}
}
