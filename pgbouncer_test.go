package pglocks_test

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// 6. Through PgBouncer in transaction pooling, session locks would stay on a
// server session that other clients then use: they fail with
// ErrTransactionPooling and nothing is held. Transaction locks work through
// it, and session pooling works.
func TestPgBouncer(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{})
	direct, err := pgx.Connect(t.Context(), fs.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(context.Background())
	// tryDirect reports whether a session straight to the server could take
	// ID(n), and lets it go again.
	tryDirect := func(t *testing.T, n int64) bool {
		t.Helper()
		var ok bool
		if err := direct.QueryRow(t.Context(), "SELECT pg_try_advisory_lock($1)", n).Scan(&ok); err != nil {
			t.Fatal(err)
		}
		if ok {
			if _, err := direct.Exec(t.Context(), "SELECT pg_advisory_unlock($1)", n); err != nil {
				t.Fatal(err)
			}
		}
		return ok
	}

	t.Run("transaction pooling", func(t *testing.T) {
		b, err := fs.StartPgBouncer("transaction")
		if err != nil {
			t.Fatal(err)
		}
		defer b.Stop()
		for _, d := range drivers {
			t.Run(d.name, func(t *testing.T) {
				l := lockerOn(t, d, bouncerURL(b, d))
				_, err = l.Lock(t.Context(), pglocks.ID(1))
				wantErr(t, err, pglocks.ErrTransactionPooling)
				_, err = l.TryLock(t.Context(), pglocks.ID(1))
				wantErr(t, err, pglocks.ErrTransactionPooling)
				if locks := serverLocks(t, fs); len(locks) != 0 {
					t.Fatalf("locks left on the server: %v", locks)
				}
			})
		}
		// Transaction locks work through transaction pooling.
		c, err := pgx.Connect(t.Context(), b.URL)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(context.Background())
		err = pgx.BeginFunc(t.Context(), c, func(tx pgx.Tx) error {
			if err := pglocks.LockTx(t.Context(), tx, pglocks.ID(2)); err != nil {
				return err
			}
			if tryDirect(t, 2) {
				t.Error("a transaction lock through PgBouncer excluded nothing")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !tryDirect(t, 2) {
			t.Error("the transaction lock outlived its transaction")
		}
	})

	t.Run("session pooling", func(t *testing.T) {
		b, err := fs.StartPgBouncer("session")
		if err != nil {
			t.Fatal(err)
		}
		defer b.Stop()
		for _, d := range drivers {
			t.Run(d.name, func(t *testing.T) {
				l := lockerOn(t, d, bouncerURL(b, d))
				lk := mustLock(t, l, pglocks.ID(3))
				if tryDirect(t, 3) {
					t.Error("a session lock through session pooling excluded nothing")
				}
				mustRelease(t, lk)
				if !tryDirect(t, 3) {
					t.Error("released, yet still held")
				}
			})
		}
	})
}

// bouncerURL is b's URL for driver d: lib/pq would send pgx's parameter to
// PgBouncer as a startup parameter, which PgBouncer refuses.
func bouncerURL(b *pgtest.PgBouncer, d driver) string {
	if d.name == "libpq" {
		return strings.Replace(b.URL, "&default_query_exec_mode=simple_protocol", "", 1)
	}
	return b.URL
}
