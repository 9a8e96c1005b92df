package histories_test

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	_ "github.com/lib/pq"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/histories"
	"github.com/pglocks/pglocks/internal/pgtest"
)

var (
	srv *pgtest.Server

	runFor = flag.Duration("run-for", 3*time.Second, "how long each history's clients run")
	outDir = flag.String("histories", "", "where a failed check writes its history's visualization (default: $PGLOCKS_HISTORIES, else the system's temp dir)")
)

func TestMain(m *testing.M) { pgtest.Main(m, &srv, pgtest.CheckLeaks) }

// clearedWithin bounds how long a failed acquisition's session may still
// hold the key on the server: a wait whose socket was cut stays in the
// server's queue until its backend notices, within the 1 s of
// client_connection_check_interval that the Locker sets (seen here: about
// 200 ms), and one granted as it gave up holds until its unlock or its end
// reaches the server.
const clearedWithin = 2 * time.Second

// endedWithin bounds how long an acquisition whose session ended may have
// left the key held: until the session's backend exits, which the server
// does as it ends the session (a terminated backend, a closed connection).
const endedWithin = 500 * time.Millisecond

// heartbeat is the Lockers' heartbeat here: a silent session's locks are
// reported lost at most interval+timeout after it stops answering.
const hbInterval, hbTimeout = 250 * time.Millisecond, time.Second

// drivers open a Locker on dsn, and say how to close what they opened.
var drivers = []struct {
	name string
	open func(dsn string, opts ...pglocks.Option) (*pglocks.Locker, func(), error)
}{
	{"pgxpool", func(dsn string, opts ...pglocks.Option) (*pglocks.Locker, func(), error) {
		p, err := pgxpool.New(context.Background(), dsn)
		if err != nil {
			return nil, nil, err
		}
		l, err := pglocks.New(p, opts...)
		if err != nil {
			p.Close()
			return nil, nil, err
		}
		return l, func() { _ = l.Close(); p.Close() }, nil
	}},
	{"stdlib", sqlDriver("pgx")},
	{"libpq", sqlDriver("postgres")},
}

func sqlDriver(name string) func(dsn string, opts ...pglocks.Option) (*pglocks.Locker, func(), error) {
	return func(dsn string, opts ...pglocks.Option) (*pglocks.Locker, func(), error) {
		if name == "postgres" {
			// lib/pq sends what it does not know as a startup parameter.
			dsn = strings.Replace(dsn, "&default_query_exec_mode=simple_protocol", "", 1)
		}
		db, err := sql.Open(name, dsn)
		if err != nil {
			return nil, nil, err
		}
		l, err := pglocks.NewDB(db, opts...)
		if err != nil {
			db.Close()
			return nil, nil, err
		}
		return l, func() { _ = l.Close(); db.Close() }, nil
	}
}

// A fault is done to the clients' sessions while they run: inject does it
// once, and returns when (in the history's time) and to which client (-1:
// all, or unknown), for the loss-detection bound.
type fault struct {
	name string
	// private runs the history on a server of its own (one the fault
	// restarts).
	private bool
	// setup prepares what the fault needs, given the server and the
	// database's DSN, and returns the DSN the clients use and the fault
	// itself.
	setup func(t testing.TB, s *pgtest.Server, dsn string) (clientDSN string, inject injector)
	every time.Duration
}

// injector does a fault once, to the sessions of key's clients in the
// database db, and says what it did.
type injector func(t testing.TB, h *histories.History, key pglocks.Key, db string) []injected

// injected is one fault done: when, and to which client's session (pid 0:
// every session).
type injected struct {
	at, done int64 // when it was done, and when it was over (the session gone)
	pid      int   // the server session ended; 0: every session (a cut)
}

