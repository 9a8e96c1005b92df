package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

// session opens a plain session named app.
func session(t *testing.T, dsn, app string) (*pgx.Conn, int) {
	t.Helper()
	c, err := pgx.Connect(context.Background(), dsn+"&application_name="+app)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	var pid int
	if err := c.QueryRow(t.Context(), "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return c, pid
}

// waitsIn counts the advisory waits in db.
func waitsIn(t *testing.T, db string) int {
	n := 0
	for _, r := range locks(t, db) {
		if !r.granted {
			n++
		}
	}
	return n
}

// ls --tree shows a chain of waits as a tree: A holds 101 and 103; B holds
// 102 and waits for 101; C waits for 102; D waits for 103. C is under B,
// which is under A with D; --json has exactly those edges.
func TestTree(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	a, pa := session(t, dsn, "tree-a")
	b, pb := session(t, dsn, "tree-b")
	c, pc := session(t, dsn, "tree-c")
	d, pd := session(t, dsn, "tree-d")
	for _, q := range []struct {
		c *pgx.Conn
		q string
	}{{a, "SELECT pg_advisory_lock(101), pg_advisory_lock(103)"}, {b, "SELECT pg_advisory_lock(102)"}} {
		if _, err := q.c.Exec(t.Context(), q.q); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 3)
	wait := func(c *pgx.Conn, key int) {
		go func() {
			_, err := c.Exec(context.Background(), fmt.Sprintf("SELECT pg_advisory_lock(%d)", key))
			done <- err
		}()
	}
	wait(b, 101)
	waitFor(t, "B's wait", func() bool { return waitsIn(t, db) == 1 })
	wait(c, 102)
	wait(d, 103)
	waitFor(t, "the three waits", func() bool { return waitsIn(t, db) == 3 })

	stdout, stderr, code := pglocksRun(t, dsn, "ls", "--tree")
	if code != 0 {
		t.Fatalf("ls --tree: exit %d: %s", code, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	t.Logf("ls --tree:\n%s", stdout)
	find := func(pid int) (int, string) {
		for i, l := range lines {
			if strings.HasPrefix(strings.TrimLeft(l, " \\_"), fmt.Sprint(pid)+" ") {
				return i, l
			}
		}
		t.Fatalf("pid %d not in:\n%s", pid, stdout)
		return 0, ""
	}
	indent := func(l string) int { return len(l) - len(strings.TrimLeft(l, " \\_")) }
	ia, la := find(pa)
	ib, lb := find(pb)
	ic, lc := find(pc)
	id, ld := find(pd)
	if len(lines) != 4 || ia != 0 || indent(la) != 0 {
		t.Errorf("A is not the only root, first:\n%s", stdout)
	}
	if indent(lb) <= indent(la) || indent(ld) != indent(lb) || !(ib > ia && id > ia) {
		t.Errorf("B and D are not under A:\n%s", stdout)
	}
	if indent(lc) <= indent(lb) || ic != ib+1 {
		t.Errorf("C is not under B:\n%s", stdout)
	}
	for _, want := range []struct {
		line, text string
	}{{la, "tree-a"}, {la, "holds 101, 103"}, {lb, "waits "}, {lb, "for 101 (exclusive)"}, {lb, "holds 102"}, {lc, "for 102"}, {ld, "for 103"}} {
		if !strings.Contains(want.line, want.text) {
			t.Errorf("%q lacks %q", want.line, want.text)
		}
	}

	stdout, _, code = pglocksRun(t, dsn, "ls", "--tree", "--json")
	if code != 0 {
		t.Fatal(code)
	}
	var tree waitTree
	if err := json.Unmarshal([]byte(stdout), &tree); err != nil {
		t.Fatalf("--json: %v\n%s", err, stdout)
	}
	var edges []string
	for _, e := range tree.Edges {
		edges = append(edges, fmt.Sprintf("%d>%d:%s", e.Waiter, e.Holder, e.Key))
	}
	slices.Sort(edges)
	want := []string{fmt.Sprintf("%d>%d:101", pb, pa), fmt.Sprintf("%d>%d:102", pc, pb), fmt.Sprintf("%d>%d:103", pd, pa)}
	slices.Sort(want)
	if !slices.Equal(edges, want) {
		t.Errorf("edges %v, want %v", edges, want)
	}
	for _, s := range tree.Sessions {
		if s.PID == pb && (s.WaitsFor != "101" || s.Application != "tree-b" || s.WaitSeconds <= 0 || !slices.Equal(s.Holds, []string{"102"})) {
			t.Errorf("B in --json: %+v", s)
		}
	}

	// Let them through, and leave nothing: A's unlock lets B and D in,
	// then B's lets C in.
	if _, err := a.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for _, c := range []*pgx.Conn{c, d} {
		if _, err := c.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
			t.Fatal(err)
		}
	}
}

// ls --stats counts held and waiting advisory locks per database, and the
// lock table's fill against its capacity.
func TestStats(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	a, _ := session(t, dsn, "stats-a")
	b, _ := session(t, dsn, "stats-b")
	if _, err := a.Exec(t.Context(), "SELECT pg_advisory_lock(1), pg_advisory_lock(2), pg_advisory_lock(3, 4)"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := b.Exec(context.Background(), "SELECT pg_advisory_lock(1)")
		done <- err
	}()
	waitFor(t, "the wait", func() bool { return waitsIn(t, db) == 1 })
	stdout, stderr, code := pglocksRun(t, dsn, "ls", "--stats", "--json")
	if code != 0 {
		t.Fatalf("ls --stats: exit %d: %s", code, stderr)
	}
	var s lockStats
	if err := json.Unmarshal([]byte(stdout), &s); err != nil {
		t.Fatalf("--json: %v\n%s", err, stdout)
	}
	i := slices.IndexFunc(s.Databases, func(d dbStats) bool { return d.Database == db })
	if i < 0 || s.Databases[i].Held != 3 || s.Databases[i].Waiting != 1 {
		t.Errorf("stats for %s: %+v", db, s.Databases)
	}
	var capacity int
	if err := a.QueryRow(t.Context(), `SELECT current_setting('max_locks_per_transaction')::int *
		(current_setting('max_connections')::int + current_setting('max_prepared_transactions')::int)`).Scan(&capacity); err != nil {
		t.Fatal(err)
	}
	if f := s.LockTable; f.Capacity != capacity || f.Used < 4 || f.Percent <= 0 {
		t.Errorf("lock table: %+v, capacity %d", f, capacity)
	}
	stdout, _, code = pglocksRun(t, dsn, "ls", "--stats")
	if code != 0 || !strings.Contains(stdout, db+": 3 held, 1 waiting") || !strings.Contains(stdout, fmt.Sprintf("of %d (", capacity)) {
		t.Errorf("ls --stats: exit %d:\n%s", code, stdout)
	}
	t.Logf("ls --stats:\n%s", stdout)
	if _, err := a.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := b.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
}
