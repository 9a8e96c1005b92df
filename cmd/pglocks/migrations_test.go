package main

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
)

// holdID holds pg_advisory_lock(id) from a plain session, as a migration
// tool does while it migrates.
func holdID(t *testing.T, dsn string, id int64) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), dsn+"&application_name=migrator")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	if _, err := c.Exec(context.Background(), "SELECT pg_advisory_lock($1)", id); err != nil {
		t.Fatal(err)
	}
	return c
}

// ls labels the migration tools' keys without --name, each for the
// database it lists; run -k SCHEME -- COMMAND waits for a migration in
// progress (the tool's key held) and runs COMMAND once it is done.
func TestMigrationKeys(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	tools := []struct {
		scheme, label string
		key           pglocks.Key
	}{
		{"goose", "goose migrations", pglocks.MigrationGoose()},
		{"golang-migrate", "golang-migrate migrations (" + db + ")", pglocks.MigrationGolangMigrate(db, "", "")},
		{"rails-migrations", "rails migrations (" + db + ")", pglocks.MigrationRails(db)},
		{"prisma", "prisma migrations", pglocks.MigrationPrisma()},
	}
	for _, tool := range tools {
		id, _ := tool.key.Int64()
		migrator := holdID(t, dsn, id)
		var row *lockInfo
		for _, l := range lsJSON(t, dsn) {
			if l.Key == tool.key.String() {
				row = &l
			}
		}
		if row == nil || row.Label != tool.label || row.Application != "migrator" {
			t.Fatalf("ls while %s migrates: want key %v labelled %q, held by migrator; got %+v", tool.scheme, tool.key, tool.label, row)
		}
		out, _, code := pglocksRun(t, dsn, "ls")
		if l, ok := lineWith(out, tool.key.String(), tool.label); !ok || !strings.Contains(l, "migrator") {
			t.Fatalf("ls's table does not label %v as %q:\n%s", tool.key, tool.label, out)
		}
		if code != 0 {
			t.Fatalf("ls: exit %d", code)
		}

		// run waits while the migration holds the key, then runs.
		p := start(t, dsn, "run", "-k", tool.scheme, "--", "echo", "started")
		waitFor(t, "run to wait for "+tool.label, func() bool { return waiting(t, db) })
		if s := p.stdout.String(); s != "" {
			t.Fatalf("run -k %s ran COMMAND while the migration held its key: %q", tool.scheme, s)
		}
		if !strings.Contains(p.stderr.String(), "waiting for "+tool.label) {
			waitFor(t, "run to say what it waits for", func() bool {
				return strings.Contains(p.stderr.String(), "waiting for "+tool.label)
			})
		}
		if _, err := migrator.Exec(context.Background(), "SELECT pg_advisory_unlock($1)", id); err != nil {
			t.Fatal(err)
		}
		if code := p.wait(t); code != 0 || p.stdout.String() != "started\n" {
			t.Fatalf("run -k %s after the migration: exit %d, stdout %q, stderr %s", tool.scheme, code, p.stdout.String(), p.stderr.String())
		}
		if left := locks(t, db); len(left) != 0 {
			t.Fatalf("left behind: %v", left)
		}
	}

	// A database's key may name the database; goose's and prisma's take no
	// NAME.
	if _, stderr, code := pglocksRun(t, dsn, "run", "-k", "goose", "x", "--", "true"); code != exitUsage || !strings.Contains(stderr, "takes no NAME") {
		t.Fatalf("run -k goose x: exit %d, %s", code, stderr)
	}
	other := pglocks.MigrationRails("other_db")
	out, _, code := pglocksRun(t, dsn, "key", "-k", "rails-migrations", "other_db")
	if id, _ := other.Int64(); code != 0 || !strings.Contains(out, "rails migrations (other_db)") || !strings.Contains(out, "SELECT pg_advisory_lock("+other.String()+")") || id == 0 {
		t.Fatalf("key -k rails-migrations other_db: exit %d:\n%s", code, out)
	}
	if _, stderr, code := pglocksRun(t, dsn, "run", "--", "true"); code != exitUsage || !strings.Contains(stderr, "missing NAME") {
		t.Fatalf("run -- true (scheme name): exit %d, %s", code, stderr)
	}
}