// faults are the faults of the matrix (see RELIABILITY.md). A cut network
// and a PgBouncer killed sever a waiting session's connection without
// ending its backend, which stays in the server's queue until it notices
// (within client_connection_check_interval, 1 s) and may be granted the key
// then, after its client took it again on a new session and let it go: the
// model's ghost holds, which begin at any moment until their Cleared op.
var faults = []fault{
	{name: "terminate", every: 60 * time.Millisecond, setup: func(t testing.TB, s *pgtest.Server, dsn string) (string, injector) {
		return dsn, terminateHolders
	}},
	{name: "restart", private: true, every: time.Second, setup: func(t testing.TB, s *pgtest.Server, dsn string) (string, injector) {
		return dsn, everySession(func() error { return s.Restart("fast") })
	}},
	{name: "pgbouncer", every: 60 * time.Millisecond, setup: func(t testing.TB, s *pgtest.Server, dsn string) (string, injector) {
		b, err := srv.StartPgBouncer("transaction")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(b.Stop)
		return b.DB(dsn), terminateHolders // through transaction pooling, the server's sessions ended
	}},
	{name: "cut", every: 400 * time.Millisecond, setup: func(t testing.TB, s *pgtest.Server, dsn string) (string, injector) {
		cfg, err := pgx.ParseConfig(dsn)
		if err != nil {
			t.Fatal(err)
		}
		proxy, err := pgtest.NewProxy(fmt.Sprintf("%s:%d", cfg.Host, cfg.Port))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(proxy.Close)
		via := strings.Replace(dsn, fmt.Sprintf("%s:%d", cfg.Host, cfg.Port), proxy.Addr(), 1)
		// Every connection through it ends, as a network failure would.
		return via, everySession(func() error { proxy.Cut(); return nil })
	}},
	{name: "pgbouncer-restart", every: 700 * time.Millisecond, setup: func(t testing.TB, s *pgtest.Server, dsn string) (string, injector) {
		b, err := srv.StartPgBouncer("transaction")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(b.Stop)
		return b.DB(dsn), everySession(b.Restart) // SIGKILL: every client and server connection ends
	}},
}

// everySession is a fault, done by do, that ends every session at once.
func everySession(do func() error) injector {
	return func(t testing.TB, h *histories.History, _ pglocks.Key, _ string) []injected {
		at := h.Now()
		if err := do(); err != nil {
			t.Error(err)
		}
		return []injected{{at: at, done: h.Now()}}
	}
}

// terminateHolders ends the server sessions of the clients that hold key
// (or its slots): it signals them all at once, then waits until each has
// exited, and returns them.
func terminateHolders(t testing.TB, h *histories.History, key pglocks.Key, db string) []injected {
	at := h.Now()
	rows, err := srv.Admin.Query(context.Background(), `
		WITH holders AS MATERIALIZED (
			SELECT DISTINCT l.pid
			FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid JOIN pg_database d ON d.oid = l.database
			WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1 AND a.application_name LIKE 'hist-c%')
		SELECT pid FROM holders WHERE pg_terminate_backend(pid)`, db)
	if err != nil {
		t.Error(err)
		return nil
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Error(err)
	}
	for end := time.Now().Add(5 * time.Second); len(pids) > 0; time.Sleep(time.Millisecond) {
		var left int
		if err := srv.Admin.QueryRow(context.Background(), "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", pids).Scan(&left); err != nil {
			t.Error(err)
			return nil
		}
		if left == 0 {
			break
		}
		if time.Now().After(end) {
			t.Errorf("terminated sessions %v still there after 5 s", pids)
			return nil
		}
	}
	done := h.Now()
	var out []injected
	for _, pid := range pids {
		out = append(out, injected{at: at, done: done, pid: int(pid)})
	}
	return out
}

// figures are what one history showed.
type figures struct {
	ops, grants, losses, injected int
	detect                        time.Duration // the longest from a fault to its holder seeing the loss
}

// run is a set of clients on one key (slots > 0: its slots) under a
// fault, whose histories are checked window by window.
type run struct {
	f       fault
	slots   int
	key     pglocks.Key
	db      string
	inject  injector
	lockers []*pglocks.Locker
	// cheat, if set, is the seeded violation: client 0 reports a try that
	// found the key held as a grant, holds "it" a moment and reports its
	// release, as a lock that broke exclusion would (TestSeededViolation).
	cheat bool
}

// newRun opens the clients' Lockers, each with its sessions ready; they
// are closed when t ends.
func newRun(t testing.TB, open func(string, ...pglocks.Option) (*pglocks.Locker, func(), error), f fault, slots int) *run {
	server := srv
	if f.private {
		server = pgtest.Local(t, pgtest.Options{})
	}
	dsn := server.DB(t)
	r := &run{f: f, slots: slots, key: pglocks.Name("history:" + t.Name()), db: dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]}
	clientDSN, inject := f.setup(t, server, dsn)
	r.inject = inject
	const clients = 6
	for c := range clients {
		opts := []pglocks.Option{pglocks.WithApplicationName(fmt.Sprintf("hist-c%d", c)), pglocks.WithHeartbeat(hbInterval, hbTimeout)}
		if slots == 0 {
			opts = append(opts, pglocks.WithFencingTokens())
		}
		l, closeL, err := open(clientDSN, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(closeL) // before the database's check for what is left
		warm, err := l.Lock(t.Context(), r.key, lockOpts(slots)...)
		if err != nil {
			t.Fatal(err)
		}
		if err := warm.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
		r.lockers = append(r.lockers, l)
	}
	return r
}

