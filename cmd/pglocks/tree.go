package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// waitTree is "pglocks ls --tree": the sessions holding or waiting for
// advisory locks, and who blocks whom (pg_blocking_pids).
type waitTree struct {
	Sessions []treeSession `json:"sessions"`
	Edges    []treeEdge    `json:"edges"`
}

// treeSession is one session of the tree.
type treeSession struct {
	PID         int        `json:"pid"` // a prepared transaction's is negative: it has none
	Application string     `json:"application"`
	Client      string     `json:"client"`
	Holds       []lockRef  `json:"holds"`
	Waits       []treeWait `json:"waits"` // one in the server's queue, or any number multiplexed
}

// lockRef is a lock in the tree's JSON: its key, as ls --json gives it, and
// its label. A wait for any of a NAME's slots has a label and no key.
type lockRef struct {
	Key    string    `json:"key,omitempty"`
	Bigint *int64    `json:"bigint,omitempty"`
	Pair   *[2]int32 `json:"pair,omitempty"`
	Label  string    `json:"label,omitempty"`
}

// treeWait is a wait of a session.
type treeWait struct {
	lockRef
	Mode        string    `json:"mode,omitempty"` // not told for a multiplexed wait for a key
	Multiplexed bool      `json:"multiplexed,omitempty"`
	WaitStart   time.Time `json:"wait_start,omitzero"`
	WaitSeconds *float64  `json:"wait_seconds,omitempty"` // to the millisecond; unknown for a multiplexed wait
}

// treeEdge says that waiter waits for the lock (a key, or any of a NAME's
// slots) that holder holds, or waits for ahead of it: Key is the key
// holder has.
type treeEdge struct {
	Waiter int `json:"waiter"`
	Holder int `json:"holder"`
	lockRef
}

// ref is l's lock in the tree.
func ref(l lockInfo) lockRef {
	return lockRef{Key: l.Key, Bigint: l.Bigint, Pair: l.Pair, Label: l.Label}
}

// String is r as the tree prints it: KEY, KEY (LABEL), or LABEL alone for
// a wait for any of a NAME's slots.
func (r lockRef) String() string {
	switch {
	case r.Label == "":
		return r.Key
	case r.Key == "":
		return r.Label
	}
	return r.Key + " (" + r.Label + ")"
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
				for _, k := range l.waitKeys {
					by = append(by, holders[k]...)
				}
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
			s = &treeSession{PID: l.PID, Application: l.Application, Client: l.Client, Holds: []lockRef{}, Waits: []treeWait{}}
			byPID[l.PID] = s
		}
		if s.Application == "" && s.Client == "" {
			s.Application, s.Client = l.Application, l.Client
		}
		return s
	}
	held := map[int]map[string]lockRef{} // pid -> key -> the lock it holds
	for _, l := range locks {
		if l.Granted {
			if held[l.PID] == nil {
				held[l.PID] = map[string]lockRef{}
			}
			held[l.PID][l.Key] = ref(l)
		}
	}
	var t waitTree
	for _, l := range locks {
		s := session(l)
		if l.Granted {
			s.Holds = append(s.Holds, ref(l))
			continue
		}
		w := treeWait{lockRef: ref(l), Mode: l.Mode, Multiplexed: l.Multiplexed, WaitStart: l.Since}
		if !l.Since.IsZero() {
			sec := math.Round(now.Sub(l.Since).Seconds()*1000) / 1000
			w.WaitSeconds = &sec
		}
		s.Waits = append(s.Waits, w)
		for _, p := range l.BlockedBy {
			e := treeEdge{Waiter: l.PID, Holder: p, lockRef: ref(l)}
			if l.Key == "" {
				// A wait for any of NAME's slots: the slot p holds.
				for _, k := range l.waitKeys {
					if r, ok := held[p][k]; ok {
						e.lockRef = r
						break
					}
				}
			}
			t.Edges = append(t.Edges, e)
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
		if !slices.Contains(children[e.Holder], e.Waiter) {
			children[e.Holder] = append(children[e.Holder], e.Waiter)
		}
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
		for _, wt := range s.Waits {
			p := "waits"
			if wt.WaitSeconds != nil {
				p += " " + age(*wt.WaitSeconds)
			}
			var how []string
			if wt.Mode != "" {
				how = append(how, wt.Mode)
			}
			if wt.Multiplexed {
				how = append(how, "multiplexed")
			}
			if len(how) > 0 {
				p += " (" + strings.Join(how, ", ") + ")"
			}
			parts = append(parts, p+" for "+wt.String())
		}
		if len(s.Holds) > 0 {
			var hs []string
			for _, h := range s.Holds {
				hs = append(hs, h.String())
			}
			parts = append(parts, "holds "+strings.Join(hs, ", "))
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
