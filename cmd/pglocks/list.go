package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

const lsHead = `Usage: pglocks ls [flags]

Lists the advisory locks in the current database, held and awaited: the key
(a bigint, or A,B for the int4-pair key space; in numeric order), its label when --name
names it, mode, state, the session's pid, application and client, since when
(the wait's start for a waiter; the session's start for a holder, as the
server does not record when a lock was granted), and who blocks a waiter.
The keys that migration tools take while they migrate are labelled
without --name: goose migrations, golang-migrate migrations (DB) (its
default table, public.schema_migrations), rails migrations (DB), prisma
migrations. A label is NAME for NAME's key, NAME[slot I] for its slot I (pglocks run
--slots), NAME[any of N slots] for a wait for any of its N slots; with -k
all, the schemes that make NAME the key follow: NAME[slot 0] (dotnet, id).
With --name, ls also asks who waits multiplexed for NAME or its slots (a
wait for any of N slots, or a Locker's wait beyond its sessions, is not in
pg_locks): it says on the channel pglocks that they may be free, and each
such waiter answers (a Locker of this library with pgx; not through a
transaction-mode pooler) within a few round trips; their since is unknown.
A lock a prepared transaction holds (pg_advisory_xact_lock, then PREPARE
TRANSACTION) has pid 0 and names the transaction, since it holds it until
COMMIT PREPARED or ROLLBACK PREPARED; a waiter it blocks says "blocked by
0". Without the pg_read_all_stats role, the client of another role's
session shows as -, and so does its since when it holds a lock. With
--tree it shows who blocks whom instead, like ps --forest: each session
that waits for nobody, with the sessions waiting for it under it (how long,
for which key), and theirs under them. With --stats it counts the held and
waiting advisory locks of every database (and of each --name NAME in this
one), and how full the server's lock table is (max_locks_per_transaction ×
(max_connections + max_prepared_transactions) entries; when it is full
every session fails). --watch prints the time (the server's) before each
refresh; with --json each refresh is {"time": ..., "locks"|"tree"|"stats":
what one ls --json prints}.
`

// lockInfo is one row of "pglocks ls".
type lockInfo struct {
	Key         string    `json:"key,omitempty"` // as Key.String: "42", "1,2"; empty for a wait for any of Slots slots
	Bigint      *int64    `json:"bigint"`
	Pair        *[2]int32 `json:"pair"`
	Name        string    `json:"name,omitempty"`
	Schemes     []string  `json:"schemes,omitempty"` // with -k all, the schemes that make Name this key
	Slot        *int      `json:"slot,omitempty"`    // a slot of Name (pglocks run --slots)
	Slots       int       `json:"slots,omitempty"`   // a wait for any of Name's Slots slots
	Label       string    `json:"label,omitempty"`   // Name, Slot, Slots and Schemes, as ls prints them
	Mode        string    `json:"mode"`              // empty for a multiplexed wait for a key: it is not told
	Granted     bool      `json:"granted"`
	Multiplexed bool      `json:"multiplexed,omitempty"` // a wait not in pg_locks, which the waiter told when asked
	PID         int       `json:"pid"`                   // 0 for a prepared transaction
	Prepared    string    `json:"prepared,omitempty"`    // the gid of the prepared transaction that holds it
	Application string    `json:"application"`
	Client      string    `json:"client"`
	Since       time.Time `json:"since,omitzero"` // unknown without the right to see the session (pg_read_all_stats), and for a multiplexed wait
	BlockedBy   []int     `json:"blocked_by"`     // 0 is a prepared transaction, as pg_blocking_pids says

	key      pglocks.Key // the zero Key for a wait for any of Slots slots
	waitKeys []string    // a waiter's keys, as Key: one, or the slots it waits for any of
}

// setKey sets the key fields of l.
func (l *lockInfo) setKey(k pglocks.Key) {
	l.key, l.Key = k, k.String()
	if id, ok := k.Int64(); ok {
		l.Bigint = &id
	} else {
		a, b, _ := k.Int32s()
		l.Pair = &[2]int32{a, b}
	}
}

