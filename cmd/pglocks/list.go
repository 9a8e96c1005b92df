package main

import (
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
(a bigint, or A,B for the int4-pair key space), its name when given with
--name, mode, state, the session's pid, application and client, since when
(the wait's start for a waiter; the session's start for a holder, as the
server does not record when a lock was granted), and who blocks a waiter.
A lock a prepared transaction holds (pg_advisory_xact_lock, then PREPARE
TRANSACTION) has pid 0 and names the transaction, since it holds it until
COMMIT PREPARED or ROLLBACK PREPARED; a waiter it blocks says "blocked by
0". Without the pg_read_all_stats role, the client of another role's
session shows as -, and so does its since when it holds a lock. With
--tree it shows who blocks whom instead, like ps --forest: each
session that waits for nobody, with the sessions waiting for it under it
(how long, for which key), and theirs under them. With --stats it counts
the held and waiting advisory locks of every database, and how full the
server's lock table is (max_locks_per_transaction × (max_connections +
max_prepared_transactions) entries; when it is full every session fails).
With -k all, --name labels NAME's key under every scheme (id and pair only
when NAME is one), and says which: NAME (dotnet), NAME (dotnet, id).
`

// lockInfo is one row of "pglocks ls".
type lockInfo struct {
	Key         string    `json:"key"`
	Bigint      *int64    `json:"bigint"`
	Pair        *[2]int32 `json:"pair"`
	Name        string    `json:"name,omitempty"`
	Schemes     []string  `json:"schemes,omitempty"` // with -k all, the schemes that make Name this key
	Slot        *int      `json:"slot,omitempty"`    // a slot of Name (pglocks run --slots)
	Mode        string    `json:"mode"`
	Granted     bool      `json:"granted"`
	PID         int       `json:"pid"`                // 0 for a prepared transaction
	Prepared    string    `json:"prepared,omitempty"` // the gid of the prepared transaction that holds it
	Application string    `json:"application"`
	Client      string    `json:"client"`
	Since       time.Time `json:"since,omitzero"` // unknown without the right to see the session (pg_read_all_stats)
	BlockedBy   []int     `json:"blocked_by"`     // 0 is a prepared transaction, as pg_blocking_pids says
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
	fs.BoolVar(&stats, "stats", false, "count held and waiting locks per database, and the lock table's fill")
	fs.DurationVar(&watch, "watch", 0, "print again every DURATION until interrupted")
	fs.Var(&names, "name", "label the lock of this NAME (repeatable)")
	keyFlag(fs, &scheme, "how --name values become keys: ")
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
			addLabel(labels, sk.key, n, -1, sk.scheme)
			// The slots of NAME (pglocks run --slots), whatever their number.
			for i := range pglocks.MaxSlots {
				addLabel(labels, sk.key.Slot(i), n, i, sk.scheme)
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
	for {
		var out any
		var err error
		switch {
		case stats:
			var s lockStats
			s, err = readStats(ctx, pool)
			out = s
		default:
			var locks []lockInfo
			locks, err = listLocks(ctx, pool, labels)
			locks = grouped(locks, names)
			out = locks
			if tree && err == nil {
				// The wait's age by the server's clock, as Since is.
				var now time.Time
				err = pool.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&now)
				out = buildTree(holdersOnly(preparedNodes(locks)), now)
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return 0
			}
			fmt.Fprintf(stderr, "pglocks ls: %v\n", err)
			return exitDatabase
		}
		if asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			enc.SetEscapeHTML(false) // for people and jq: "<<", not "\u003c\u003c"
			_ = enc.Encode(out)
		} else {
			switch out := out.(type) {
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

// label is what --name says of a key: NAME, or slot i of NAME.
type label struct {
	name    string
	slot    int      // -1: NAME itself
	schemes []string // with -k all, the schemes that make NAME this key
}

// addLabel labels key as slot (-1: none) of name; scheme is "" but with -k
// all. A key that two schemes make of one NAME gets one label naming both;
// a later NAME replaces an earlier one.
func addLabel(labels map[pglocks.Key]label, key pglocks.Key, name string, slot int, scheme string) {
	lb, ok := labels[key]
	if !ok || lb.name != name || lb.slot != slot {
		lb = label{name: name, slot: slot}
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
		       coalesce(pg_blocking_pids(l.pid), '{}')
		FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
		-- a transaction lock of a prepared transaction has no session; the
		-- transaction's own lock, of the same virtual transaction, has its xid
		LEFT JOIN pg_locks x ON l.pid IS NULL AND x.pid IS NULL AND x.locktype = 'transactionid'
		                    AND x.virtualtransaction = l.virtualtransaction
		LEFT JOIN pg_prepared_xacts px ON px.transaction = x.transactionid
		WHERE l.locktype = 'advisory'
		  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
		ORDER BY l.classid, l.objid, l.objsubid, l.granted DESC, l.pid`)
	if err != nil {
		return nil, err
	}
	locks, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (li lockInfo, err error) {
		var sub int16
		var classid, objid int64
		var blocking []int32
		var since *time.Time
		if err := r.Scan(&sub, &classid, &objid, &li.Mode, &li.Granted, &li.PID, &li.Prepared, &li.Application, &li.Client, &since, &blocking); err != nil {
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
		if id, ok := key.Int64(); ok {
			li.Bigint = &id
		} else {
			a, b, _ := key.Int32s()
			li.Pair = &[2]int32{a, b}
		}
		li.Key = key.String()
		if lb, ok := labels[key]; ok {
			li.Name = lb.name
			li.Schemes = lb.schemes
			if lb.slot >= 0 {
				li.Slot = &lb.slot
			}
		}
		li.Mode = strings.TrimSuffix(strings.ToLower(li.Mode), "lock")
		li.BlockedBy = []int{}
		if !li.Granted {
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
			if slices.Contains(holders[l.Key], p) {
				hard = append(hard, p)
			}
		}
		if len(hard) > 0 {
			out[i].BlockedBy = hard
		}
	}
	return out
}

// grouped orders locks by --name: each NAME's key, then its slots in order,
// then the locks no --name names, as the server listed them.
func grouped(locks []lockInfo, names []string) []lockInfo {
	rank := func(li lockInfo) (int, int) {
		i := slices.Index(names, li.Name)
		if li.Name == "" || i < 0 {
			return len(names), 0
		}
		if li.Slot == nil {
			return i, -1
		}
		return i, *li.Slot
	}
	slices.SortStableFunc(locks, func(a, b lockInfo) int {
		an, as := rank(a)
		bn, bs := rank(b)
		if an != bn {
			return an - bn
		}
		return as - bs
	})
	return locks
}

func printLocks(w io.Writer, locks []lockInfo) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tNAME\tMODE\tSTATE\tPID\tAPPLICATION\tCLIENT\tSINCE\tBLOCKED BY")
	for _, l := range locks {
		state := "held"
		if !l.Granted {
			state = "waiting"
		}
		var by []string
		for _, p := range l.BlockedBy {
			by = append(by, strconv.Itoa(p))
		}
		key := l.Key
		if l.Pair != nil {
			key = "(" + key + ")"
		}
		name := l.Name
		if len(l.Schemes) > 0 {
			name += " (" + strings.Join(l.Schemes, ", ") + ")"
		}
		if l.Slot != nil {
			name = fmt.Sprintf("%s[slot %d]", name, *l.Slot)
		}
		since := "-"
		if !l.Since.IsZero() {
			since = l.Since.Local().Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", key, dash(name), l.Mode, state, l.PID,
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
