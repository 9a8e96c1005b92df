package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
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

// ls --tree shows a chain of waits as a tree: A holds 101 (and 103, and
// NAME tree-job's key); B holds 102 and waits for 101; C waits for 102; D
// waits for 101 too, behind B. B and D are under A, C under B, and D only
// under A: pg_blocking_pids names B as D's blocker too (B is ahead of it in
// the queue), but B does not hold 101. --json has exactly those edges, and
// gives each key as numbers with its label apart, and each wait's age to
// the millisecond.
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
	}{
		{a, "SELECT pg_advisory_lock(101), pg_advisory_lock(103), pg_advisory_lock(hashtextextended('tree-job', 0))"},
		{b, "SELECT pg_advisory_lock(102)"},
	} {
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
	wait(d, 101)
	waitFor(t, "the three waits", func() bool { return waitsIn(t, db) == 3 })

	stdout, stderr, code := pglocksRun(t, dsn, "ls", "--tree", "--name", "tree-job")
	if code != 0 {
		t.Fatalf("ls --tree: exit %d: %s", code, stderr)
	}
	t.Logf("ls --tree:\n%s", stdout)
	// Each line's pid and indentation; a line's parent is the nearest line
	// above it indented less.
	lines := strings.Split(strings.TrimRight(stdout, "\n"), "\n")
	indent := func(l string) int { return len(l) - len(strings.TrimLeft(l, " \\_")) }
	pids := make([]int, len(lines))
	parent := map[int]int{} // pid -> parent pid, 0 for a root
	line := map[int]string{}
	for i, l := range lines {
		if _, err := fmt.Sscan(strings.TrimLeft(l, " \\_"), &pids[i]); err != nil {
			t.Fatalf("line %q: no pid: %v\n%s", l, err, stdout)
		}
		if _, dup := line[pids[i]]; dup {
			t.Errorf("pid %d shown twice:\n%s", pids[i], stdout)
		}
		line[pids[i]] = l
		parent[pids[i]] = 0
		for j := i - 1; j >= 0; j-- {
			if indent(lines[j]) < indent(l) {
				parent[pids[i]] = pids[j]
				break
			}
		}
	}
	want := map[int]int{pa: 0, pb: pa, pd: pa, pc: pb}
	if len(lines) != 4 || pids[0] != pa || indent(lines[0]) != 0 || !maps.Equal(parent, want) {
		t.Errorf("tree: parents %v, want %v (A %d, B %d, C %d, D %d):\n%s", parent, want, pa, pb, pc, pd, stdout)
	}
	if indent(line[pb]) != indent(line[pd]) || indent(line[pc]) <= indent(line[pb]) {
		t.Errorf("B and D not level, or C not deeper than B:\n%s", stdout)
	}
	for _, want := range []struct {
		line, text string
	}{
		{line[pa], "tree-a"}, {line[pa], "101, 103"}, {line[pa], "holds "},
		{line[pa], fmt.Sprintf(" %s (tree-job)", pglocks.Name("tree-job"))},
		{line[pb], "tree-b"}, {line[pb], " (exclusive) for 101;"}, {line[pb], "holds 102"},
		{line[pc], "tree-c"}, {line[pc], " (exclusive) for 102"},
		{line[pd], "tree-d"}, {line[pd], " (exclusive) for 101"},
	} {
		if !strings.Contains(want.line, want.text) {
			t.Errorf("%q lacks %q", want.line, want.text)
		}
	}
	for _, pid := range []int{pb, pc, pd} {
		// "waits 35ms (exclusive) for", "waits 1.2s (exclusive) for"
		var age string
		if _, err := fmt.Sscanf(line[pid][strings.Index(line[pid], "waits "):], "waits %s (exclusive) for", &age); err != nil {
			t.Errorf("%q: no wait age: %v", line[pid], err)
		} else if d, err := time.ParseDuration(age); err != nil || d <= 0 || d > time.Minute {
			t.Errorf("%q: wait age %q", line[pid], age)
		}
	}

	stdout, _, code = pglocksRun(t, dsn, "ls", "--tree", "--json", "--name", "tree-job")
	if code != 0 {
		t.Fatal(code)
	}
	t.Logf("ls --tree --json:\n%s", stdout)
	// Ages to the millisecond: 1.234, not 1.2345678901.
	for _, m := range regexp.MustCompile(`"wait_seconds": ([0-9.e-]+)`).FindAllStringSubmatch(stdout, -1) {
		if !regexp.MustCompile(`^[0-9]+(\.[0-9]{1,3})?$`).MatchString(m[1]) {
			t.Errorf("wait_seconds %s: not to the millisecond", m[1])
		}
	}
	if strings.Contains(stdout, "[tree-job]") || strings.Contains(stdout, "(tree-job)") {
		t.Errorf("a key and its label in one string:\n%s", stdout)
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
	wantEdges := []string{fmt.Sprintf("%d>%d:101", pb, pa), fmt.Sprintf("%d>%d:101", pd, pa), fmt.Sprintf("%d>%d:102", pc, pb)}
	slices.Sort(wantEdges)
	if !slices.Equal(edges, wantEdges) {
		t.Errorf("edges %v, want %v", edges, wantEdges)
	}
	jobID, _ := pglocks.Name("tree-job").Int64()
	// waitsFor reports whether s waits for one bigint key, for a while.
	waitsFor := func(s treeSession, id int64) bool {
		return len(s.Waits) == 1 && s.Waits[0].Bigint != nil && *s.Waits[0].Bigint == id && s.Waits[0].Pair == nil &&
			s.Waits[0].Key == fmt.Sprint(id) && s.Waits[0].Mode == "exclusive" && s.Waits[0].WaitSeconds != nil && *s.Waits[0].WaitSeconds > 0
	}
	seen := map[int]bool{}
	for _, s := range tree.Sessions {
		seen[s.PID] = true
		var ok bool
		switch s.PID {
		case pa:
			ok = s.Application == "tree-a" && len(s.Waits) == 0 && len(s.Holds) == 3 &&
				slices.ContainsFunc(s.Holds, func(h lockRef) bool {
					return h.Bigint != nil && *h.Bigint == jobID && h.Key == fmt.Sprint(jobID) && h.Label == "tree-job"
				})
		case pb:
			ok = s.Application == "tree-b" && waitsFor(s, 101) && len(s.Holds) == 1 && *s.Holds[0].Bigint == 102 && s.Holds[0].Label == ""
		case pc:
			ok = s.Application == "tree-c" && waitsFor(s, 102) && len(s.Holds) == 0
		case pd:
			ok = s.Application == "tree-d" && waitsFor(s, 101) && len(s.Holds) == 0
		}
		if !ok {
			t.Errorf("session in --json: %+v", s)
		}
	}
	if len(seen) != 4 || len(tree.Sessions) != 4 {
		t.Errorf("--json sessions: %+v", tree.Sessions)
	}

	// Cancel C's and D's waits, let B through, and leave nothing.
	for _, c := range []*pgx.Conn{c, d} {
		if err := c.PgConn().CancelRequest(t.Context()); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err == nil || !strings.Contains(err.Error(), "57014") {
			t.Errorf("a cancelled wait: %v", err)
		}
	}
	if _, err := a.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for _, c := range []*pgx.Conn{a, b, c, d} {
		c.Close(t.Context())
	}
	waitFor(t, "no advisory locks left", func() bool { return len(locks(t, db)) == 0 })
}

// printTree stops where a cycle closes (a deadlock the server has yet to
// break), and shows a session blocked by two under each.
func TestTreeCycle(t *testing.T) {
	t.Parallel()
	tree := waitTree{
		Sessions: []treeSession{
			{PID: 1, Holds: []lockRef{{Key: "1"}}, Waits: []treeWait{{lockRef: lockRef{Key: "2"}, Mode: "exclusive"}}},
			{PID: 2, Holds: []lockRef{{Key: "2"}}, Waits: []treeWait{{lockRef: lockRef{Key: "1"}, Mode: "exclusive"}}},
			{PID: 3, Waits: []treeWait{{lockRef: lockRef{Key: "1"}, Mode: "exclusive"}}},
		},
		Edges: []treeEdge{{Waiter: 1, Holder: 2, lockRef: lockRef{Key: "2"}}, {Waiter: 2, Holder: 1, lockRef: lockRef{Key: "1"}},
			{Waiter: 3, Holder: 1, lockRef: lockRef{Key: "1"}}},
	}
	out := make(chan string, 1)
	go func() {
		var b strings.Builder
		printTree(&b, tree)
		out <- b.String()
	}()
	var got string
	select {
	case got = <-out:
	case <-time.After(5 * time.Second):
		t.Fatal("printTree loops on a cycle")
	}
	t.Logf("cycle:\n%s", got)
	lines := strings.Split(strings.TrimRight(got, "\n"), "\n")
	// 1, 2 under it, 1 again under 2 where the cycle closes (and nothing
	// under that), then 3 under the first 1.
	var pids []string
	for _, l := range lines {
		pids = append(pids, strings.Fields(strings.TrimLeft(l, " \\_"))[0])
	}
	if !slices.Equal(pids, []string{"1", "2", "1", "3"}) || !strings.Contains(lines[2], "cycle") || strings.Contains(lines[0], "cycle") {
		t.Errorf("cycle printed as:\n%s", got)
	}

	// Beside an ordinary root, the cycle is still printed.
	tree.Sessions = append(tree.Sessions, treeSession{PID: 4, Holds: []lockRef{{Key: "9"}}})
	var b strings.Builder
	printTree(&b, tree)
	for _, pid := range []string{"1 ", "2 ", "3 ", "4 "} {
		if !slices.ContainsFunc(strings.Split(b.String(), "\n"), func(l string) bool { return strings.HasPrefix(strings.TrimLeft(l, " \\_"), pid) }) {
			t.Errorf("pid %s missing beside another root:\n%s", pid, b.String())
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
	if code != 0 || !strings.Contains(stdout, db+": 3 held, 1 waiting") || !strings.Contains(stdout, fmt.Sprintf("of %d entries used (", capacity)) {
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