// labelText is l's label, in the one form ls prints everywhere (table,
// tree, JSON): NAME; NAME[slot I] for slot I of NAME; NAME[any of N slots]
// for a wait for any of NAME's N slots; with -k all, the schemes follow:
// NAME[slot 0] (dotnet, id). It is empty for a key no --name names.
func labelText(l lockInfo) string {
	if l.Name == "" {
		return ""
	}
	s := l.Name
	switch {
	case l.Slot != nil:
		s += "[slot " + strconv.Itoa(*l.Slot) + "]"
	case l.Slots > 0:
		s += "[any of " + strconv.Itoa(l.Slots) + " slots]"
	}
	if len(l.Schemes) > 0 {
		s += " (" + strings.Join(l.Schemes, ", ") + ")"
	}
	return s
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// lsCommand is "pglocks ls".
func lsCommand(args []string, stdout, stderr io.Writer) int {
	fs := flagSet("ls", lsHead, stderr)
	var (
		asJSON      bool
		tree, stats bool
		watch       time.Duration
		names       stringList
		scheme, dsn string
	)
	fs.BoolVar(&asJSON, "json", false, "print JSON")
	fs.BoolVar(&tree, "tree", false, "show who blocks whom, as a tree")
	fs.BoolVar(&stats, "stats", false, "count held and waiting locks per database (and per --name), and the lock table's fill")
	fs.DurationVar(&watch, "watch", 0, "print again every DURATION, with the time, until interrupted")
	fs.Var(&names, "name", "label the key of NAME and its slots, and ask who waits multiplexed for them (repeatable)")
	keyFlag(fs, &scheme, "how --name values become keys, `SCHEME`: ")
	dsnFlag(fs, &dsn)
	if code := parseFlags(fs, args, stdout); code >= 0 {
		return code
	}
	if fs.NArg() != 0 {
		return usageError(stderr, "ls", "unexpected argument %q", fs.Arg(0))
	}
	if tree && stats {
		return usageError(stderr, "ls", "--tree and --stats cannot be combined")
	}
	if watch < 0 {
		return usageError(stderr, "ls", "--watch must be positive")
	}
	labels := map[pglocks.Key]label{}
	for _, n := range names {
		if n == "" {
			// An unset variable (--name "$JOB") labels nothing anyone takes.
			return usageError(stderr, "ls", "empty --name")
		}
		var keys []schemeKey
		if scheme == "all" {
			keys = allKeys(n)
		} else {
			key, err := parseKey(scheme, n)
			if err != nil {
				return usageError(stderr, "ls", "%v", err)
			}
			keys = []schemeKey{{key: key}}
		}
		for _, sk := range keys {
			addLabel(labels, sk.key, sk.key, n, -1, sk.scheme)
			// The slots of NAME (pglocks run --slots), whatever their number.
			for i := range pglocks.MaxSlots {
				addLabel(labels, sk.key.Slot(i), sk.key, n, i, sk.scheme)
			}
		}
	}
	cfg, err := poolConfig(dsn)
	if err != nil {
		return usageError(stderr, "ls", "%v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg.MaxConns = 1
	pool, err := connect(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "pglocks ls: %v\n", err)
		return exitDatabase
	}
	defer pool.Close()
	var standby bool
	if err := pool.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&standby); err != nil {
		fmt.Fprintf(stderr, "pglocks ls: %s\n", oneLine(err))
		return exitDatabase
	}
	if standby {
		fmt.Fprintln(stderr, "pglocks ls: this server is a standby: its pg_locks does not show the primary's advisory locks; ask the primary")
		return exitDatabase
	}
	view := "locks"
	switch {
	case tree:
		view = "tree"
	case stats:
		view = "stats"
	}
	askFailed := false
	for {
		snap, err := snapshot(ctx, pool, view, labels, names)
		if err != nil {
			if ctx.Err() != nil {
				return 0
			}
			fmt.Fprintf(stderr, "pglocks ls: %s\n", oneLine(err))
			return exitDatabase
		}
		if snap.askErr != nil && !askFailed {
			// The locks are listed; only the multiplexed waits are not.
			askFailed = true
			fmt.Fprintf(stderr, "pglocks ls: cannot ask who waits multiplexed: %s\n", oneLine(snap.askErr))
		}
		if asJSON {
			var out any = snap.out
			if watch > 0 {
				out = map[string]any{"time": snap.now, view: snap.out}
			}
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			enc.SetEscapeHTML(false) // for people and jq: "<<", not "\u003c\u003c"
			_ = enc.Encode(out)
		} else {
			if watch > 0 {
				// Like watch(1)'s header, without the command line, which
				// may hold a password (-d).
				fmt.Fprintf(stdout, "Every %v: %s\n\n", watch, snap.now.Local().Format("2006-01-02 15:04:05"))
			}
			switch out := snap.out.(type) {
			case lockStats:
				printStats(stdout, out)
			case waitTree:
				printTree(stdout, out)
			case []lockInfo:
				printLocks(stdout, out)
			}
		}
		if watch == 0 {
			return 0
		}
		select {
		case <-ctx.Done():
			return 0
		case <-time.After(watch):
		}
		if !asJSON {
			fmt.Fprintln(stdout)
		}
	}
}

// lsSnapshot is what one refresh of ls found.
type lsSnapshot struct {
	out    any       // []lockInfo, waitTree or lockStats
	now    time.Time // the server's clock, just after pg_locks was read
	askErr error     // why the multiplexed waits could not be asked for
}

// snapshot reads view ("locks", "tree" or "stats") once.
func snapshot(ctx context.Context, pool *pgxpool.Pool, view string, labels map[pglocks.Key]label, names []string) (lsSnapshot, error) {
	var snap lsSnapshot
	var stats lockStats
	if view == "stats" {
		var err error
		if stats, err = readStats(ctx, pool); err != nil {
			return snap, err
		}
		if len(names) == 0 {
			snap.out = stats
			return snap, pool.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&snap.now)
		}
	}
	// Ask first, then read pg_locks: a waiter that got its slot meanwhile
	// is seen holding it (though also, this once, waiting).
	var wants map[int][]pglocks.Key
	if probe := probeKeys(labels); len(probe) > 0 {
		wants, snap.askErr = askWaiters(ctx, pool, probe)
		if ctx.Err() != nil {
			return snap, ctx.Err()
		}
	}
	locks, err := listLocks(ctx, pool, labels)
	if err != nil {
		return snap, err
	}
	// The age of a wait by the server's clock, as Since is.
	if err := pool.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&snap.now); err != nil {
		return snap, err
	}
	if mux := waiterRows(wants, labels, locks); len(mux) > 0 {
		if err := describeSessions(ctx, pool, mux); err != nil {
			return snap, err
		}
		locks = append(locks, mux...)
	}
	for i := range locks {
		locks[i].Label = labelText(locks[i])
	}
	sortLocks(locks, names)
	switch view {
	case "tree":
		snap.out = buildTree(holdersOnly(preparedNodes(locks)), snap.now)
	case "stats":
		stats.Names = countNames(locks, names, stats.database)
		snap.out = stats
	default:
		snap.out = locks
	}
	return snap, nil
}

