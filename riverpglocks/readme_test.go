package riverpglocks_test

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"

	"github.com/pglocks/pglocks"
)

// The Examples that run README.md's code (checked against it by the root
// module's TestREADMESnippets) are given a pool and a Locker here, as the
// root module's are.

var exampleSeq atomic.Int64

// exampleLocker returns a pool on a database of its own on the test server,
// with River's tables in it, and a Locker on that pool, for README code
// that is handed them. done closes the Locker, prints the advisory locks
// left in the database (failing the Example), and drops it.
func exampleLocker() (pool *pgxpool.Pool, locker *pglocks.Locker, done func()) {
	ctx := context.Background()
	name := fmt.Sprintf("example_%d_%d", os.Getpid(), exampleSeq.Add(1))
	if _, err := srv.Admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		panic(err)
	}
	cfg, err := pgx.ParseConfig(srv.URL)
	if err != nil {
		panic(err)
	}
	pool, err = pgxpool.New(ctx, fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", cfg.User, cfg.Host, cfg.Port, name))
	if err != nil {
		panic(err)
	}
	m, err := rivermigrate.New(riverpgxv5.New(pool), nil)
	if err != nil {
		panic(err)
	}
	if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		panic(err)
	}
	locker, err = pglocks.New(pool)
	if err != nil {
		panic(err)
	}
	return pool, locker, func() {
		if err := locker.Close(); err != nil {
			fmt.Println("Close:", err)
		}
		left, err := srv.AdvisoryLocks(ctx, name)
		if err != nil {
			panic(err)
		}
		for _, l := range left {
			fmt.Println("left behind:", l)
		}
		pool.Close()
		if _, err := srv.Admin.Exec(ctx, "DROP DATABASE "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			panic(err)
		}
	}
}
