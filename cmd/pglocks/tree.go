package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// waitTree is "pglocks ls --tree": the sessions holding or waiting for
// advisory locks, and who blocks whom (pg_blocking_pids).
type waitTree struct {
	Sessions []treeSession `json:"sessions"`
	Edges    []treeEdge    `json:"edges"`
}

// treeSession is one session of the tree.
type treeSession struct {
	PID         int       `json:"pid"`
	Application string    `json:"application"`
	Client      string    `json:"client"`
	Holds       []string  `json:"holds"`               // keys, as ls prints them
	WaitsFor    string    `json:"waits_for,omitempty"` // the key it waits for
	Mode        string    `json:"mode,omitempty"`      // of the wait
	WaitStart   time.Time `json:"wait_start,omitzero"`
	WaitSeconds float64   `json:"wait_seconds,omitempty"`
}

// treeEdge says that waiter waits for key, which holder holds or waits for
// ahead of it.
type treeEdge struct {
	Waiter int    `json:"waiter"`
	Holder int    `json:"holder"`
	Key    string `json:"key"`
}

// keyLabel is a lock's key as ls prints it, with its --name label.
func keyLabel(l lockInfo) string {
	key := l.Key
	if l.Pair != nil {
		key = "(" + key + ")"
	}
	switch {
	case l.Slot != nil:
		key += " [" + l.Name + " slot " + fmt.Sprint(*l.Slot) + "]"
	case l.Name != "":
		key += " [" + l.Name + "]"
	}
	return key
}

// preparedNodes gives each prepared transaction among locks a pid of its
// own for the tree, -1, -2, …: pg_locks shows none for it, and
// pg_blocking_pids names every one of them 0, so a waiter blocked by 0 is
// blocked by the prepared transactions that hold its key.
func preparedNodes(locks []lockInfo) []lockInfo {
	ids := map[string]int{}
	holders := map[string][]int{}
	out := slices.Clone(locks)
	for i, l := range out {
		if l.Prepared == "" {
			continue
		}
		id, ok := ids[l.Prepared]
		if !ok {
			id = -(len(ids) + 1)
			ids[l.Prepared] = id
		}
		out[i].PID = id
		if l.Granted {
			holders[l.Key] = append(holders[l.Key], id)
		}
	}
	for i, l := range out {
		if l.Granted || !slices.Contains(l.BlockedBy, 0) {
			continue
		}
		var by []int
		for _, p := range l.BlockedBy {
			if p == 0 {
				by = append(by, holders[l.Key]...)
			} else {
				by = append(by, p)
			}
		}
		out[i].BlockedBy = by
	}
	return out
}

// buildTree makes the tree of locks, as of now.
func buildTree(locks []lockInfo, now time.Time) waitTree {
	byPID := map[int]*treeSession{}
	session := func(l lockInfo) *treeSession {
		s := byPID[l.PID]
		if s == nil {
			s = &treeSession{PID: l.PID, Application: l.Application, Client: l.Client, Holds: []string{}}
			byPID[l.PID] = s
		}
		return s
	}
	var t waitTree
	for _, l := range locks {
		s := session(l)
		if l.Granted {
			s.Holds = append(s.Holds, keyLabel(l))
			continue
		}
		s.WaitsFor, s.Mode, s.WaitStart = keyLabel(l), l.Mode, l.Since
		if !l.Since.IsZero() {
			s.WaitSeconds = now.Sub(l.Since).Seconds()
		}
		for _, p := range l.BlockedBy {
			t.Edges = append(t.Edges, treeEdge{Waiter: l.PID, Holder: p, Key: keyLabel(l)})
		}
	}
	t.Sessions = make([]treeSession, 0, len(byPID))
	for _, s := range byPID {
		t.Sessions = append(t.Sessions, *s)
	}
	slices.SortFunc(t.Sessions, func(a, b treeSession) int { return a.PID - b.PID })
	if t.Edges == nil {
		t.Edges = []treeEdge{}
	}
	return t
}

