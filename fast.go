package pglocks

// fast.go: the lock statements sent through pgx's connection layer
// (pgconn) directly, each prepared once per session: they take and return
// only integers, booleans and text, so they need none of pgx's type
// machinery, and a statement costs a few allocations instead of a dozen.

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// hot are the statements sent on every lock, release and wait: those
// prepared on a session (see fastConn). Others (a session's setup, once)
// go through pgx.
var hot = func() map[string]bool {
	m := map[string]bool{sqlNotify: true}
	for _, byShared := range statements {
		for _, byPair := range byShared {
			for _, byFenced := range byPair {
				for _, q := range byFenced {
					if q != "" {
						m[q] = true
					}
				}
			}
		}
	}
	return m
}()

// fastConn is the prepared statements of one pgx session, and buffers for
// their arguments.
type fastConn struct {
	stmts  map[string]*pgconn.StatementDescription
	params [4][]byte
	buf    []byte
}

// fastPrefix names the statements fastConn prepares.
const fastPrefix = "pglocks_"

// stateDuplicatePrepared is SQLSTATE duplicate_prepared_statement.
const stateDuplicatePrepared = "42P05"

// usable reports whether rows can all go the fast way: hot statements with
// arguments fastConn encodes.
func (f *fastConn) usable(rows []row) bool {
	for _, r := range rows {
		if !hot[r.q] || len(r.args) > len(f.params) {
			return false
		}
	}
	return true
}

// prepared returns q's statement on pc, preparing it the first time.
func (f *fastConn) prepared(ctx context.Context, pc *pgconn.PgConn, q string) (*pgconn.StatementDescription, error) {
	if sd := f.stmts[q]; sd != nil {
		return sd, nil
	}
	if f.stmts == nil {
		f.stmts = make(map[string]*pgconn.StatementDescription)
	}
	name := fastPrefix + strconv.Itoa(len(f.stmts))
	sd, err := pc.Prepare(ctx, name, q, nil)
	if sqlState(err) == stateDuplicatePrepared {
		// Left on the connection by a session that never gave it back
		// politely: ours to replace.
		if err = pc.Deallocate(ctx, name); err == nil {
			sd, err = pc.Prepare(ctx, name, q, nil)
		}
	}
	if err != nil {
		return nil, err
	}
	f.stmts[q] = sd
	return sd, nil
}

// encode writes args in the text format into f's buffers. The slices it
// returns are valid until the next encode.
func (f *fastConn) encode(args []any) ([][]byte, error) {
	f.buf = f.buf[:0]
	var at [4]int
	for i, a := range args {
		at[i] = len(f.buf)
		switch v := a.(type) {
		case int64:
			f.buf = strconv.AppendInt(f.buf, v, 10)
		case int32:
			f.buf = strconv.AppendInt(f.buf, int64(v), 10)
		case int:
			f.buf = strconv.AppendInt(f.buf, int64(v), 10)
		case bool:
			f.buf = strconv.AppendBool(f.buf, v)
		case string:
			f.buf = append(f.buf, v...)
		default:
			return nil, fmt.Errorf("pglocks: cannot send %T", a)
		}
	}
	ps := f.params[:len(args)]
	for i := range args {
		end := len(f.buf)
		if i+1 < len(args) {
			end = at[i+1]
		}
		ps[i] = f.buf[at[i]:end:end]
	}
	return ps, nil
}

// errNoRow says that a statement that returns one row returned none.
var errNoRow = errors.New("pglocks: the statement returned no row")

// scanText reads the text-format values of one row into dest.
func scanText(vals [][]byte, dest []any) error {
	if len(vals) != len(dest) {
		return fmt.Errorf("pglocks: %d columns, want %d", len(vals), len(dest))
	}
	for i, v := range vals {
		if v == nil {
			return fmt.Errorf("pglocks: column %d is NULL", i+1)
		}
		switch d := dest[i].(type) {
		case *bool:
			*d = len(v) == 1 && v[0] == 't'
		case *int64:
			n, err := parseInt(v)
			if err != nil {
				return err
			}
			*d = n
		case *int32:
			n, err := parseInt(v)
			if err != nil {
				return err
			}
			*d = int32(n)
		case *string:
			*d = string(v)
		default:
			return fmt.Errorf("pglocks: cannot scan into %T", dest[i])
		}
	}
	return nil
}

