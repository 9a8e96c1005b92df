package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

// lsJSON runs ls --json with args and decodes its rows.
func lsJSON(t *testing.T, dsn string, args ...string) []lockInfo {
	t.Helper()
	stdout, stderr, code := pglocksRun(t, dsn, append([]string{"ls", "--json"}, args...)...)
	var rows []lockInfo
	if err := json.Unmarshal([]byte(stdout), &rows); err != nil || code != 0 {
		t.Fatalf("ls --json %v: exit %d, %v: %s %s", args, code, err, stdout, stderr)
	}
	return rows
}

// lineWith returns the first line of out that contains every one of subs.
func lineWith(out string, subs ...string) (string, bool) {
	for _, l := range strings.Split(out, "\n") {
		if !slices.ContainsFunc(subs, func(s string) bool { return !strings.Contains(l, s) }) {
			return l, true
		}
	}
	return "", false
}

// A wait for any of NAME's slots is not in pg_locks: it waits in its
// process (multiplexed). ls --name asks for it, and shows it under NAME in
// the table, the tree, JSON and --stats, blocked by the slots' holders.
func TestLsSlotWaiters(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	name := "slot-job"
	var ps []*proc
	for range 3 {
		ps = append(ps, start(t, dsn, "run", "--slots", "2", name, "--", "sh", "-c", "echo ready; exec sleep 60"))
	}
	waitFor(t, "two holders", func() bool {
		n := 0
		for _, p := range ps {
			if strings.Contains(p.stdout.String(), "ready") {
				n++
			}
		}
		return n == 2
	})
	var holders []int
	for _, r := range locks(t, db) {
		if r.granted {
			holders = append(holders, r.pid)
		}
	}
	slices.Sort(holders)
	if len(holders) != 2 || waitsIn(t, db) != 0 {
		t.Fatalf("want two slots held and no wait in pg_locks: %v", locks(t, db))
	}
	label := name + "[any of 2 slots]"

	var row lockInfo
	waitFor(t, "ls --json to show the waiter", func() bool {
		for _, l := range lsJSON(t, dsn, "--name", name) {
			if l.Multiplexed {
				row = l
				return true
			}
		}
		return false
	})
	if row.Granted || row.Name != name || row.Slots != 2 || row.Slot != nil || row.Label != label || row.Mode != "exclusive" ||
		row.Key != "" || row.Bigint != nil || row.Pair != nil || slices.Contains(holders, row.PID) || !row.Since.IsZero() ||
		!strings.HasPrefix(row.Application, "pglocks run "+name+" on ") || !slices.Equal(row.BlockedBy, holders) {
		t.Errorf("the waiter's row: %+v; want %s, blocked by %v", row, label, holders)
	}
	pid := fmt.Sprint(row.PID)

	var table string
	waitFor(t, "ls to show the waiter", func() bool {
		table, _, _ = pglocksRun(t, dsn, "ls", "--name", name)
		_, ok := lineWith(table, label, "waiting (multiplexed)", pid)
		return ok
	})
	t.Logf("ls --name %s:\n%s", name, table)
	if l, _ := lineWith(table, label); !strings.HasPrefix(l, "- ") || !strings.Contains(l, fmt.Sprintf("%d,%d", holders[0], holders[1])) {
		t.Errorf("the waiter's line: %q: want no key, blocked by %v", l, holders)
	}
	if strings.Count(table, name+"[slot ") != 2 {
		t.Errorf("want the two slots held:\n%s", table)
	}

	// The tree: the waiter under each slot's holder.
	var tree string
	waitFor(t, "ls --tree to show the waiter", func() bool {
		tree, _, _ = pglocksRun(t, dsn, "ls", "--tree", "--name", name)
		return strings.Count(tree, "waits (exclusive, multiplexed) for "+label) == 2
	})
	t.Logf("ls --tree --name %s:\n%s", name, tree)
	lines := strings.Split(strings.TrimSpace(tree), "\n")
	if len(lines) != 4 {
		t.Errorf("want 2 holders, each with the waiter under it:\n%s", tree)
	}
	for i, l := range lines {
		if strings.HasPrefix(l, " \\_ ") != (i%2 == 1) || i%2 == 1 && !strings.HasPrefix(l, " \\_ "+pid+" ") {
			t.Errorf("line %d: %q", i, l)
		}
	}
	var wt waitTree
	waitFor(t, "ls --tree --json to show the waiter", func() bool {
		stdout, _, _ := pglocksRun(t, dsn, "ls", "--tree", "--json", "--name", name)
		if err := json.Unmarshal([]byte(stdout), &wt); err != nil {
			t.Fatalf("%v: %s", err, stdout)
		}
		return len(wt.Edges) == 2
	})
	for _, e := range wt.Edges {
		// Each edge names the slot its holder holds.
		if e.Waiter != row.PID || !slices.Contains(holders, e.Holder) || e.Pair == nil || !strings.HasPrefix(e.Label, name+"[slot ") {
			t.Errorf("edge %+v", e)
		}
	}

	// --stats --name counts it, as a wait pg_locks does not show.
	var st lockStats
	waitFor(t, "ls --stats to count the waiter", func() bool {
		stdout, _, _ := pglocksRun(t, dsn, "ls", "--stats", "--json", "--name", name)
		if err := json.Unmarshal([]byte(stdout), &st); err != nil {
			t.Fatalf("%v: %s", err, stdout)
		}
		return len(st.Names) == 1 && st.Names[0].Multiplexed == 1
	})
	if want := (nameStats{Name: name, Database: db, Held: 2, Waiting: 1, Multiplexed: 1}); st.Names[0] != want {
		t.Errorf("--stats --name: %+v, want %+v", st.Names[0], want)
	}
	waitFor(t, "ls --stats to say so", func() bool {
		stdout, _, _ := pglocksRun(t, dsn, "ls", "--stats", "--name", name)
		return strings.Contains(stdout, fmt.Sprintf("%s (in %s): 2 held, 1 waiting (1 multiplexed, not in pg_locks)\n", name, db))
	})

	for _, p := range ps {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		p.wait(t)
	}
}

