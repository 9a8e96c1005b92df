package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"slices"

	"github.com/jackc/pgx/v5/pgxpool"
)

// lockStats is "pglocks ls --stats".
type lockStats struct {
	Databases []dbStats   `json:"databases"`
	Names     []nameStats `json:"names,omitempty"` // each --name NAME, in the current database
	LockTable tableFill   `json:"lock_table"`

	database string // the current database
}

// dbStats counts one database's advisory locks.
type dbStats struct {
	Database string `json:"database"`
	Held     int    `json:"held"`
	Waiting  int    `json:"waiting"`
}

// nameStats counts the locks of one NAME (its key, and its slots) in a
// database, as ls lists them: Waiting counts the multiplexed waits too,
// which are not in pg_locks (nor in the database's count).
type nameStats struct {
	Name        string `json:"name"`
	Database    string `json:"database"`
	Held        int    `json:"held"`
	Waiting     int    `json:"waiting"`
	Multiplexed int    `json:"multiplexed"` // of Waiting
}

// tableFill is how full the server's shared lock table is: Used of
// Capacity = max_locks_per_transaction × (max_connections +
// max_prepared_transactions). Fast-path locks (a session's first few weak
// relation locks) are not in it, and are counted apart.
type tableFill struct {
	Used                    int     `json:"used"`
	FastPath                int     `json:"fast_path"`
	Capacity                int     `json:"capacity"`
	Percent                 float64 `json:"percent"` // of Capacity used, to two decimals
	MaxLocksPerTransaction  int     `json:"max_locks_per_transaction"`
	MaxConnections          int     `json:"max_connections"`
	MaxPreparedTransactions int     `json:"max_prepared_transactions"`
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
		       current_setting('max_locks_per_transaction')::int,
		       current_setting('max_connections')::int,
		       current_setting('max_prepared_transactions')::int,
		       current_database()`).
		Scan(&f.Used, &f.FastPath, &f.MaxLocksPerTransaction, &f.MaxConnections, &f.MaxPreparedTransactions, &s.database)
	f.Capacity = f.MaxLocksPerTransaction * (f.MaxConnections + f.MaxPreparedTransactions)
	if f.Capacity > 0 {
		f.Percent = math.Round(float64(f.Used)*100*100/float64(f.Capacity)) / 100
	}
	return s, err
}

// countNames counts the locks of each of names among locks, the current
// database's (labelled, multiplexed waits included).
func countNames(locks []lockInfo, names []string, database string) []nameStats {
	var out []nameStats
	for _, n := range names {
		if slices.ContainsFunc(out, func(ns nameStats) bool { return ns.Name == n }) {
			continue
		}
		ns := nameStats{Name: n, Database: database}
		for _, l := range locks {
			switch {
			case l.Name != n:
			case l.Granted:
				ns.Held++
			default:
				ns.Waiting++
				if l.Multiplexed {
					ns.Multiplexed++
				}
			}
		}
		out = append(out, ns)
	}
	return out
}

func printStats(w io.Writer, s lockStats) {
	for _, d := range s.Databases {
		fmt.Fprintf(w, "%s: %d held, %d waiting\n", d.Database, d.Held, d.Waiting)
	}
	if len(s.Databases) == 0 {
		fmt.Fprintln(w, "(no advisory locks)")
	}
	for _, n := range s.Names {
		mux := ""
		if n.Multiplexed > 0 {
			mux = fmt.Sprintf(" (%d multiplexed, not in pg_locks)", n.Multiplexed)
		}
		fmt.Fprintf(w, "%s (in %s): %d held, %d waiting%s\n", n.Name, n.Database, n.Held, n.Waiting, mux)
	}
	f := s.LockTable
	fmt.Fprintf(w, "lock table: %d of %d entries used (%.2f%%); %d fast-path locks are not in it\n", f.Used, f.Capacity, f.Percent, f.FastPath)
	fmt.Fprintf(w, "  %d = max_locks_per_transaction %d × (max_connections %d + max_prepared_transactions %d)\n",
		f.Capacity, f.MaxLocksPerTransaction, f.MaxConnections, f.MaxPreparedTransactions)
}