// runHistory runs clients on one key (slots > 0: one of its slots) under
// f for -run-for, and checks the history.
func runHistory(t *testing.T, open func(string, ...pglocks.Option) (*pglocks.Locker, func(), error), f fault, slots int) figures {
	return newRun(t, open, f, slots).window(t, *runFor)
}

// window runs the clients for d under the fault, records the history and
// checks it.
func (r *run) window(t testing.TB, d time.Duration) figures {
	f, slots, key, db := r.f, r.slots, r.key, r.db
	h := histories.NewHistory()
	var mu sync.Mutex
	ends := map[int]int64{} // index of an acquisition in held -> when its hold ended
	var held []heldRecord   // acquisitions granted, for the checks after
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for c, l := range r.lockers {
		wg.Go(func() {
			rnd := rand.New(rand.NewPCG(uint64(c), uint64(time.Now().UnixNano())))
			for {
				select {
				case <-stop:
					return
				default:
				}
				if r.cheat && c == 0 {
					cheatCycle(h, l, key)
					continue
				}
				if r, ok := cycle(h, l, c, key, slots, rnd); ok {
					mu.Lock()
					held = append(held, r)
					mu.Unlock()
				}
			}
		})
	}
	var injections []injected
	deadline := time.After(d)
	tick := time.NewTicker(f.every)
	for running := true; running; {
		select {
		case <-deadline:
			running = false
		case <-tick.C:
			injections = append(injections, r.inject(t, h, key, db)...)
		}
	}
	tick.Stop()
	close(stop)
	wg.Wait()

	ops := h.Ops()
	var fig figures
	fig.ops, fig.injected = len(ops), len(injections)
	for _, r := range held {
		fig.grants++
		if r.lost >= 0 {
			fig.losses++
		}
	}
	n := max(slots, 1)
	res, info := histories.Check(ops, n, 2*time.Minute)
	if r.cheat {
		// The seeded violation must be caught, and its visualization written.
		path := visualize(t, n, info)
		if res != porcupine.Illegal {
			t.Fatalf("the history with a client that reports held keys as grants is %s, want %s", res, porcupine.Illegal)
		}
		if _, err := os.Stat(path); err != nil {
			t.Fatalf("no visualization: %v", err)
		}
		t.Logf("the seeded violation was caught in a history of %d operations; visualization: %s", len(ops), path)
		return figures{ops: len(ops)}
	}
	if res != porcupine.Ok {
		path := visualize(t, n, info)
		if f, err := os.Create(path + ".ops"); err == nil {
			for _, op := range ops {
				fmt.Fprintln(f, op.Client, op.Kind, op.Outcome, op.Call, op.Return)
			}
			for _, inj := range injections {
				fmt.Fprintln(f, "fault", inj.at, inj.done, inj.pid)
			}
			f.Close()
		}
		t.Fatalf("the history of %d operations is %s for a %s of %d that a loss may end; its visualization: %s", len(ops), res, map[bool]string{true: "lock", false: "semaphore"}[n == 1], n, path)
	}
	// Tokens never go backwards (exclusive: each grant's token is above
	// those of holds that ended before it was asked for).
	if slots == 0 {
		var acqs []histories.Op
		for i, r := range held {
			acqs = append(acqs, r.acq)
			ends[i] = r.end
		}
		if bad := histories.TokensBackwards(acqs, ends); len(bad) > 0 {
			t.Fatalf("%d pairs of tokens go backwards, e.g. %v (token %d) then %v (token %d)", len(bad), bad[0][0], bad[0][0].Token, bad[0][1], bad[0][1].Token)
		}
		for _, r := range held {
			if r.acq.Token == 0 {
				t.Fatalf("a grant with fencing tokens on had token 0: %v", r.acq)
			}
		}
	}
	// Each fault to a holder's session is seen by that holder within the
	// heartbeat's bound (interval+timeout), with a second's margin for a
	// loaded machine.
	bound := hbInterval + hbTimeout + time.Second
	for _, inj := range injections {
		for _, r := range held {
			// A hold that was granted before the fault (its session then
			// gone: pg_terminate_backend waits for it to exit) and
			// released after it.
			if (inj.pid == 0 || inj.pid == r.pid) && r.acq.Return <= inj.at && inj.done <= r.relCall {
				if r.lost < 0 {
					t.Fatalf("c%d held the key (%v) when the fault came at %.3f ms, and saw no loss: its Release, called at %.3f ms, returned nil at %.3f ms",
						r.acq.Client, r.acq, float64(inj.at)/1e6, float64(r.relCall)/1e6, float64(r.end)/1e6)
				}
				d := time.Duration(r.lost - inj.at)
				fig.detect = max(fig.detect, d)
				if d > bound {
					t.Errorf("c%d saw its loss %v after the fault, beyond the bound of %v", r.acq.Client, d, bound)
				}
			}
		}
	}
	// Nothing is left: the clients' Lockers close when t ends, before the
	// database's own check of what is left.
	return fig
}