// A Locker's wait beyond its sessions (WithMaxConns) is multiplexed too:
// ls --name asks for it, and shows it waiting for NAME's key, blocked by
// its holder.
func TestLsMultiplexedKey(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	name := "mux-job"
	holder := holdSQL(t, dsn, name)
	var holderPID int
	if err := holder.QueryRow(t.Context(), "SELECT pg_backend_pid()").Scan(&holderPID); err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(t.Context(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	locker, err := pglocks.New(pool, pglocks.WithMaxConns(1), pglocks.WithApplicationName("mux-waiter"))
	if err != nil {
		t.Fatal(err)
	}
	defer locker.Close()
	ctx, cancel := context.WithCancel(context.Background())
	waited := make(chan error, 1)
	go func() {
		lk, err := locker.Lock(ctx, pglocks.Name(name))
		if err == nil {
			lk.Release(context.Background())
		}
		waited <- err
	}()
	waitFor(t, "the multiplexed wait", func() bool { return locker.Stat().WaitingMultiplexed() == 1 })
	if waitsIn(t, db) != 0 {
		t.Fatal("the wait is in pg_locks")
	}

	var row lockInfo
	waitFor(t, "ls --json to show the wait", func() bool {
		for _, l := range lsJSON(t, dsn, "--name", name) {
			if l.Multiplexed {
				row = l
				return true
			}
		}
		return false
	})
	id, _ := pglocks.Name(name).Int64()
	if row.Granted || row.Key != fmt.Sprint(id) || row.Bigint == nil || *row.Bigint != id || row.Name != name || row.Label != name ||
		row.Slots != 0 || row.Mode != "" || row.Application != "mux-waiter" || !slices.Equal(row.BlockedBy, []int{holderPID}) {
		t.Errorf("the wait's row: %+v", row)
	}
	var table string
	waitFor(t, "ls to show the wait", func() bool {
		table, _, _ = pglocksRun(t, dsn, "ls", "--name", name)
		_, ok := lineWith(table, "waiting (multiplexed)", "mux-waiter", fmt.Sprint(holderPID))
		return ok
	})
	t.Logf("ls --name %s:\n%s", name, table)
	// Without --name nobody is asked: ls shows what pg_locks shows.
	for _, l := range lsJSON(t, dsn) {
		if l.Multiplexed {
			t.Errorf("ls without --name: %+v", l)
		}
	}

	cancel()
	if err := <-waited; !errors.Is(err, context.Canceled) {
		t.Errorf("the wait: %v", err)
	}
}

// A label has one form in the table, the tree and JSON: NAME, NAME[slot I],
// and with -k all the schemes after it.
func TestLsLabels(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	c, _ := session(t, dsn, "label-app")
	if _, err := c.Exec(t.Context(), "SELECT pg_advisory_lock(hashtextextended('lbl', 0))"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(t.Context(), slotSQL(pglocks.Name("lbl"), 0)); err != nil {
		t.Fatal(err)
	}
	defer c.Exec(context.Background(), "SELECT pg_advisory_unlock_all()")
	slot := pglocks.Name("lbl").Slot(0).String()
	id := pglocks.Name("lbl").String()
	for _, tt := range []struct {
		args            []string
		slotLbl, keyLbl string
	}{
		{[]string{"--name", "lbl"}, "lbl[slot 0]", "lbl"},
		{[]string{"--name", "lbl", "-k", "all"}, "lbl[slot 0] (name)", "lbl (name)"},
	} {
		table, _, code := pglocksRun(t, dsn, append([]string{"ls"}, tt.args...)...)
		if _, ok := lineWith(table, slot+"  ", tt.slotLbl+"  "); code != 0 || !ok {
			t.Errorf("ls %v: no %s labelled %q:\n%s", tt.args, slot, tt.slotLbl, table)
		}
		tree, _, code := pglocksRun(t, dsn, append([]string{"ls", "--tree"}, tt.args...)...)
		if want := fmt.Sprintf("holds %s (%s), %s (%s)\n", id, tt.keyLbl, slot, tt.slotLbl); code != 0 || !strings.Contains(tree, want) {
			t.Errorf("ls --tree %v: want %q:\n%s", tt.args, want, tree)
		}
		rows := lsJSON(t, dsn, tt.args...)
		if len(rows) != 2 || rows[0].Label != tt.keyLbl || rows[1].Label != tt.slotLbl || rows[1].Key != slot {
			t.Errorf("ls --json %v: %+v", tt.args, rows)
		}
		stdout, _, _ := pglocksRun(t, dsn, append([]string{"ls", "--tree", "--json"}, tt.args...)...)
		var wt waitTree
		if err := json.Unmarshal([]byte(stdout), &wt); err != nil || len(wt.Sessions) != 1 || len(wt.Sessions[0].Holds) != 2 ||
			wt.Sessions[0].Holds[1].Label != tt.slotLbl || wt.Sessions[0].Holds[1].Key != slot {
			t.Errorf("ls --tree --json %v: %v\n%s", tt.args, err, stdout)
		}
	}
}

// labelText is the one form of a label.
func TestLabelText(t *testing.T) {
	t.Parallel()
	two := 2
	for _, tt := range []struct {
		l    lockInfo
		want string
	}{
		{lockInfo{}, ""},
		{lockInfo{Name: "job"}, "job"},
		{lockInfo{Name: "job", Slot: &two}, "job[slot 2]"},
		{lockInfo{Name: "job", Slots: 3}, "job[any of 3 slots]"},
		{lockInfo{Name: "job", Schemes: []string{"dotnet", "id"}}, "job (dotnet, id)"},
		{lockInfo{Name: "job", Slot: &two, Schemes: []string{"name"}}, "job[slot 2] (name)"},
	} {
		if got := labelText(tt.l); got != tt.want {
			t.Errorf("%+v: %q, want %q", tt.l, got, tt.want)
		}
	}
}

// Keys print as A,B everywhere (as Key.String and pglocks key write them),
// and sort numerically: bigint keys, negative first, then pairs.
func TestLsKeys(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	c, _ := session(t, dsn, "keys-app")
	if _, err := c.Exec(t.Context(), `SELECT pg_advisory_lock(10), pg_advisory_lock(-10), pg_advisory_lock(5),
		pg_advisory_lock(1, -1), pg_advisory_lock(-1, 1), pg_advisory_lock(-2, 5)`); err != nil {
		t.Fatal(err)
	}
	defer c.Exec(context.Background(), "SELECT pg_advisory_unlock_all()")
	want := []string{"-10", "5", "10", "-2,5", "-1,1", "1,-1"}

	table, _, code := pglocksRun(t, dsn, "ls")
	t.Logf("ls:\n%s", table)
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(table), "\n")[1:] {
		got = append(got, strings.Fields(l)[0])
	}
	if code != 0 || !slices.Equal(got, want) {
		t.Errorf("ls: keys %q, want %q", got, want)
	}
	got = got[:0]
	for _, l := range lsJSON(t, dsn) {
		got = append(got, l.Key)
	}
	if !slices.Equal(got, want) {
		t.Errorf("ls --json: keys %q, want %q", got, want)
	}
	tree, _, _ := pglocksRun(t, dsn, "ls", "--tree")
	if !strings.Contains(tree, "holds "+strings.Join(want, ", ")+"\n") {
		t.Errorf("ls --tree: want the keys %q in this order:\n%s", want, tree)
	}
}

// sortLocks orders by --name, then by key numerically, holders before
// waiters, waiters in the order they came.
func TestSortLocks(t *testing.T) {
	t.Parallel()
	row := func(k pglocks.Key, name string, granted bool, since int) lockInfo {
		l := lockInfo{Name: name, Granted: granted, Since: time.Unix(int64(since), 0)}
		l.setKey(k)
		return l
	}
	zero := 0
	slot0 := row(pglocks.Name("b").Slot(0), "b", true, 1)
	slot0.Slot = &zero
	slotWait := lockInfo{Name: "b", Slots: 2, Since: time.Time{}}
	locks := []lockInfo{
		row(pglocks.Pair(1, -1), "", true, 1),
		row(pglocks.ID(10), "", false, 3),
		row(pglocks.ID(10), "", false, 2),
		row(pglocks.ID(10), "", true, 9),
		row(pglocks.ID(-10), "", true, 1),
		row(pglocks.Pair(-1, 1), "", true, 1),
		slotWait,
		slot0,
		row(pglocks.Name("b"), "b", true, 1),
		row(pglocks.Name("a"), "a", true, 1),
	}
	sortLocks(locks, []string{"a", "b"})
	var got []string
	for _, l := range locks {
		got = append(got, fmt.Sprintf("%s/%s/%v/%d", l.Key, labelText(l), l.Granted, l.Since.Unix()))
	}
	want := []string{
		pglocks.Name("a").String() + "/a/true/1",
		pglocks.Name("b").String() + "/b/true/1",
		slot0.Key + "/b[slot 0]/true/1",
		fmt.Sprintf("/b[any of 2 slots]/false/%d", time.Time{}.Unix()),
		"-10//true/1", "10//true/9", "10//false/2", "10//false/3", "-1,1//true/1", "1,-1//true/1",
	}
	if !slices.Equal(got, want) {
		t.Errorf("sorted:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// ls --stats --name counts NAME's locks in the current database.
func TestStatsName(t *testing.T) {
	t.Parallel()
	dsn, db := testDB(t)
	holder := holdSQL(t, dsn, "st-job")
	other, _ := session(t, dsn, "st-other")
	if _, err := other.Exec(t.Context(), "SELECT pg_advisory_lock(77)"); err != nil {
		t.Fatal(err)
	}
	defer other.Exec(context.Background(), "SELECT pg_advisory_unlock_all()")
	w, _ := session(t, dsn, "st-waiter")
	waited := make(chan error, 1)
	go func() {
		_, err := w.Exec(context.Background(), "SELECT pg_advisory_lock(hashtextextended('st-job', 0))")
		waited <- err
	}()
	waitFor(t, "the wait", func() bool { return waitsIn(t, db) == 1 })

	stdout, stderr, code := pglocksRun(t, dsn, "ls", "--stats", "--json", "--name", "st-job", "--name", "st-none")
	var st lockStats
	if err := json.Unmarshal([]byte(stdout), &st); err != nil || code != 0 {
		t.Fatalf("exit %d, %v: %s %s", code, err, stdout, stderr)
	}
	want := []nameStats{{Name: "st-job", Database: db, Held: 1, Waiting: 1}, {Name: "st-none", Database: db}}
	if !slices.Equal(st.Names, want) {
		t.Errorf("names: %+v, want %+v", st.Names, want)
	}
	stdout, _, _ = pglocksRun(t, dsn, "ls", "--stats", "--name", "st-job")
	t.Logf("ls --stats --name st-job:\n%s", stdout)
	if !strings.Contains(stdout, db+": 2 held, 1 waiting\n") || !strings.Contains(stdout, "st-job (in "+db+"): 1 held, 1 waiting\n") {
		t.Errorf("ls --stats --name st-job:\n%s", stdout)
	}
	// Let the waiter through.
	if _, err := holder.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	if _, err := w.Exec(t.Context(), "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
}

// The README's --stats example has the form ls --stats prints.
func TestStatsREADME(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	// Each number of the example may differ; the rest is as printed.
	var patterns []*regexp.Regexp
	for _, l := range strings.Split(string(readme), "\n") {
		if strings.HasPrefix(l, "lock table: ") || strings.Contains(l, " = max_locks_per_transaction ") {
			p := regexp.MustCompile(`[0-9]+(\\\.[0-9]+)?`).ReplaceAllString(regexp.QuoteMeta(l), `[0-9]+(\.[0-9]+)?`)
			patterns = append(patterns, regexp.MustCompile("(?m)^"+p+"$"))
		}
	}
	if len(patterns) != 2 {
		t.Fatalf("want the example's two lock table lines in the README, found %d", len(patterns))
	}
	dsn, _ := testDB(t)
	stdout, stderr, code := pglocksRun(t, dsn, "ls", "--stats")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, p := range patterns {
		if !p.MatchString(stdout) {
			t.Errorf("ls --stats has no line like the README's %q:\n%s", p, stdout)
		}
	}
}

// --watch prints the time before each refresh; with --json each refresh is
// an object with the time.
func TestLsWatch(t *testing.T) {
	t.Parallel()
	dsn, _ := testDB(t)
	c, _ := session(t, dsn, "watch-app")
	if _, err := c.Exec(t.Context(), "SELECT pg_advisory_lock(5)"); err != nil {
		t.Fatal(err)
	}
	defer c.Exec(context.Background(), "SELECT pg_advisory_unlock_all()")
	header := regexp.MustCompile(`(?m)^Every 100ms: ([0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2})$`)
	p := start(t, dsn, "ls", "--watch", "100ms", "-d", dsn)
	waitFor(t, "two refreshes", func() bool { return len(header.FindAllString(p.stdout.String(), -1)) >= 2 })
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	if code := p.wait(t); code != 0 {
		t.Errorf("exit %d after SIGINT", code)
	}
	out := p.stdout.String()
	var times []time.Time
	for _, m := range header.FindAllStringSubmatch(out, -1) {
		tm, err := time.ParseInLocation("2006-01-02 15:04:05", m[1], time.Local)
		if err != nil || time.Since(tm) > time.Hour || time.Until(tm) > time.Hour {
			t.Errorf("header time %q: %v", m[1], err)
		}
		times = append(times, tm)
	}
	if !slices.IsSortedFunc(times, time.Time.Compare) || strings.Count(out, "KEY ") != len(times) || !strings.HasPrefix(out, "Every ") {
		t.Errorf("want a header before each table:\n%s", out)
	}
	if strings.Contains(out, dsn) {
		t.Errorf("the header shows -d's connection string:\n%s", out)
	}

	p = start(t, dsn, "ls", "--watch", "100ms", "--json")
	waitFor(t, "two JSON refreshes", func() bool { return strings.Count(p.stdout.String(), `"time"`) >= 2 })
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	p.wait(t)
	dec := json.NewDecoder(bytes.NewReader([]byte(p.stdout.String())))
	n := 0
	for {
		var frame struct {
			Time  time.Time  `json:"time"`
			Locks []lockInfo `json:"locks"`
		}
		if err := dec.Decode(&frame); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("refresh %d: %v\n%s", n, err, p.stdout.String())
		}
		if frame.Time.IsZero() || len(frame.Locks) != 1 || frame.Locks[0].Key != "5" {
			t.Errorf("refresh %d: %+v", n, frame)
		}
		n++
	}
	if n < 2 {
		t.Errorf("%d refreshes", n)
	}
}

// pglocks key: --help lists its flags; an empty NAME is a usage error, as
// for run (and ls --name).
func TestKeyUsage(t *testing.T) {
	t.Parallel()
	stdout, _, code := pglocksRun(t, "", "key", "--help")
	for _, want := range []string{"Usage: pglocks key [-k SCHEME] [--slots N] [--json] NAME\n", "\n  --slots ", "\n  --json", "\n  -k, --key "} {
		if code != 0 || !strings.Contains(stdout, want) {
			t.Errorf("key --help: exit %d, lacks %q:\n%s", code, want, stdout)
		}
	}
	for _, args := range [][]string{{"key", ""}, {"key", "--json", ""}, {"ls", "--name", ""}} {
		stdout, stderr, code := pglocksRun(t, "", args...)
		if code != exitUsage || stdout != "" || !strings.Contains(stderr, "empty") || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%q: exit %d, %q %q; want a usage error", args, code, stdout, stderr)
		}
	}
}