// parseInt is strconv.ParseInt of a column's text without a string made of
// it.
func parseInt(b []byte) (int64, error) {
	neg := len(b) > 0 && b[0] == '-'
	digits := b
	if neg {
		digits = b[1:]
	}
	if len(digits) == 0 || len(digits) > 19 {
		return strconv.ParseInt(string(b), 10, 64) // its error, or a long form
	}
	var n uint64
	for _, c := range digits {
		if c < '0' || c > '9' {
			return strconv.ParseInt(string(b), 10, 64)
		}
		n = n*10 + uint64(c-'0')
	}
	if n > 1<<63-1 && !(neg && n == 1<<63) {
		return strconv.ParseInt(string(b), 10, 64)
	}
	if neg {
		return -int64(n), nil
	}
	return int64(n), nil
}

// query runs one hot statement on pc and scans its one row into dest.
func (f *fastConn) query(ctx context.Context, pc *pgconn.PgConn, q string, args []any, dest []any) error {
	sd, err := f.prepared(ctx, pc, q)
	if err != nil {
		return err
	}
	ps, err := f.encode(args)
	if err != nil {
		return err
	}
	rr := pc.ExecStatement(ctx, sd, ps, nil, nil)
	rows := 0
	var serr error
	for rr.NextRow() {
		if rows == 0 {
			serr = scanText(rr.Values(), dest)
		}
		rows++
	}
	if _, err := rr.Close(); err != nil {
		return err
	}
	if serr == nil && rows == 0 && len(dest) > 0 {
		serr = errNoRow
	}
	return serr
}

// batch runs rows, hot statements, in one round trip, as conn.batch does.
func (f *fastConn) batch(ctx context.Context, pc *pgconn.PgConn, rows []row) (failed int, err, closeErr error) {
	// Prepared first, each in a round trip of its own the first time: a
	// failure then has sent nothing of the batch.
	sds := make([]*pgconn.StatementDescription, len(rows))
	for i, r := range rows {
		sd, err := f.prepared(ctx, pc, r.q)
		if err != nil {
			return -1, nil, fmt.Errorf("prepare: %w", err)
		}
		sds[i] = sd
	}
	b := &pgconn.Batch{}
	for i, r := range rows {
		sd := sds[i]
		ps, err := f.encode(r.args)
		if err != nil {
			return i, err, nil
		}
		b.ExecStatement(sd, ps, nil, nil) // copies ps
	}
	return readBatch(pc.ExecBatch(ctx, b), rows)
}

// readBatch reads the results of rows, sent as one batch, into their dest,
// and returns what conn.batch does.
func readBatch(mrr *pgconn.MultiResultReader, rows []row) (failed int, err, closeErr error) {
	failed = -1
	i := 0
	for ; i < len(rows) && mrr.NextResult(); i++ {
		rr := mrr.ResultReader()
		n := 0
		var serr error
		for rr.NextRow() {
			if n == 0 {
				serr = scanText(rr.Values(), rows[i].dest)
			}
			n++
		}
		_, rerr := rr.Close()
		switch {
		case rerr != nil:
			serr = rerr
		case serr == nil && n == 0 && len(rows[i].dest) > 0:
			serr = errNoRow
		}
		if serr != nil {
			failed, err = i, serr
			break
		}
	}
	cerr := mrr.Close()
	if failed < 0 && i < len(rows) {
		// The server stopped at statement i: its error is the batch's.
		if sqlState(cerr) != "" {
			return i, cerr, nil
		}
		if cerr == nil {
			cerr = fmt.Errorf("pglocks: a batch of %d statements returned %d results", len(rows), i)
		}
		return i, cerr, cerr
	}
	if failed >= 0 && errors.Is(cerr, err) {
		cerr = nil // said once, as the statement's
	}
	return failed, err, cerr
}

// deallocate is the statement that drops what f prepared, or "".
func (f *fastConn) deallocate() string {
	if len(f.stmts) == 0 {
		return ""
	}
	var b strings.Builder
	for i := range len(f.stmts) {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString("DEALLOCATE " + fastPrefix + strconv.Itoa(i))
	}
	return b.String()
}