// heldRecord is one granted acquisition: the op, when its hold ended (its
// release returned, or its loss was seen), and when its loss was seen (-1:
// none).
type heldRecord struct {
	acq     histories.Op
	pid     int   // the server session holding it (0: not known)
	relCall int64 // when Release was called
	end     int64
	lost    int64
}

// cycle is one client's round: acquire (a wait with a short deadline, or a
// try), hold a moment, release; it records each operation, and a loss
// when the hold sees one.
func cycle(h *histories.History, l *pglocks.Locker, c int, key pglocks.Key, slots int, rnd *rand.Rand) (heldRecord, bool) {
	opts := lockOpts(slots)
	try := rnd.IntN(2) == 0
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(10+rnd.IntN(190))*time.Millisecond)
	call := h.Now()
	var lk *pglocks.Lock
	var err error
	if try {
		lk, err = l.TryLock(ctx, key, opts...)
	} else {
		lk, err = l.Lock(ctx, key, opts...)
	}
	cancel()
	ret := h.Now()
	acq := histories.Op{Client: c, Kind: histories.Acquire, Call: call, Return: ret}
	switch {
	case err == nil:
		acq.Outcome, acq.Token = histories.OK, lk.Token()
	case try && slots == 0 && errors.Is(err, pglocks.ErrLocked):
		// A slot's TryLock may leave a slot it let go a moment ago to a
		// waiter elsewhere: its ErrLocked does not say all n were held.
		acq.Outcome = histories.Held
	case errors.Is(err, pglocks.ErrClosed) || strings.Contains(err.Error(), "connect: "):
		// No connection to be had: nothing taken. (A session that ended
		// during the acquisition may have been granted the key a moment
		// before: Unknown.)
		acq.Outcome = histories.Failed
	case sqlState(err) == "55P03":
		// The server ended the wait at its lock_timeout (the deadline's):
		// it did not grant it.
		acq.Outcome = histories.Failed
	default:
		acq.Outcome = histories.Unknown
	}
	h.Add(acq)
	if acq.Outcome == histories.Unknown {
		// What it may hold is let go by the time the Locker's unlock, or
		// its session's end, reaches the server (see clearedWithin); a
		// session that had ended is gone once its backend has exited.
		within := clearedWithin
		if errors.Is(err, pglocks.ErrSessionEnded) {
			within = endedWithin
		}
		h.Add(histories.Op{Client: c, Kind: histories.Cleared, Call: ret + 1, Return: ret + int64(within)})
	}
	if err != nil {
		return heldRecord{}, false
	}
	r := heldRecord{acq: acq, lost: -1}
	// The session that holds it, so that a fault can be matched to the
	// hold it ends (a client's other session may hold the key for a moment
	// after a failed acquisition: see the Cleared op).
	hk := key
	if slots > 0 {
		hk = key.Slot(lk.Slot())
	}
	if hs, err := l.Holders(context.Background(), hk); err == nil && len(hs) == 1 {
		r.pid = int(hs[0].PID)
	}
	select {
	case <-lk.Done():
		r.lost = h.Now()
	case <-time.After(holdFor(rnd)):
	}
	call = h.Now()
	r.relCall = call
	err = lk.Release(context.Background())
	ret = h.Now()
	rel := histories.Op{Client: c, Kind: histories.Release, Call: call, Return: ret, Outcome: histories.OK}
	switch {
	case err == nil:
	case errors.Is(err, pglocks.ErrLockLost):
		rel.Outcome = histories.Lost
		if r.lost < 0 {
			r.lost = ret
		}
	default:
		// The unlock failed, its connection closed: the lock is gone, at
		// some moment up to now.
		rel.Outcome = histories.Unknown
		if r.lost < 0 {
			r.lost = ret
		}
	}
	if r.lost >= 0 {
		h.Add(histories.Op{Client: c, Kind: histories.Loss, Outcome: histories.OK, Call: acq.Call, Return: r.lost})
		h.Add(histories.Op{Client: c, Kind: histories.Cleared, Call: r.lost + 1, Return: r.lost + int64(clearedWithin)})
	}
	h.Add(rel) // a Release that said nil after its hold saw a loss fails the check
	r.end = ret
	return r, true
}