// label is what --name says of a key: NAME, or slot i of NAME.
type label struct {
	name    string
	slot    int         // -1: NAME itself
	base    pglocks.Key // NAME's key under the scheme (the key itself, for slot -1)
	schemes []string    // with -k all, the schemes that make NAME this key
}

// addLabel labels key as slot (-1: none) of name, whose key is base;
// scheme is "" but with -k all. A key that two schemes make of one NAME
// gets one label naming both; a later NAME replaces an earlier one.
func addLabel(labels map[pglocks.Key]label, key, base pglocks.Key, name string, slot int, scheme string) {
	lb, ok := labels[key]
	if !ok || lb.name != name || lb.slot != slot {
		lb = label{name: name, slot: slot, base: base}
	}
	if scheme != "" {
		lb.schemes = append(lb.schemes, scheme)
	}
	labels[key] = lb
}

func listLocks(ctx context.Context, pool *pgxpool.Pool, labels map[pglocks.Key]label) ([]lockInfo, error) {
	rows, err := pool.Query(ctx, `
		SELECT l.objsubid, l.classid::bigint, l.objid::bigint, l.mode, l.granted, coalesce(l.pid, 0),
		       coalesce(px.gid, ''),
		       coalesce(a.application_name, ''),
		       -- backend_start is null for a session one may not see (another
		       -- role's, without pg_read_all_stats), and so is client_addr
		       CASE WHEN a.backend_start IS NULL THEN '' ELSE coalesce(host(a.client_addr), 'local socket') END,
		       CASE WHEN px.gid IS NOT NULL THEN px.prepared
		            WHEN l.granted THEN a.backend_start
		            -- waitstart is null for a moment after the wait begins
		            ELSE coalesce(l.waitstart, a.query_start, a.backend_start) END,
		       coalesce(pg_blocking_pids(l.pid), '{}'), current_database()
		FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
		-- a transaction lock of a prepared transaction has no session; the
		-- transaction's own lock, of the same virtual transaction, has its xid
		LEFT JOIN pg_locks x ON l.pid IS NULL AND x.pid IS NULL AND x.locktype = 'transactionid'
		                    AND x.virtualtransaction = l.virtualtransaction
		LEFT JOIN pg_prepared_xacts px ON px.transaction = x.transactionid
		WHERE l.locktype = 'advisory'
		  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
	if err != nil {
		return nil, err
	}
	locks, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (li lockInfo, err error) {
		var sub int16
		var classid, objid int64
		var blocking []int32
		var since *time.Time
		var db string
		if err := r.Scan(&sub, &classid, &objid, &li.Mode, &li.Granted, &li.PID, &li.Prepared, &li.Application, &li.Client, &since, &blocking, &db); err != nil {
			return li, err
		}
		if since != nil {
			li.Since = *since
		}
		if li.Prepared != "" {
			li.Application = "prepared transaction " + li.Prepared
		}
		key, ok := pglocks.KeyFromPgLocks(sub, uint32(classid), uint32(objid))
		if !ok {
			return li, fmt.Errorf("pg_locks shows an advisory lock with objsubid %d", sub)
		}
		li.setKey(key)
		if lb, ok := labels[key]; ok {
			li.Name = lb.name
			li.Schemes = lb.schemes
			if lb.slot >= 0 {
				li.Slot = &lb.slot
			}
		} else if m, ok := pglocks.MigrationLabel(key, db); ok {
			// A migration tool's own key: "goose migrations", ...
			li.Name = m
		}
		li.Mode = strings.TrimSuffix(strings.ToLower(li.Mode), "lock")
		li.BlockedBy = []int{}
		if !li.Granted {
			li.waitKeys = []string{li.Key}
			for _, p := range blocking {
				li.BlockedBy = append(li.BlockedBy, int(p))
			}
		}
		return li, nil
	})
	return locks, err
}

// holdersOnly narrows each waiter's BlockedBy, for the tree, to the
// sessions holding its key: pg_blocking_pids also names those waiting for
// the key ahead of it in a conflicting mode (soft blocks), which would put
// a waiter under its fellow waiters as well as under the holder. A waiter
// that only waits behind waiters (its mode suits the holders') keeps them.
func holdersOnly(locks []lockInfo) []lockInfo {
	holders := map[string][]int{}
	for _, l := range locks {
		if l.Granted {
			holders[l.Key] = append(holders[l.Key], l.PID)
		}
	}
	out := slices.Clone(locks)
	for i, l := range out {
		if l.Granted {
			continue
		}
		var hard []int
		for _, p := range l.BlockedBy {
			if slices.ContainsFunc(l.waitKeys, func(k string) bool { return slices.Contains(holders[k], p) }) {
				hard = append(hard, p)
			}
		}
		if len(hard) > 0 {
			out[i].BlockedBy = hard
		}
	}
	return out
}

// sortLocks orders locks: by --name, each NAME's key, then its slots in
// order, then the waits for any of them; then the locks no --name names, by
// key (bigint keys, then pairs, each in numeric order). Under one key the
// holders come first, then the waiters by the start of their wait (the
// server's queue order), then by pid.
func sortLocks(locks []lockInfo, names []string) {
	nameRank := func(l lockInfo) int {
		if i := slices.Index(names, l.Name); l.Name != "" && i >= 0 {
			return i
		}
		return len(names)
	}
	schemeRank := func(l lockInfo) int {
		if len(l.Schemes) == 0 {
			return 0
		}
		return slices.Index(nameSchemes, l.Schemes[0])
	}
	slotRank := func(l lockInfo) int {
		switch {
		case l.Name == "":
			return 0
		case l.Slot != nil:
			return *l.Slot
		case l.Slots > 0:
			return pglocks.MaxSlots
		}
		return -1
	}
	slices.SortStableFunc(locks, func(a, b lockInfo) int {
		return cmp.Or(
			cmp.Compare(nameRank(a), nameRank(b)),
			cmp.Compare(schemeRank(a), schemeRank(b)),
			cmp.Compare(slotRank(a), slotRank(b)),
			compareKeys(a.key, b.key),
			cmpBool(b.Granted, a.Granted),
			cmpBool(a.Since.IsZero(), b.Since.IsZero()),
			a.Since.Compare(b.Since),
			cmp.Compare(a.PID, b.PID),
		)
	})
}

// compareKeys orders keys: bigint keys, then pairs, each numerically; the
// zero Key last.
func compareKeys(a, b pglocks.Key) int {
	kind := func(k pglocks.Key) (int, int64, int64) {
		if id, ok := k.Int64(); ok {
			return 0, id, 0
		}
		if x, y, ok := k.Int32s(); ok {
			return 1, int64(x), int64(y)
		}
		return 2, 0, 0
	}
	ak, a1, a2 := kind(a)
	bk, b1, b2 := kind(b)
	return cmp.Or(cmp.Compare(ak, bk), cmp.Compare(a1, b1), cmp.Compare(a2, b2))
}

// cmpBool orders false before true.
func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

func printLocks(w io.Writer, locks []lockInfo) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tNAME\tMODE\tSTATE\tPID\tAPPLICATION\tCLIENT\tSINCE\tBLOCKED BY")
	for _, l := range locks {
		state := "held"
		switch {
		case l.Multiplexed:
			state = "waiting (multiplexed)"
		case !l.Granted:
			state = "waiting"
		}
		var by []string
		for _, p := range l.BlockedBy {
			by = append(by, strconv.Itoa(p))
		}
		since := "-"
		if !l.Since.IsZero() {
			since = l.Since.Local().Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", dash(l.Key), dash(l.Label), dash(l.Mode), state, l.PID,
			dash(l.Application), dash(l.Client), since, dash(strings.Join(by, ",")))
	}
	tw.Flush()
	if len(locks) == 0 {
		fmt.Fprintln(w, "(no advisory locks)")
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