// printTree prints t like ps --forest: each session that waits for nobody
// listed, with the sessions waiting for it under it, and theirs under them.
// A session blocked by several appears under each; a cycle (a deadlock the
// server has yet to break) is cut where it closes.
func printTree(w io.Writer, t waitTree) {
	byPID := map[int]treeSession{}
	for _, s := range t.Sessions {
		byPID[s.PID] = s
	}
	children := map[int][]int{}
	blocked := map[int]bool{}
	for _, e := range t.Edges {
		if _, ok := byPID[e.Holder]; !ok {
			continue
		}
		children[e.Holder] = append(children[e.Holder], e.Waiter)
		blocked[e.Waiter] = true
	}
	var roots []int
	for _, s := range t.Sessions {
		if !blocked[s.PID] {
			roots = append(roots, s.PID)
		}
	}
	printed := map[int]bool{}
	var walk func(pid int, depth int, path map[int]bool)
	walk = func(pid int, depth int, path map[int]bool) {
		printed[pid] = true
		s := byPID[pid]
		indent := ""
		if depth > 0 {
			indent = strings.Repeat("    ", depth-1) + " \\_ "
		}
		var parts []string
		if s.WaitsFor != "" {
			parts = append(parts, fmt.Sprintf("waits %s for %s (%s)", age(s.WaitSeconds), s.WaitsFor, s.Mode))
		}
		if len(s.Holds) > 0 {
			parts = append(parts, "holds "+strings.Join(s.Holds, ", "))
		}
		cycle := ""
		if path[pid] {
			cycle = " (a cycle: deadlock)"
		}
		id := strconv.Itoa(s.PID)
		if s.PID < 0 {
			id = "-" // a prepared transaction: no session
		}
		fmt.Fprintf(w, "%s%s %s %s: %s%s\n", indent, id, dash(s.Application), dash(s.Client), strings.Join(parts, "; "), cycle)
		if path[pid] {
			return
		}
		path[pid] = true
		for _, c := range children[pid] {
			walk(c, depth+1, path)
		}
		delete(path, pid)
	}
	for _, r := range roots {
		walk(r, 0, map[int]bool{})
	}
	// A group of sessions that all wait for each other (a deadlock the
	// server has yet to break) has no root: start it at its lowest pid.
	for _, s := range t.Sessions {
		if !printed[s.PID] {
			walk(s.PID, 0, map[int]bool{})
		}
	}
	if len(t.Sessions) == 0 {
		fmt.Fprintln(w, "(no advisory locks)")
	}
}

// age prints a wait's age: milliseconds under a second, else seconds.
func age(sec float64) string {
	d := time.Duration(sec * float64(time.Second))
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}

// lockStats is "pglocks ls --stats".
type lockStats struct {
	Databases []dbStats `json:"databases"`
	LockTable tableFill `json:"lock_table"`
}

// dbStats counts one database's advisory locks.
type dbStats struct {
	Database string `json:"database"`
	Held     int    `json:"held"`
	Waiting  int    `json:"waiting"`
}

// tableFill is how full the server's shared lock table is: Used of
// Capacity = max_locks_per_transaction × (max_connections +
// max_prepared_transactions). Fast-path locks (a session's first few weak
// relation locks) are not in it, and are counted apart.
type tableFill struct {
	Used     int     `json:"used"`
	FastPath int     `json:"fast_path"`
	Capacity int     `json:"capacity"`
	Percent  float64 `json:"percent"`
}

func readStats(ctx context.Context, pool *pgxpool.Pool) (lockStats, error) {
	var s lockStats
	rows, err := pool.Query(ctx, `
		SELECT coalesce(d.datname, l.database::text), count(*) FILTER (WHERE l.granted), count(*) FILTER (WHERE NOT l.granted)
		FROM pg_locks l LEFT JOIN pg_database d ON d.oid = l.database
		WHERE l.locktype = 'advisory' GROUP BY 1 ORDER BY 1`)
	if err != nil {
		return s, err
	}
	for rows.Next() {
		var d dbStats
		if err := rows.Scan(&d.Database, &d.Held, &d.Waiting); err != nil {
			return s, err
		}
		s.Databases = append(s.Databases, d)
	}
	if err := rows.Err(); err != nil {
		return s, err
	}
	if s.Databases == nil {
		s.Databases = []dbStats{}
	}
	f := &s.LockTable
	err = pool.QueryRow(ctx, `
		SELECT (SELECT count(*) FILTER (WHERE NOT fastpath) FROM pg_locks),
		       (SELECT count(*) FILTER (WHERE fastpath) FROM pg_locks),
		       current_setting('max_locks_per_transaction')::int *
		       (current_setting('max_connections')::int + current_setting('max_prepared_transactions')::int)`).
		Scan(&f.Used, &f.FastPath, &f.Capacity)
	if f.Capacity > 0 {
		f.Percent = float64(f.Used) * 100 / float64(f.Capacity)
	}
	return s, err
}

func printStats(w io.Writer, s lockStats) {
	for _, d := range s.Databases {
		fmt.Fprintf(w, "%s: %d held, %d waiting\n", d.Database, d.Held, d.Waiting)
	}
	if len(s.Databases) == 0 {
		fmt.Fprintln(w, "(no advisory locks)")
	}
	f := s.LockTable
	fmt.Fprintf(w, "lock table: %d of %d (%.3g%%), max_locks_per_transaction × (max_connections + max_prepared_transactions); %d fast-path locks apart\n",
		f.Used, f.Capacity, f.Percent, f.FastPath)
}