// sqlState returns the SQLSTATE of a server error in err (pgx or lib/pq).
func sqlState(err error) string {
	var e interface{ SQLState() string }
	if errors.As(err, &e) {
		return e.SQLState()
	}
	return ""
}

// holdFor is how long a client holds: mostly a few milliseconds, sometimes
// long enough for a fault to come in the middle.
func holdFor(rnd *rand.Rand) time.Duration {
	if rnd.IntN(5) == 0 {
		return 30*time.Millisecond + time.Duration(rnd.IntN(30))*time.Millisecond
	}
	return time.Duration(rnd.IntN(4000)) * time.Microsecond
}

func lockOpts(slots int) []pglocks.LockOption {
	if slots > 0 {
		return []pglocks.LockOption{pglocks.Slots(slots)}
	}
	return nil
}

// cheatCycle is client 0's round in TestSeededViolation: a try that finds
// the key held is recorded as a grant, and a release follows.
func cheatCycle(h *histories.History, l *pglocks.Locker, key pglocks.Key) {
	call := h.Now()
	lk, err := l.TryLock(context.Background(), key)
	ret := h.Now()
	if err == nil {
		h.Add(histories.Op{Client: 0, Kind: histories.Acquire, Outcome: histories.OK, Call: call, Return: ret})
		call = h.Now()
		_ = lk.Release(context.Background())
		h.Add(histories.Op{Client: 0, Kind: histories.Release, Outcome: histories.OK, Call: call, Return: h.Now()})
		return
	}
	if !errors.Is(err, pglocks.ErrLocked) {
		return
	}
	h.Add(histories.Op{Client: 0, Kind: histories.Acquire, Outcome: histories.OK, Call: call, Return: ret}) // the lie
	time.Sleep(time.Millisecond)
	call = h.Now()
	h.Add(histories.Op{Client: 0, Kind: histories.Release, Outcome: histories.OK, Call: call, Return: h.Now()})
}

// visualize writes the history's visualization where a CI log can say it,
// and returns its path.
func visualize(t testing.TB, n int, info porcupine.LinearizationInfo) string {
	dir := *outDir
	if dir == "" {
		dir = os.Getenv("PGLOCKS_HISTORIES")
	}
	if dir == "" {
		dir = os.TempDir()
	}
	path := filepath.Join(dir, "pglocks-history-"+strings.ReplaceAll(t.Name(), "/", "-")+".html")
	if err := porcupine.VisualizePath(histories.Model(n), info, path); err != nil {
		t.Logf("visualization: %v", err)
	}
	return path
}

// A lock that breaks exclusion is caught: one client, through a hook in
// this harness, reports tries that found the key held as grants; the
// history of that run, under faults as the others, must be found illegal.
func TestSeededViolation(t *testing.T) {
	dir := t.TempDir() // not in parallel: t.Setenv
	t.Setenv("PGLOCKS_HISTORIES", dir)
	r := newRun(t, drivers[0].open, faults[0], 0)
	r.cheat = true
	r.window(t, 2*time.Second)
}

// The matrix: every fault on every driver, on one exclusive key, and on
// one of 3 slots for terminated sessions.
func TestHistories(t *testing.T) {
	t.Parallel()
	for _, f := range faults {
		for _, d := range drivers {
			for _, slots := range []int{0, 3} {
				if slots > 0 && f.name != "terminate" {
					continue
				}
				name := f.name + "/" + d.name
				if slots > 0 {
					name += "/slots"
				}
				t.Run(name, func(t *testing.T) {
					t.Parallel()
					fig := runHistory(t, d.open, f, slots)
					t.Logf("RELIABILITY %s %s slots=%d: %d operations, %d grants, %d losses, %d faults, longest detection %v, history linearizable",
						f.name, d.name, slots, fig.ops, fig.grants, fig.losses, fig.injected, fig.detect.Round(time.Millisecond))
					// Faults every 60 ms meet some holds in every run; a
					// restart or a cut every half second or so may not.
					if fig.grants == 0 || (f.every <= 100*time.Millisecond && fig.losses == 0) {
						t.Fatalf("the history shows %d grants and %d losses: the faults did not meet the holds", fig.grants, fig.losses)
					}
				})
			}
		}
	}
}
