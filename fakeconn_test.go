package pglocks

// The fake server: an in-memory PostgreSQL for unit tests, modelled on
// database/sql's fakedb_test.go. Its one job is to answer, behind the
// engine's narrow driver interfaces (source, conn), every statement the
// engine sends (see sql.go), with the semantics of session-level advisory
// locks, so that the engine's bookkeeping can be tested fast and
// deterministically, with no PostgreSQL, and faults that a real server
// cannot be made to produce on demand.
//
// What it models:
//
//   - Advisory locks (int64 keys and int32 pairs, exclusive and shared) held
//     per session and counted as PostgreSQL counts them (a session may take
//     a key it holds again); a FIFO queue per key: pg_advisory_lock waits,
//     and is granted in queue order; a try never jumps the queue; a wait
//     that would close a cycle fails at once with 40P01; a lock table of a
//     chosen size (53200 when full).
//   - Statements are recognised by their shape, not their text: a tiny
//     evaluator runs the SELECT lists the engine sends (function calls,
//     CASE, casts, concat, a FROM (subquery)), left to right as PostgreSQL
//     does, with pg_[try_]advisory_lock[_shared], pg_advisory_unlock
//     [_shared], pg_advisory_unlock_all, set_config, current_setting,
//     pg_backend_pid, pg_is_in_recovery, pg_current_xact_id, pg_notify,
//     pg_cancel_backend, concat, coalesce, to_char(clock_timestamp()); the
//     multi-key statement (string_to_array) and pg_locks have handlers of
//     their own. Anything else is a violation.
//   - Transactions: each statement is one, and so is a pipelined batch; a
//     failure rolls back set_config(…, false) and drops the notifications
//     queued in it; set_config(…, true) lasts until its end; advisory
//     locks, being session-level, stay.
//   - LISTEN/NOTIFY, read with waitIdle, which honours setReadDeadline (a
//     past deadline is an error for which pgconn.Timeout is true) and
//     returns the notifications that came earlier first.
//   - Faults: a cut socket, a session the server terminates, a silent
//     network, a statement that hangs, one that fails, a gate that holds an
//     answer back (for races), cancel requests (57014), lock_timeout
//     (55P03), and drivers without pipelining, without interruption (lib/pq)
//     or without a readable idle socket.
//
// It also checks the engine: a violation is recorded (and fails the test at
// cleanup) when a session goes back to the pool holding a lock, listening,
// waiting, with a statement or a watcher on it, with its settings not put
// back or a read deadline left; when a connection is used after it was
// given up; when two statements or a statement and a watcher share a
// session; when a statement is not one the fake knows.
//
// Locking: fakeServer.mu guards every mutable field of the server, of its
// sessions (fakeSession), sources (fakeSource), connections (fakeConn),
// locks and waiters. Whoever must wait (a lock wait, a hung or silent
// statement, waitIdle, a pool that is full) releases it and waits on
// fakeServer.changed, which bump closes and replaces whenever anything
// changes. Hooks (onStmt, onCancel) run without it.

import (
	"cmp"
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// fakeServer is one in-memory server (one database).
type fakeServer struct {
	t *testing.T

	mu      sync.Mutex
	changed chan struct{} // closed and replaced by bump

	nextPID  int32
	xid      int64 // the last transaction id handed out
	sessions map[int32]*fakeSession
	locks    map[Key]*fakeLock
	// maxEntries is the size of the lock table in (session, key, mode)
	// entries, 0 for no limit.
	maxEntries int
	standby    bool
	defaults   map[string]string // a new session's settings; absent: the server lacks it

	hooks       []*fakeHook
	cancelHooks []*fakeCancelHook
	violations  []string
	events      []fakeEvent
	batches     []fakeBatch
	stmts       map[string]int // statements run, by kind
	timeouts    int            // waits ended by lock_timeout
	cancels     int            // cancel requests received (cancel, pg_cancel_backend)
}

// fakeSession is one server session (a backend) and the client connection
// to it.
type fakeSession struct {
	srv     *fakeServer
	pid     int32
	src     *fakeSource // nil for a test's own session
	caps    fakeCaps
	started time.Time

	settings  map[string]string
	initial   map[string]string // as connected: what release checks
	listening map[string]bool
	notes     []*pgconn.Notification // received, not yet read
	deadline  time.Time              // the read deadline

	silent    bool  // the network to it is silent: nothing goes through
	cut       bool  // the socket is closed
	ended     error // why the backend ended (terminated, cut, closed), or nil
	endSeen   bool  // the client has read the server's last word
	destroyed bool

	running   *fakeRun    // the statement or batch in progress
	waiting   *fakeWaiter // its wait in a lock queue
	idleReads int         // waitIdle calls in progress
	idleCalls int         // waitIdle calls so far
	readAt    int         // idleCalls when a notification was last read
	lateStmts int         // statements attempted after the session ended
	conn      *fakeConn   // the acquisition using it; nil while idle in its pool
}

// fakeCaps are what the session's driver can do (see conn).
type fakeCaps struct {
	pipelines, interruptible, watchable bool
	cancelRequest                       bool // false: cancel returns errNoCancelRequest
	showPID                             bool // false: backendPID says it cannot tell
}

// pgxCaps are pgx's (pgxpool, or the stdlib driver); libpqCaps lib/pq's.
var (
	pgxCaps   = fakeCaps{pipelines: true, interruptible: true, watchable: true, cancelRequest: true, showPID: true}
	libpqCaps = fakeCaps{}
)

// fakeConn is one acquisition of a session: it implements conn. A session
// handed out again gets a new fakeConn, so that a use of an old one after
// it was given up is seen.
type fakeConn struct {
	s    *fakeSession
	gone string // "released" or "destroyed" once given up
}

// fakeRun is one statement, or one batch, in progress.
type fakeRun struct {
	cancelled bool // a cancel request reached it
}

// fakeLock is one advisory lock: its holders and its queue.
type fakeLock struct {
	held  map[*fakeSession]*[2]int // [0] exclusive, [1] shared: how many times taken
	queue []*fakeWaiter
}

// fakeWaiter is one pg_advisory_lock waiting in a lock's queue.
type fakeWaiter struct {
	s       *fakeSession
	key     Key
	shared  bool
	granted bool
	err     error // why it left the queue without the lock
}

// fakeEvent is one change of a lock, for assertions.
type fakeEvent struct {
	at     time.Time
	pid    int32
	op     string // grant, unlock, free (the session ended or unlock_all), queue, dequeue, busy
	key    Key
	shared bool
}

// fakeBatch is one pipelined batch, for assertions.
type fakeBatch struct {
	pid    int32
	kinds  []string
	keys   [][]Key
	n      int // rows sent
	failed int // index of the row that failed, or -1
}

func newFakeServer(t *testing.T) *fakeServer {
	srv := &fakeServer{
		t:        t,
		changed:  make(chan struct{}),
		nextPID:  1000,
		xid:      700,
		sessions: make(map[int32]*fakeSession),
		locks:    make(map[Key]*fakeLock),
		stmts:    make(map[string]int),
		defaults: map[string]string{},
	}
	// The settings the engine reads and sets, as a PostgreSQL 17 has them
	// (the engine's values differ, so that release can tell they were put
	// back). A test may delete one, as an older server lacks it.
	for _, name := range []string{"tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
		"tcp_user_timeout", "statement_timeout", "lock_timeout", "transaction_timeout", "idle_session_timeout",
		"idle_in_transaction_session_timeout", "client_connection_check_interval"} {
		srv.defaults[name] = "0"
	}
	srv.defaults["application_name"] = ""
	t.Cleanup(srv.shutdown)
	return srv
}

// bump wakes everyone waiting for a change. It runs with mu held.
func (srv *fakeServer) bump() {
	close(srv.changed)
	srv.changed = make(chan struct{})
}

// violatef records that the engine broke a rule. It runs with mu held.
func (srv *fakeServer) violatef(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	pcs := make([]uintptr, 24)
	n := runtime.Callers(3, pcs)
	frames := runtime.CallersFrames(pcs[:n])
	var at []string
	for {
		f, more := frames.Next()
		if name := f.Function; strings.Contains(name, "pglocks.") && !strings.Contains(name, "fake") {
			at = append(at, name[strings.LastIndex(name, "/")+1:]+":"+strconv.Itoa(f.Line))
		}
		if !more || len(at) >= 6 {
			break
		}
	}
	if len(at) > 0 {
		msg += " (at " + strings.Join(at, " < ") + ")"
	}
	srv.violations = append(srv.violations, msg)
}

// shutdown ends what a test left running (silent networks, hung statements,
// abandoned ones), waits for it to stop, and fails the test on violations.
func (srv *fakeServer) shutdown() {
	srv.unblock()
	deadline := time.Now().Add(5 * time.Second)
	for {
		srv.mu.Lock()
		busy := 0
		for _, s := range srv.sessions {
			if s.running != nil || s.idleReads > 0 {
				busy++
			}
		}
		v := slices.Clone(srv.violations)
		srv.mu.Unlock()
		if busy == 0 || time.Now().After(deadline) {
			if busy > 0 {
				srv.t.Errorf("fake: %d sessions still busy at the end of the test", busy)
			}
			for i, msg := range v {
				if i == 10 {
					srv.t.Errorf("fake: … and %d more violations", len(v)-i)
					break
				}
				srv.t.Errorf("fake: violation: %s", msg)
			}
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// unblock ends every silence of the network and cuts every statement in
// progress, so that whatever waits on them returns.
func (srv *fakeServer) unblock() {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	for _, s := range srv.sessions {
		s.silent = false
		if s.running != nil {
			srv.cutLocked(s, errors.New("fake: shut down at the end of the test"))
		}
	}
	srv.bump()
}

// fakeChannel is the channel Lockers notify each other on (see notify.go).
const fakeChannel = "pglocks"

// fakeSQLState is the SQLSTATE of err, as the engine reads it, or "".
func fakeSQLState(err error) string {
	var e interface{ SQLState() string }
	if errors.As(err, &e) {
		return e.SQLState()
	}
	return ""
}

// fakeCompareKeys orders keys: bigint keys by value, then pairs.
func fakeCompareKeys(a, b Key) int {
	av, aInt := a.Int64()
	bv, bInt := b.Int64()
	if aInt != bInt {
		if aInt {
			return -1
		}
		return 1
	}
	if !aInt {
		a1, a2, _ := a.Int32s()
		b1, b2, _ := b.Int32s()
		av, bv = int64(a1)<<32|int64(uint32(a2)), int64(b1)<<32|int64(uint32(b2))
	}
	return cmp.Compare(av, bv)
}

// fakePayload is a notification of Lockers (see notify.go): kind 'w' (keys
// wanted) or 'f' (keys freed), and the keys as Key.String writes them.
func fakePayload(kind byte, keys []Key) string {
	var b strings.Builder
	b.WriteByte(kind)
	for _, k := range keys {
		b.WriteByte(' ')
		b.WriteString(k.String())
	}
	return b.String()
}

// fakeParsePayload reads a notification of Lockers; ok is false for another.
func fakeParsePayload(p string) (kind byte, keys []Key, ok bool) {
	f := strings.Fields(p)
	if len(f) < 2 || len(f[0]) != 1 || f[0] != "w" && f[0] != "f" {
		return 0, nil, false
	}
	for _, s := range f[1:] {
		if a, b, pair := strings.Cut(s, ","); pair {
			x, err1 := strconv.ParseInt(a, 10, 32)
			y, err2 := strconv.ParseInt(b, 10, 32)
			if err1 != nil || err2 != nil {
				return 0, nil, false
			}
			keys = append(keys, Pair(int32(x), int32(y)))
			continue
		}
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, nil, false
		}
		keys = append(keys, ID(v))
	}
	return f[0][0], keys, true
}

// Errors the fake answers with, as pgx reports them.

func fakePgError(code, severity, msg string) error {
	return &pgconn.PgError{Severity: severity, SeverityUnlocalized: severity, Code: code, Message: msg}
}

func fakeCanceled() error {
	return fakePgError("57014", "ERROR", "canceling statement due to user request")
}

func fakeLockTimeout() error {
	return fakePgError("55P03", "ERROR", "canceling statement due to lock timeout")
}

func fakeLockTableFull() error {
	return fakePgError("53200", "ERROR", "out of shared memory")
}

func fakeDeadlock() error {
	return fakePgError("40P01", "ERROR", "deadlock detected")
}

func fakeTerminated() error {
	return fakePgError("57P01", "FATAL", "terminating connection due to administrator command")
}

// errFakeGone is what a connection given up answers.
var errFakeGone = errors.New("fake: connection used after it was given up")

// fakeTimeoutBase is an error for which pgconn.Timeout is true. That needs
// pgconn's own (unexported) timeout type, so it is had from pgconn: a
// Prepare with a ctx already done, on a connection that is never used.
var fakeTimeoutBase = sync.OnceValue(func() error {
	cfg, err := pgconn.ParseConfig("host=127.0.0.1 port=1 user=fake dbname=fake sslmode=disable")
	if err != nil {
		panic(err)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	pc, err := pgconn.Construct(&pgconn.HijackedConn{Conn: a, Config: cfg, ParameterStatuses: map[string]string{}, TxStatus: 'I'})
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = pc.Prepare(ctx, "", "", nil)
	if !pgconn.Timeout(err) {
		panic(fmt.Sprintf("fake: no pgconn timeout error to be had: %v", err))
	}
	return err
})

// fakeTimeout is a read that timed out (or found its ctx done), as pgx
// reports it: pgconn.Timeout(err) is true, and err wraps cause.
func fakeTimeout(cause error) error {
	return fmt.Errorf("fake: read: %w (%w)", cause, fakeTimeoutBase())
}

// ---- sessions ----

// newSessionLocked opens a session. It runs with mu held.
func (srv *fakeServer) newSessionLocked(src *fakeSource, caps fakeCaps) *fakeSession {
	srv.nextPID++
	s := &fakeSession{srv: srv, pid: srv.nextPID, src: src, caps: caps, started: time.Now(),
		settings: maps.Clone(srv.defaults), initial: maps.Clone(srv.defaults), listening: map[string]bool{}}
	srv.sessions[s.pid] = s
	return s
}

// session opens a session of the test's own: another process that holds
// and frees keys, and sends notifications, with the helpers below.
func (srv *fakeServer) session() *fakeConn {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	s := srv.newSessionLocked(nil, pgxCaps)
	c := &fakeConn{s: s}
	s.conn = c
	return c
}

// endLocked ends s's backend: its locks are freed, its wait leaves the
// queue. It runs with mu held.
func (srv *fakeServer) endLocked(s *fakeSession, cause error) {
	if s.ended != nil {
		return
	}
	s.ended = cause
	srv.unlockAllLocked(s)
	if w := s.waiting; w != nil {
		srv.dequeueLocked(w, cause)
	}
	clear(s.listening)
	srv.bump()
}

// cutLocked closes s's socket: the running statement and every later one
// fail with an error that is not the server's, and the backend ends. It
// runs with mu held.
func (srv *fakeServer) cutLocked(s *fakeSession, cause error) {
	if s.cut {
		return
	}
	s.cut = true
	s.notes = nil
	srv.endLocked(s, fmt.Errorf("fake: connection closed: %w", cause))
	srv.bump()
}

// terminate ends session pid as pg_terminate_backend does: its locks are
// freed at once, its running statement fails with 57P01, and the client
// reads that when it next reads the session.
func (srv *fakeServer) terminate(pid int32) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if s := srv.sessions[pid]; s != nil {
		srv.endLocked(s, fakeTerminated())
	}
}

// closedErr is what the client gets from a connection whose socket is
// closed. It runs with mu held.
func (s *fakeSession) closedErr() error {
	return fmt.Errorf("fake: conn closed: %w", s.ended)
}

// startErr is why a statement cannot start on s, or nil: the first one
// after the server ended the session reads its last word (57P01), later
// ones find the connection closed. It runs with mu held.
func (s *fakeSession) startErr() error {
	switch {
	case s.cut || s.destroyed:
		return s.closedErr()
	case s.ended != nil && !s.endSeen:
		s.endSeen, s.cut = true, true // pgx closes the connection after a FATAL
		return s.ended
	case s.ended != nil:
		return s.closedErr()
	}
	return nil
}

// ---- pools ----

// fakeSource is a pool of sessions: it implements source.
type fakeSource struct {
	srv  *fakeServer
	max  int      // 0: no limit
	caps fakeCaps // of the sessions it opens

	// guarded by srv.mu
	idle                                 []*fakeSession
	all                                  []*fakeSession // every session it opened
	open, inUse, peak                    int
	acquired, released, destroyed, waits int
	acquireErr                           error // acquire fails with it
	pressureChecks                       int   // calls of exhausted
}

// source returns a new pool of at most max sessions (0: no limit) with
// pgx's capabilities.
func (srv *fakeServer) source(max int) *fakeSource {
	return &fakeSource{srv: srv, max: max, caps: pgxCaps}
}

func (p *fakeSource) acquire(ctx context.Context) (conn, error) {
	srv := p.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	waited := false
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if p.acquireErr != nil {
			return nil, p.acquireErr
		}
		var s *fakeSession
		if n := len(p.idle); n > 0 {
			s = p.idle[n-1]
			p.idle = p.idle[:n-1]
		} else if p.max == 0 || p.open < p.max {
			s = srv.newSessionLocked(p, p.caps)
			p.open++
			p.all = append(p.all, s)
		}
		if s != nil {
			c := &fakeConn{s: s}
			s.conn = c
			p.inUse++
			p.peak = max(p.peak, p.inUse)
			p.acquired++
			srv.bump()
			return c, nil
		}
		if !waited {
			waited = true
			p.waits++
		}
		ch := srv.changed
		srv.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
		}
		srv.mu.Lock()
	}
}

func (p *fakeSource) maxConns() int { return p.max }

func (p *fakeSource) activity() uint64 {
	p.srv.mu.Lock()
	defer p.srv.mu.Unlock()
	return uint64(p.acquired)
}

func (p *fakeSource) exhausted() bool {
	p.srv.mu.Lock()
	defer p.srv.mu.Unlock()
	p.pressureChecks++
	return p.max > 0 && len(p.idle) == 0 && p.open >= p.max
}

// fakePoolStat is a snapshot of a fakeSource's counts.
type fakePoolStat struct {
	open, inUse, peak                    int
	acquired, released, destroyed, waits int
}

func (p *fakeSource) stat() fakePoolStat {
	p.srv.mu.Lock()
	defer p.srv.mu.Unlock()
	return fakePoolStat{open: p.open, inUse: p.inUse, peak: p.peak, acquired: p.acquired,
		released: p.released, destroyed: p.destroyed, waits: p.waits}
}

// setCaps changes the capabilities of the sessions p opens from now on.
func (p *fakeSource) setCaps(caps fakeCaps) {
	p.srv.mu.Lock()
	defer p.srv.mu.Unlock()
	p.caps = caps
}

// sessionsInUse returns the sessions of p handed out now.
func (p *fakeSource) sessionsInUse() (inUse []int32) {
	p.srv.mu.Lock()
	defer p.srv.mu.Unlock()
	for _, s := range p.all {
		if s.conn != nil {
			inUse = append(inUse, s.pid)
		}
	}
	return inUse
}

// ---- conn ----

// usable checks that c was not given up, recording a violation if it was.
// It runs with mu held.
func (c *fakeConn) usable(op string) bool {
	if c.gone != "" {
		c.s.srv.violatef("%s on session %d after it was %s", op, c.s.pid, c.gone)
		return false
	}
	return true
}

func (c *fakeConn) caps() fakeCaps {
	c.s.srv.mu.Lock()
	defer c.s.srv.mu.Unlock()
	return c.s.caps
}

func (c *fakeConn) pipelines() bool     { return c.caps().pipelines }
func (c *fakeConn) interruptible() bool { return c.caps().interruptible }
func (c *fakeConn) watchable() bool     { return c.caps().watchable }
func (c *fakeConn) tcp() *net.TCPConn   { return nil }

func (c *fakeConn) backendPID() (uint32, bool) {
	if !c.caps().showPID {
		return 0, false
	}
	return uint32(c.s.pid), true
}

func (c *fakeConn) query(ctx context.Context, q string, args []any, dest ...any) error {
	_, err := c.run(ctx, []row{{q: q, args: args, dest: dest}}, false, false)
	return err
}

func (c *fakeConn) exec(ctx context.Context, q string, args ...any) error {
	_, err := c.run(ctx, []row{{q: q, args: args}}, true, false)
	return err
}

func (c *fakeConn) batch(ctx context.Context, rows []row) (int, error, error) {
	if !c.pipelines() {
		c.s.srv.mu.Lock()
		c.s.srv.violatef("batch on session %d, whose driver does not pipeline", c.s.pid)
		c.s.srv.mu.Unlock()
	}
	failed, err := c.run(ctx, rows, false, true)
	return failed, err, err // pgx's Close reports the error that ended the batch
}

func (c *fakeConn) cancel(ctx context.Context) error {
	srv := c.s.srv
	srv.mu.Lock()
	if !c.usable("cancel") {
		srv.mu.Unlock()
		return errFakeGone
	}
	if !c.s.caps.cancelRequest {
		srv.mu.Unlock()
		return errNoCancelRequest
	}
	srv.mu.Unlock()
	srv.cancelBackend(c.s)
	return nil
}

// cancelBackend delivers a cancel request to s, as the server does: to the
// statement it runs, if any (an idle session ignores it), unless the network
// to s is silent. The cancel hooks run first.
func (srv *fakeServer) cancelBackend(s *fakeSession) bool {
	srv.mu.Lock()
	hooks := slices.Clone(srv.cancelHooks)
	srv.mu.Unlock()
	for _, h := range hooks {
		h.f(s.pid)
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.cancels++
	if s.silent || s.ended != nil || s.running == nil {
		return s.ended == nil
	}
	s.running.cancelled = true
	srv.bump()
	return true
}

func (c *fakeConn) closeSocket() {
	srv := c.s.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !c.usable("closeSocket") {
		return
	}
	if !c.s.caps.interruptible {
		return // like lib/pq's, this driver shows no socket to close
	}
	srv.cutLocked(c.s, errors.New("the client closed the socket"))
}

func (c *fakeConn) setReadDeadline(t time.Time) error {
	srv := c.s.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !c.usable("setReadDeadline") {
		return errFakeGone
	}
	c.s.deadline = t
	srv.bump()
	return nil
}

func (c *fakeConn) waitIdle(ctx context.Context) (*pgconn.Notification, error) {
	srv, s := c.s.srv, c.s
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !c.usable("waitIdle") {
		return nil, errFakeGone
	}
	switch {
	case !s.caps.watchable:
		srv.violatef("waitIdle on session %d, whose socket cannot be read while idle", s.pid)
	case s.running != nil:
		srv.violatef("waitIdle on session %d while a statement runs on it", s.pid)
	case s.idleReads > 0:
		srv.violatef("two waitIdle at once on session %d", s.pid)
	}
	s.idleReads++
	s.idleCalls++
	defer func() {
		s.idleReads--
		srv.bump()
	}()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		if len(s.notes) > 0 && !s.silent {
			n := s.notes[0]
			s.notes = s.notes[1:]
			s.readAt = s.idleCalls
			return n, nil
		}
		switch {
		case s.cut || s.destroyed:
			return nil, s.closedErr()
		case s.ended != nil && !s.silent:
			err := s.startErr()
			return nil, err
		case ctx.Err() != nil:
			return nil, fakeTimeout(ctx.Err())
		case !s.deadline.IsZero() && !time.Now().Before(s.deadline):
			return nil, fakeTimeout(os.ErrDeadlineExceeded)
		}
		var tc <-chan time.Time
		if !s.deadline.IsZero() {
			if timer == nil {
				timer = time.NewTimer(time.Until(s.deadline))
			} else {
				timer.Reset(time.Until(s.deadline))
			}
			tc = timer.C
		}
		ch := srv.changed
		srv.mu.Unlock()
		select {
		case <-ch:
		case <-tc:
		case <-ctx.Done():
		}
		srv.mu.Lock()
	}
}

// simple is a no-op: the fake has one protocol.
func (c *fakeConn) simple() {}

// forget: the fake prepares nothing.
func (c *fakeConn) forget(context.Context) error { return nil }

func (c *fakeConn) destroy() {
	srv, s := c.s.srv, c.s
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !c.usable("destroy") {
		return
	}
	if s.running != nil {
		srv.violatef("session %d destroyed while a statement runs on it", s.pid)
	}
	c.gone, s.conn = "destroyed", nil
	s.destroyed = true
	srv.cutLocked(s, errors.New("destroyed by the client"))
	if p := s.src; p != nil {
		p.inUse--
		p.open--
		p.destroyed++
	}
	srv.bump()
}

func (c *fakeConn) release() {
	srv, s := c.s.srv, c.s
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !c.usable("release") {
		return
	}
	if s.ended == nil {
		if held := srv.heldLocked(s); len(held) > 0 {
			srv.violatef("session %d given back to the pool holding advisory locks %v", s.pid, held)
		}
		if s.waiting != nil {
			srv.violatef("session %d given back to the pool while it waits for %v", s.pid, s.waiting.key)
		}
		if len(s.listening) > 0 {
			srv.violatef("session %d given back to the pool listening on %v", s.pid, slices.Sorted(maps.Keys(s.listening)))
		}
		if !maps.Equal(s.settings, s.initial) {
			srv.violatef("session %d given back to the pool with its settings changed: %v, was %v", s.pid, s.settings, s.initial)
		}
	}
	if s.running != nil {
		srv.violatef("session %d given back to the pool while a statement runs on it", s.pid)
	}
	if s.idleReads > 0 {
		srv.violatef("session %d given back to the pool while a watcher reads it", s.pid)
	}
	if !s.deadline.IsZero() {
		srv.violatef("session %d given back to the pool with a read deadline set", s.pid)
	}
	c.gone, s.conn = "released", nil
	if p := s.src; p != nil {
		p.inUse--
		p.released++
		if s.ended != nil {
			p.open-- // the pool drops a closed connection
		} else {
			p.idle = append(p.idle, s)
		}
	}
	srv.bump()
}

// ---- running statements ----

// fakeStmt is what a hook sees of a statement as it starts.
type fakeStmt struct {
	kind   string // see fakeKind
	pid    int32
	conn   *fakeConn
	keys   []Key // the keys it locks or unlocks
	shared bool
	row    int // its index in a pipelined batch, or -1
	q      string
}

// fakeFault is what a hook does to a statement. The zero value: nothing.
type fakeFault struct {
	err    error           // it fails with err, taking no effect
	hang   bool            // it never answers, until cancelled (57014) or cut
	silent bool            // the network to the session goes silent: no answer, no cancel, until heal or cut
	die    bool            // the server terminates the session (57P01)
	cut    bool            // the socket is cut
	gate   <-chan struct{} // it takes effect, then answers only once gate is closed (a cancel meanwhile: 57014)
}

type fakeHook struct {
	f func(st *fakeStmt) fakeFault
}

type fakeCancelHook struct{ f func(pid int32) }

// onStmt calls f, without the server's mutex, as each statement of the
// engine's sessions starts (not the test's own helpers), and does what it
// returns to it. It returns a function that removes f.
func (srv *fakeServer) onStmt(f func(st *fakeStmt) fakeFault) (remove func()) {
	h := &fakeHook{f: f}
	srv.mu.Lock()
	srv.hooks = append(srv.hooks, h)
	srv.mu.Unlock()
	return func() {
		srv.mu.Lock()
		srv.hooks = slices.DeleteFunc(srv.hooks, func(x *fakeHook) bool { return x == h })
		srv.mu.Unlock()
	}
}

// faultOnce does fault to the next statement that match accepts.
func (srv *fakeServer) faultOnce(match func(st *fakeStmt) bool, fault fakeFault) {
	var once sync.Mutex
	done := false
	srv.onStmt(func(st *fakeStmt) fakeFault {
		once.Lock()
		defer once.Unlock()
		if done || !match(st) {
			return fakeFault{}
		}
		done = true
		return fault
	})
}

// onCancel calls f, without the server's mutex, as a cancel request for
// session pid arrives, before it takes effect.
func (srv *fakeServer) onCancel(f func(pid int32)) (remove func()) {
	h := &fakeCancelHook{f: f}
	srv.mu.Lock()
	srv.cancelHooks = append(srv.cancelHooks, h)
	srv.mu.Unlock()
	return func() {
		srv.mu.Lock()
		srv.cancelHooks = slices.DeleteFunc(srv.cancelHooks, func(x *fakeCancelHook) bool { return x == h })
		srv.mu.Unlock()
	}
}

// run runs rows as one transaction (a statement, or a pipelined batch),
// stopping at the first that fails. It returns that one's index and error.
func (c *fakeConn) run(ctx context.Context, rows []row, exec, batch bool) (int, error) {
	srv, s := c.s.srv, c.s
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !c.usable("statement") {
		return 0, errFakeGone
	}
	if s.running != nil {
		srv.violatef("two statements at once on session %d", s.pid)
		return 0, errors.New("fake: conn busy")
	}
	if s.idleReads > 0 {
		srv.violatef("a statement on session %d while a watcher reads it", s.pid)
	}
	if s.ended != nil {
		s.lateStmts++
	}
	if err := ctx.Err(); err != nil {
		// Nothing is sent.
		if s.caps.interruptible {
			return 0, fakeTimeout(err)
		}
		return 0, err
	}
	r := &fakeRun{}
	s.running = r
	defer func() {
		if s.running == r {
			s.running = nil
		}
		srv.bump()
	}()
	// A ctx that ends during the statement: pgx closes the socket; lib/pq
	// sends a cancel request (lost on a silent network) and waits.
	stop := context.AfterFunc(ctx, func() {
		srv.mu.Lock()
		defer srv.mu.Unlock()
		if s.running != r {
			return
		}
		if s.caps.interruptible {
			srv.cutLocked(s, ctx.Err())
		} else if !s.silent {
			r.cancelled = true
			srv.bump()
		}
	})
	defer stop()
	tx := &fakeTx{}
	bi := -1 // this batch's index in srv.batches
	if batch {
		srv.batches = append(srv.batches, fakeBatch{pid: s.pid, n: len(rows), failed: -1})
		bi = len(srv.batches) - 1
	}
	for i, rw := range rows {
		idx := -1
		if batch {
			idx = i
		}
		if err := c.step(r, tx, rw, exec, idx, bi); err != nil {
			tx.end(srv, false)
			if batch {
				srv.batches[bi].failed = i
			}
			return i, err
		}
	}
	tx.end(srv, true)
	return -1, nil
}

// step runs one statement of run. It runs with mu held.
func (c *fakeConn) step(r *fakeRun, tx *fakeTx, rw row, exec bool, idx, bi int) error {
	srv, s := c.s.srv, c.s
	p, err := fakeParse(rw.q)
	if err != nil {
		srv.violatef("a statement the fake does not know: %v: %q", err, rw.q)
		return fakePgError("42601", "ERROR", "fake: "+err.Error())
	}
	st := &fakeStmt{kind: p.kind, pid: s.pid, conn: c, row: idx, q: rw.q, shared: p.shared}
	st.keys = p.keysOf(rw.args)
	srv.stmts[p.kind]++ // attempted, whether or not it gets through
	if bi >= 0 {
		b := &srv.batches[bi]
		b.kinds = append(b.kinds, p.kind)
		b.keys = append(b.keys, st.keys)
	}
	// Over a silent network nothing reaches the server.
	if err := c.block(r, func() bool { return !s.silent }, nil, false); err != nil {
		return err
	}
	if err := s.startErr(); err != nil {
		return err
	}
	if !s.deadline.IsZero() && !time.Now().Before(s.deadline) {
		srv.violatef("a statement on session %d with its read deadline past", s.pid)
		srv.cutLocked(s, os.ErrDeadlineExceeded) // pgx: the read fails, and closes the connection
		return fakeTimeout(os.ErrDeadlineExceeded)
	}
	var f fakeFault
	if len(srv.hooks) > 0 {
		hooks := slices.Clone(srv.hooks)
		srv.mu.Unlock()
		for _, h := range hooks {
			if g := h.f(st); g != (fakeFault{}) {
				f = g
				break
			}
		}
		srv.mu.Lock()
	}
	if f.silent {
		s.silent = true
		srv.bump()
		if err := c.block(r, func() bool { return !s.silent }, nil, false); err != nil {
			return err
		}
	}
	if f.cut {
		srv.cutLocked(s, errors.New("the network broke"))
	}
	if f.die {
		srv.endLocked(s, fakeTerminated())
	}
	if err := s.startErr(); err != nil {
		return err
	}
	if f.hang {
		if err := c.block(r, func() bool { return false }, nil, true); err != nil {
			return err
		}
	}
	if f.err != nil {
		return f.err
	}
	if r.cancelled {
		return fakeCanceled()
	}
	e := &fakeEval{c: c, run: r, tx: tx, args: rw.args}
	vals, err := e.statement(p)
	if err != nil {
		return err
	}
	if err := s.interrupted(); err != nil {
		return err
	}
	if f.gate != nil {
		gate := f.gate
		ready := func() bool {
			select {
			case <-gate:
				return true
			default:
				return false
			}
		}
		if err := c.block(r, ready, gate, true); err != nil {
			return err
		}
	}
	if r.cancelled {
		return fakeCanceled() // it came as the statement ended: what it did stays done
	}
	if exec {
		return nil
	}
	if len(vals) != len(rw.dest) {
		srv.violatef("%d destinations for the %d columns of %q", len(rw.dest), len(vals), rw.q)
		return fmt.Errorf("fake: number of field descriptions must equal number of destinations, got %d and %d", len(vals), len(rw.dest))
	}
	for i, v := range vals {
		if err := fakeAssign(rw.dest[i], v); err != nil {
			srv.violatef("column %d of %q: %v", i, rw.q, err)
			return err
		}
	}
	return nil
}

// interrupted is why a statement in progress on s must stop, or nil. It
// runs with mu held.
func (s *fakeSession) interrupted() error {
	switch {
	case s.cut || s.destroyed:
		return s.closedErr()
	case s.ended != nil:
		return s.startErr()
	}
	return nil
}

// block waits, releasing mu meanwhile, until ready, or until the statement
// run is interrupted: its session ends or its socket is cut, or (if
// cancellable) a cancel request reaches it. gate, if not nil, also wakes it.
// It runs with mu held.
func (c *fakeConn) block(r *fakeRun, ready func() bool, gate <-chan struct{}, cancellable bool) error {
	srv, s := c.s.srv, c.s
	for {
		if ready() {
			return nil
		}
		if err := s.interrupted(); err != nil {
			return err
		}
		if cancellable && r.cancelled {
			return fakeCanceled()
		}
		ch := srv.changed
		srv.mu.Unlock()
		select {
		case <-ch:
		case <-gate:
		}
		srv.mu.Lock()
	}
}

// fakeTx is the transaction of one statement or batch.
type fakeTx struct {
	xid   int64
	notes []*pgconn.Notification
	undo  []fakeUndo
}

type fakeUndo struct {
	local bool // set_config(…, true): undone at commit too
	f     func()
}

// end commits or rolls back tx. It runs with mu held.
func (tx *fakeTx) end(srv *fakeServer, commit bool) {
	for i := len(tx.undo) - 1; i >= 0; i-- {
		if u := tx.undo[i]; !commit || u.local {
			u.f()
		}
	}
	if !commit {
		return
	}
	for _, n := range tx.notes {
		for _, s := range srv.sessions {
			if s.listening[n.Channel] && s.ended == nil {
				s.notes = append(s.notes, n)
			}
		}
	}
	if len(tx.notes) > 0 {
		srv.bump()
	}
}

// ---- locks ----

func (srv *fakeServer) lockOf(key Key) *fakeLock {
	lk := srv.locks[key]
	if lk == nil {
		lk = &fakeLock{held: make(map[*fakeSession]*[2]int)}
		srv.locks[key] = lk
	}
	return lk
}

func (srv *fakeServer) gc(key Key) {
	if lk := srv.locks[key]; lk != nil && len(lk.held) == 0 && len(lk.queue) == 0 {
		delete(srv.locks, key)
	}
}

func (srv *fakeServer) event(s *fakeSession, op string, key Key, shared bool) {
	srv.events = append(srv.events, fakeEvent{at: time.Now(), pid: s.pid, op: op, key: key, shared: shared})
}

func fakeMode(shared bool) int {
	if shared {
		return 1
	}
	return 0
}

// conflicts reports whether a request in mode shared conflicts with a hold
// (or request) in the other modes.
func fakeConflicts(shared bool, other [2]int) bool {
	if shared {
		return other[0] > 0
	}
	return other[0] > 0 || other[1] > 0
}

// grantable reports whether s may have key in mode shared now: it holds it
// in that mode already, or no other session holds it in a conflicting mode
// and no conflicting request waits (a request never jumps the queue).
func (lk *fakeLock) grantable(s *fakeSession, shared bool, ahead []*fakeWaiter) bool {
	if h := lk.held[s]; h != nil && h[fakeMode(shared)] > 0 {
		return true
	}
	for o, h := range lk.held {
		if o != s && fakeConflicts(shared, *h) {
			return false
		}
	}
	for _, w := range ahead {
		var m [2]int
		m[fakeMode(w.shared)] = 1
		if w.s != s && fakeConflicts(shared, m) {
			return false
		}
	}
	return true
}

func (srv *fakeServer) entriesLocked() int {
	n := 0
	for _, lk := range srv.locks {
		for _, h := range lk.held {
			n += min(h[0], 1) + min(h[1], 1)
		}
	}
	return n
}

func (srv *fakeServer) grantLocked(s *fakeSession, key Key, shared bool) {
	lk := srv.lockOf(key)
	h := lk.held[s]
	if h == nil {
		h = new([2]int)
		lk.held[s] = h
	}
	h[fakeMode(shared)]++
	srv.event(s, "grant", key, shared)
}

// tryLocked is pg_try_advisory_lock[_shared]. It runs with mu held.
func (srv *fakeServer) tryLocked(s *fakeSession, key Key, shared bool) (bool, error) {
	lk := srv.lockOf(key)
	if !lk.grantable(s, shared, lk.queue) {
		srv.event(s, "busy", key, shared)
		return false, nil
	}
	if h := lk.held[s]; (h == nil || h[fakeMode(shared)] == 0) && srv.maxEntries > 0 && srv.entriesLocked() >= srv.maxEntries {
		srv.gc(key)
		return false, fakeLockTableFull()
	}
	srv.grantLocked(s, key, shared)
	return true, nil
}

// unlockLocked is pg_advisory_unlock[_shared]. It runs with mu held.
func (srv *fakeServer) unlockLocked(s *fakeSession, key Key, shared bool) bool {
	lk := srv.locks[key]
	if lk == nil || lk.held[s] == nil || lk.held[s][fakeMode(shared)] == 0 {
		srv.event(s, "unlock-not-held", key, shared)
		return false
	}
	h := lk.held[s]
	h[fakeMode(shared)]--
	if h[0] == 0 && h[1] == 0 {
		delete(lk.held, s)
	}
	srv.event(s, "unlock", key, shared)
	srv.wakeLocked(key)
	return true
}

// unlockAllLocked is pg_advisory_unlock_all. It runs with mu held.
func (srv *fakeServer) unlockAllLocked(s *fakeSession) {
	for key, lk := range srv.locks {
		if h := lk.held[s]; h != nil {
			delete(lk.held, s)
			srv.event(s, "free", key, h[1] > 0 && h[0] == 0)
			srv.wakeLocked(key)
		}
	}
}

// wakeLocked grants what the queue of key may have now, in order: a waiter
// goes if no other session's hold, nor any waiter still ahead of it,
// conflicts. It runs with mu held.
func (srv *fakeServer) wakeLocked(key Key) {
	lk := srv.locks[key]
	if lk == nil {
		return
	}
	var ahead []*fakeWaiter
	for _, w := range slices.Clone(lk.queue) {
		if !lk.grantable(w.s, w.shared, ahead) {
			ahead = append(ahead, w)
			continue
		}
		lk.queue = slices.DeleteFunc(lk.queue, func(x *fakeWaiter) bool { return x == w })
		w.granted = true
		w.s.waiting = nil
		srv.grantLocked(w.s, key, w.shared)
	}
	srv.gc(key)
	srv.bump()
}

// dequeueLocked takes w out of its queue with err. It runs with mu held.
func (srv *fakeServer) dequeueLocked(w *fakeWaiter, err error) {
	lk := srv.locks[w.key]
	if lk == nil || !slices.Contains(lk.queue, w) {
		return
	}
	lk.queue = slices.DeleteFunc(lk.queue, func(x *fakeWaiter) bool { return x == w })
	w.err = err
	w.s.waiting = nil
	srv.event(w.s, "dequeue", w.key, w.shared)
	srv.wakeLocked(w.key) // those behind it may go now
}

// blockers are the sessions that a request of s for key in mode shared
// waits for: conflicting holders, and conflicting waiters ahead of it.
func (srv *fakeServer) blockers(s *fakeSession, key Key, shared bool, before *fakeWaiter) []*fakeSession {
	lk := srv.locks[key]
	if lk == nil {
		return nil
	}
	var out []*fakeSession
	for o, h := range lk.held {
		if o != s && fakeConflicts(shared, *h) {
			out = append(out, o)
		}
	}
	for _, w := range lk.queue {
		if w == before {
			break
		}
		var m [2]int
		m[fakeMode(w.shared)] = 1
		if w.s != s && fakeConflicts(shared, m) {
			out = append(out, w.s)
		}
	}
	return out
}

// deadlocks reports whether s waiting for key would close a cycle of waits.
// (The server finds it after deadlock_timeout; the fake at once.)
func (srv *fakeServer) deadlocks(s *fakeSession, key Key, shared bool) bool {
	seen := map[*fakeSession]bool{}
	stack := srv.blockers(s, key, shared, nil)
	for len(stack) > 0 {
		b := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if b == s {
			return true
		}
		if seen[b] {
			continue
		}
		seen[b] = true
		if w := b.waiting; w != nil {
			stack = append(stack, srv.blockers(b, w.key, w.shared, w)...)
		}
	}
	return false
}

// waitLocked is pg_advisory_lock[_shared]: it waits in key's queue until
// granted, cancelled, timed out (lock_timeout) or interrupted. It runs with
// mu held.
func (c *fakeConn) waitLocked(r *fakeRun, key Key, shared bool) error {
	srv, s := c.s.srv, c.s
	lk := srv.lockOf(key)
	if lk.grantable(s, shared, lk.queue) {
		srv.grantLocked(s, key, shared)
		return nil
	}
	if srv.deadlocks(s, key, shared) {
		srv.gc(key)
		return fakeDeadlock()
	}
	w := &fakeWaiter{s: s, key: key, shared: shared}
	lk.queue = append(lk.queue, w)
	s.waiting = w
	srv.event(s, "queue", key, shared)
	srv.bump()
	if ms := fakeMillis(s.settings["lock_timeout"]); ms > 0 {
		t := time.AfterFunc(time.Duration(ms)*time.Millisecond, func() {
			srv.mu.Lock()
			defer srv.mu.Unlock()
			if !w.granted && w.err == nil {
				srv.timeouts++
				srv.dequeueLocked(w, fakeLockTimeout())
			}
		})
		defer t.Stop()
	}
	err := c.block(r, func() bool { return w.granted || w.err != nil }, nil, true)
	if w.granted {
		return nil
	}
	if w.err != nil {
		return w.err
	}
	srv.dequeueLocked(w, err)
	return err
}

// fakeMillis reads a duration setting as PostgreSQL does (a number is
// milliseconds), or -1.
func fakeMillis(v string) int64 {
	units := []struct {
		suffix string
		ms     int64
	}{{"ms", 1}, {"min", 60000}, {"s", 1000}, {"h", 3600000}, {"", 1}}
	for _, u := range units {
		if n, ok := strings.CutSuffix(v, u.suffix); ok {
			if x, err := strconv.ParseInt(strings.TrimSpace(n), 10, 64); err == nil {
				return x * u.ms
			}
		}
	}
	return -1
}

// ---- what tests look at, and do as another process ----

// fakeHeld is one lock a session holds.
type fakeHeld struct {
	key    Key
	shared bool
	n      int
}

func (h fakeHeld) String() string {
	m := ""
	if h.shared {
		m = " shared"
	}
	return fmt.Sprintf("%v%s×%d", h.key, m, h.n)
}

func (srv *fakeServer) heldLocked(s *fakeSession) []fakeHeld {
	var out []fakeHeld
	for key, lk := range srv.locks {
		if h := lk.held[s]; h != nil {
			for m, n := range h {
				if n > 0 {
					out = append(out, fakeHeld{key: key, shared: m == 1, n: n})
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b fakeHeld) int { return fakeCompareKeys(a.key, b.key) })
	return out
}

// heldBy returns what session pid holds.
func (srv *fakeServer) heldBy(pid int32) []fakeHeld {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if s := srv.sessions[pid]; s != nil {
		return srv.heldLocked(s)
	}
	return nil
}

// holdersOf returns the sessions that hold key, in any mode.
func (srv *fakeServer) holdersOf(key Key) []int32 {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var out []int32
	if lk := srv.locks[key]; lk != nil {
		for s := range lk.held {
			out = append(out, s.pid)
		}
	}
	slices.Sort(out)
	return out
}

// queuedOn returns the sessions waiting for key, in queue order.
func (srv *fakeServer) queuedOn(key Key) []int32 {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var out []int32
	if lk := srv.locks[key]; lk != nil {
		for _, w := range lk.queue {
			out = append(out, w.s.pid)
		}
	}
	return out
}

// eventsOf returns the events of key so far.
func (srv *fakeServer) eventsOf(key Key) []fakeEvent {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var out []fakeEvent
	for _, e := range srv.events {
		if e.key == key {
			out = append(out, e)
		}
	}
	return out
}

// count returns how many statements of kind were attempted.
func (srv *fakeServer) count(kind string) int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.stmts[kind]
}

// batchList returns the pipelined batches so far.
func (srv *fakeServer) batchList() []fakeBatch {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return slices.Clone(srv.batches)
}

// setLockTable sets the lock table's size in entries (0: no limit).
func (srv *fakeServer) setLockTable(n int) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.maxEntries = n
}

// entries returns how many lock table entries are in use.
func (srv *fakeServer) entries() int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.entriesLocked()
}

func (c *fakeConn) pid() int32 { return c.s.pid }

// try takes key on c's session as pg_try_advisory_lock does.
func (c *fakeConn) try(key Key, shared bool) bool {
	srv := c.s.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	ok, _ := srv.tryLocked(c.s, key, shared)
	srv.bump()
	return ok
}

// mustTry takes keys on c's session, exclusively, or fails t.
func (c *fakeConn) mustTry(t testing.TB, keys ...Key) {
	t.Helper()
	for _, k := range keys {
		if !c.try(k, false) {
			t.Fatalf("fake session %d: could not take %v", c.s.pid, k)
		}
	}
}

// unlock lets go of keys on c's session as pg_advisory_unlock does.
func (c *fakeConn) unlock(shared bool, keys ...Key) {
	srv := c.s.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	for _, k := range keys {
		srv.unlockLocked(c.s, k, shared)
	}
}

// notify sends a notification from c's session, in a transaction of its own.
func (c *fakeConn) notify(channel, payload string) {
	srv := c.s.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	tx := &fakeTx{notes: []*pgconn.Notification{{PID: uint32(c.s.pid), Channel: channel, Payload: payload}}}
	tx.end(srv, true)
}

// listen makes c's session listen on channel.
func (c *fakeConn) listen(channel string) {
	srv := c.s.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	c.s.listening[channel] = true
}

// takeNotes returns the notifications c's session received, and forgets them.
func (c *fakeConn) takeNotes() []*pgconn.Notification {
	srv := c.s.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	n := c.s.notes
	c.s.notes = nil
	return n
}

// cutNetwork breaks c's connection: its socket closes, whatever its driver.
func (c *fakeConn) cutNetwork() {
	srv := c.s.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.cutLocked(c.s, errors.New("the network broke"))
}

// heal ends a silence of the network to c's session.
func (c *fakeConn) heal() {
	srv := c.s.srv
	srv.mu.Lock()
	defer srv.mu.Unlock()
	c.s.silent = false
	srv.bump()
}

// connOf returns the connection using session pid now, or nil.
func (srv *fakeServer) connOf(pid int32) *fakeConn {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if s := srv.sessions[pid]; s != nil {
		return s.conn
	}
	return nil
}

// lateStatements returns how many statements were attempted on session pid
// after it ended.
func (srv *fakeServer) lateStatements(pid int32) int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if s := srv.sessions[pid]; s != nil {
		return s.lateStmts
	}
	return 0
}

// handled reports whether session pid has read every notification it
// received and handed it on: its reader (a watcher, or a drain) has called
// waitIdle again since the last one.
func (srv *fakeServer) handled(pid int32) bool {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	s := srv.sessions[pid]
	return s != nil && len(s.notes) == 0 && s.idleCalls > s.readAt
}

// watched returns the sessions a waitIdle reads now.
func (srv *fakeServer) watched() []int32 {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var out []int32
	for _, s := range srv.sessions {
		if s.idleReads > 0 {
			out = append(out, s.pid)
		}
	}
	slices.Sort(out)
	return out
}

// runningOn returns the sessions that run a statement now.
func (srv *fakeServer) runningOn() []int32 {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var out []int32
	for _, s := range srv.sessions {
		if s.running != nil {
			out = append(out, s.pid)
		}
	}
	slices.Sort(out)
	return out
}

// ---- statements: parsing ----

// fakeKind names a statement by its shape (the function names it calls),
// for hooks and counts: init, restore, listen, unlisten, try, wait, unlock,
// unlockAll, keysTry, keysUnlock, slotTry, notify, token, pid, cancel,
// markLeader, holders, xact; or other.
func fakeKind(q string) string {
	has := func(s string) bool { return strings.Contains(q, s) }
	t := strings.ToUpper(strings.TrimSpace(q))
	switch {
	case strings.HasPrefix(t, "LISTEN "):
		return "listen"
	case strings.HasPrefix(t, "UNLISTEN "):
		return "unlisten"
	case has("pg_locks"):
		return "holders"
	case has("string_to_array("):
		if has("advisory_unlock") {
			return "keysUnlock"
		}
		return "keysTry"
	case has("pg_is_in_recovery()") && has("current_setting("):
		return "init"
	case has("advisory_xact_lock"):
		return "xact"
	case has("CASE WHEN pg_try_advisory_lock"):
		return "slotTry"
	case has("pg_advisory_unlock_all()"):
		return "unlockAll"
	case has("pg_try_advisory_lock"):
		return "try"
	case has("pg_advisory_lock"):
		return "wait"
	case has("pg_advisory_unlock"):
		return "unlock"
	case has("pg_notify("):
		return "notify"
	case has("pg_cancel_backend("):
		return "cancel"
	case has("set_config('application_name'") && has("clock_timestamp()"):
		return "markLeader"
	case has("concat(") && has("set_config("):
		return "restore"
	case has("pg_current_xact_id()"):
		return "token"
	case has("pg_backend_pid()"):
		return "pid"
	}
	return "other"
}

// fakeParsed is a statement, parsed.
type fakeParsed struct {
	kind    string
	shared  bool   // an advisory function in shared mode
	listen  string // LISTEN's channel
	unlist  string // UNLISTEN's channel
	sel     *fakeSelect
	keysFn  string // the multi-key statement: its function, and the parameters of its lists
	keysArg [3]int
	holders bool
	calls   []*fakeCall // the advisory calls, for keysOf
}

// fakeParse parses q, caching the result.
func fakeParse(q string) (*fakeParsed, error) {
	if p, ok := fakeParsedCache.Load(q); ok {
		return p.(*fakeParsed), nil
	}
	p, err := fakeParse1(q)
	if err != nil {
		return nil, err
	}
	fakeParsedCache.Store(q, p)
	return p, nil
}

var fakeParsedCache sync.Map

var (
	reKeysFn  = regexp.MustCompile(`pg_(try_advisory_lock|advisory_unlock)(_shared)?\(k\)`)
	reKeysArg = regexp.MustCompile(`string_to_array\(\$(\d+)`)
	reHolders = regexp.MustCompile(`objsubid = \$(\d+)::int4 AND l\.classid::bigint = \$(\d+)::bigint AND l\.objid::bigint = \$(\d+)::bigint`)
)

func fakeParse1(q string) (*fakeParsed, error) {
	p := &fakeParsed{kind: fakeKind(q)}
	switch p.kind {
	case "holders":
		m := reHolders.FindStringSubmatch(q)
		if m == nil {
			return nil, errors.New("pg_locks without the key's columns")
		}
		p.holders = true
		for i := range 3 {
			p.keysArg[i], _ = strconv.Atoi(m[i+1])
		}
		return p, nil
	case "keysTry", "keysUnlock":
		fn := reKeysFn.FindAllStringSubmatch(q, -1)
		args := reKeysArg.FindAllStringSubmatch(q, -1)
		if len(fn) != 1 || len(args) != 3 || !strings.Contains(q, "("+"a, b)") {
			return nil, errors.New("a multi-key statement of an unknown shape")
		}
		p.keysFn = "pg_" + fn[0][1] + fn[0][2]
		p.shared = fn[0][2] != ""
		for i := range 3 {
			p.keysArg[i], _ = strconv.Atoi(args[i][1])
		}
		return p, nil
	}
	toks, err := fakeLex(q)
	if err != nil {
		return nil, err
	}
	ps := &fakeParser{toks: toks}
	switch {
	case ps.word("listen"):
		ps.next()
		p.listen = ps.next().v
	case ps.word("unlisten"):
		ps.next()
		p.unlist = ps.next().v
	default:
		sel, err := ps.selectStmt()
		if err != nil {
			return nil, err
		}
		p.sel = sel
	}
	ps.op(";")
	if !ps.done() {
		return nil, fmt.Errorf("unexpected %q", ps.peek().v)
	}
	if p.sel != nil {
		p.sel.walk(func(x fakeExpr) {
			if c, ok := x.(*fakeCall); ok && strings.Contains(c.name, "advisory") && !strings.HasSuffix(c.name, "_all") {
				p.calls = append(p.calls, c)
				p.shared = p.shared || strings.HasSuffix(c.name, "_shared")
			}
		})
	}
	return p, nil
}

// keysOf returns the keys p locks or unlocks with args, without effect.
func (p *fakeParsed) keysOf(args []any) []Key {
	var out []Key
	if p.keysFn != "" {
		ids, as, bs := fakeFields(args, p.keysArg[0]), fakeFields(args, p.keysArg[1]), fakeFields(args, p.keysArg[2])
		for _, id := range ids {
			if v, err := strconv.ParseInt(id, 10, 64); err == nil {
				out = append(out, ID(v))
			}
		}
		for i := range min(len(as), len(bs)) {
			a, err1 := strconv.ParseInt(as[i], 10, 32)
			b, err2 := strconv.ParseInt(bs[i], 10, 32)
			if err1 == nil && err2 == nil {
				out = append(out, Pair(int32(a), int32(b)))
			}
		}
		return out
	}
	e := &fakeEval{args: args}
	for _, c := range p.calls {
		var vals []any
		for _, a := range c.args {
			if !fakeConst(a) {
				vals = nil
				break
			}
			v, err := e.eval(a)
			if err != nil {
				break
			}
			vals = append(vals, v)
		}
		if k, err := fakeKeyOf(vals); err == nil {
			out = append(out, k)
		}
	}
	return out
}

// fakeConst reports whether x is a literal or a parameter, maybe cast.
func fakeConst(x fakeExpr) bool {
	switch x := x.(type) {
	case *fakeLit, *fakeParam:
		return true
	case *fakeCast:
		return fakeConst(x.x)
	}
	return false
}

func fakeFields(args []any, n int) []string {
	if n < 1 || n > len(args) {
		return nil
	}
	v, _ := fakeArg(args[n-1])
	s, _ := fakeText(v).(string)
	return strings.Fields(s)
}

type fakeTok struct {
	k byte // w: word (lower case), q: quoted identifier, n: number, s: string, p: parameter, o: operator
	v string
}

func fakeLex(q string) ([]fakeTok, error) {
	var ts []fakeTok
	isWord := func(c byte) bool {
		return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
	}
	for i := 0; i < len(q); {
		c := q[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '\'':
			var b strings.Builder
			j := i + 1
			for ; ; j++ {
				if j >= len(q) {
					return nil, errors.New("unterminated string")
				}
				if q[j] == '\'' {
					if j+1 < len(q) && q[j+1] == '\'' {
						b.WriteByte('\'')
						j++
						continue
					}
					break
				}
				b.WriteByte(q[j])
			}
			ts = append(ts, fakeTok{'s', b.String()})
			i = j + 1
		case c == '"':
			j := strings.IndexByte(q[i+1:], '"')
			if j < 0 {
				return nil, errors.New("unterminated identifier")
			}
			ts = append(ts, fakeTok{'q', q[i+1 : i+1+j]})
			i += j + 2
		case c == '$':
			j := i + 1
			for j < len(q) && q[j] >= '0' && q[j] <= '9' {
				j++
			}
			ts = append(ts, fakeTok{'p', q[i+1 : j]})
			i = j
		case c >= '0' && c <= '9':
			j := i
			for j < len(q) && q[j] >= '0' && q[j] <= '9' {
				j++
			}
			ts = append(ts, fakeTok{'n', q[i:j]})
			i = j
		case isWord(c):
			j := i
			for j < len(q) && isWord(q[j]) {
				j++
			}
			ts = append(ts, fakeTok{'w', strings.ToLower(q[i:j])})
			i = j
		default:
			op := string(c)
			for _, two := range []string{"::", "||", ">=", "<=", "<>", "!="} {
				if strings.HasPrefix(q[i:], two) {
					op = two
				}
			}
			if len(op) == 1 && !strings.Contains("()[],;.*=<>+-", op) {
				return nil, fmt.Errorf("unexpected %q", op)
			}
			ts = append(ts, fakeTok{'o', op})
			i += len(op)
		}
	}
	return ts, nil
}

type fakeParser struct {
	toks []fakeTok
	i    int
}

func (p *fakeParser) done() bool { return p.i >= len(p.toks) }

func (p *fakeParser) peek() fakeTok {
	if p.done() {
		return fakeTok{}
	}
	return p.toks[p.i]
}

func (p *fakeParser) next() fakeTok {
	t := p.peek()
	p.i++
	return t
}

// word reports whether the next token is keyword w.
func (p *fakeParser) word(w string) bool { t := p.peek(); return t.k == 'w' && t.v == w }

// op consumes operator o if it is next.
func (p *fakeParser) op(o string) bool {
	if t := p.peek(); t.k == 'o' && t.v == o {
		p.i++
		return true
	}
	return false
}

func (p *fakeParser) accept(w string) bool {
	if p.word(w) {
		p.i++
		return true
	}
	return false
}

func (p *fakeParser) expectOp(o string) error {
	if !p.op(o) {
		return fmt.Errorf("want %q, have %q", o, p.peek().v)
	}
	return nil
}

func (p *fakeParser) expect(w string) error {
	if !p.accept(w) {
		return fmt.Errorf("want %q, have %q", w, p.peek().v)
	}
	return nil
}

// fakeExpr is a node of a parsed expression.
type fakeExpr interface{}

type (
	fakeLit   struct{ v any }
	fakeParam struct{ n int }
	fakeRef   struct{ name string }
	fakeCast  struct {
		x   fakeExpr
		typ string
	}
	fakeCall struct {
		name string
		args []fakeExpr
	}
	fakeCase struct {
		whens []fakeWhen
		els   fakeExpr
	}
	fakeWhen   struct{ cond, then fakeExpr }
	fakeIsNull struct {
		x   fakeExpr
		not bool
	}
	fakeAnd struct{ l, r fakeExpr }
	fakeCmp struct {
		op   string
		l, r fakeExpr
	}
	fakeConcat struct{ parts []fakeExpr }
	fakeAtZone struct{ x fakeExpr }
)

// fakeSelect is SELECT items [FROM (SELECT …) alias] [OFFSET n].
type fakeSelect struct {
	items []fakeItem
	from  *fakeSelect
}

type fakeItem struct {
	x    fakeExpr
	name string
}

func (sel *fakeSelect) walk(f func(fakeExpr)) {
	var w func(x fakeExpr)
	w = func(x fakeExpr) {
		f(x)
		switch x := x.(type) {
		case *fakeCast:
			w(x.x)
		case *fakeCall:
			for _, a := range x.args {
				w(a)
			}
		case *fakeCase:
			for _, wh := range x.whens {
				w(wh.cond)
				w(wh.then)
			}
			if x.els != nil {
				w(x.els)
			}
		case *fakeIsNull:
			w(x.x)
		case *fakeAnd:
			w(x.l)
			w(x.r)
		case *fakeCmp:
			w(x.l)
			w(x.r)
		case *fakeConcat:
			for _, p := range x.parts {
				w(p)
			}
		case *fakeAtZone:
			w(x.x)
		}
	}
	if sel.from != nil {
		sel.from.walk(f)
	}
	for _, it := range sel.items {
		w(it.x)
	}
}

func (p *fakeParser) selectStmt() (*fakeSelect, error) {
	if err := p.expect("select"); err != nil {
		return nil, err
	}
	sel := &fakeSelect{}
	for {
		x, err := p.expr()
		if err != nil {
			return nil, err
		}
		it := fakeItem{x: x}
		if p.accept("as") {
			it.name = p.next().v
		}
		sel.items = append(sel.items, it)
		if !p.op(",") {
			break
		}
	}
	if p.accept("from") {
		if err := p.expectOp("("); err != nil {
			return nil, err
		}
		inner, err := p.selectStmt()
		if err != nil {
			return nil, err
		}
		if err := p.expectOp(")"); err != nil {
			return nil, err
		}
		p.accept("as")
		if t := p.next(); t.k != 'w' {
			return nil, errors.New("a subquery without an alias")
		}
		sel.from = inner
	}
	if p.accept("offset") {
		if t := p.next(); t.k != 'n' {
			return nil, errors.New("OFFSET without a number")
		}
	}
	return sel, nil
}

func (p *fakeParser) expr() (fakeExpr, error) {
	l, err := p.cmp()
	if err != nil {
		return nil, err
	}
	for p.accept("and") {
		r, err := p.cmp()
		if err != nil {
			return nil, err
		}
		l = &fakeAnd{l, r}
	}
	return l, nil
}

func (p *fakeParser) cmp() (fakeExpr, error) {
	l, err := p.concat()
	if err != nil {
		return nil, err
	}
	if p.accept("is") {
		not := p.accept("not")
		if err := p.expect("null"); err != nil {
			return nil, err
		}
		return &fakeIsNull{x: l, not: not}, nil
	}
	for _, op := range []string{">=", "<=", "<>", "!=", "=", ">", "<"} {
		if p.op(op) {
			r, err := p.concat()
			if err != nil {
				return nil, err
			}
			return &fakeCmp{op: op, l: l, r: r}, nil
		}
	}
	return l, nil
}

func (p *fakeParser) concat() (fakeExpr, error) {
	x, err := p.postfix()
	if err != nil {
		return nil, err
	}
	if !(p.peek().k == 'o' && p.peek().v == "||") {
		return x, nil
	}
	c := &fakeConcat{parts: []fakeExpr{x}}
	for p.op("||") {
		y, err := p.postfix()
		if err != nil {
			return nil, err
		}
		c.parts = append(c.parts, y)
	}
	return c, nil
}

func (p *fakeParser) postfix() (fakeExpr, error) {
	x, err := p.primary()
	if err != nil {
		return nil, err
	}
	for {
		switch {
		case p.op("::"):
			t := p.next()
			if t.k != 'w' {
				return nil, errors.New("a cast to no type")
			}
			typ := t.v
			if p.op("[") {
				if err := p.expectOp("]"); err != nil {
					return nil, err
				}
				typ += "[]"
			}
			x = &fakeCast{x: x, typ: typ}
		case p.word("at"):
			p.next()
			if err := p.expect("time"); err != nil {
				return nil, err
			}
			if err := p.expect("zone"); err != nil {
				return nil, err
			}
			if t := p.next(); t.k != 's' || t.v != "UTC" {
				return nil, errors.New("AT TIME ZONE other than 'UTC'")
			}
			x = &fakeAtZone{x: x}
		default:
			return x, nil
		}
	}
}

func (p *fakeParser) primary() (fakeExpr, error) {
	t := p.next()
	switch t.k {
	case 'n':
		v, err := strconv.ParseInt(t.v, 10, 64)
		return &fakeLit{v}, err
	case 's':
		return &fakeLit{t.v}, nil
	case 'p':
		n, err := strconv.Atoi(t.v)
		return &fakeParam{n}, err
	case 'o':
		switch t.v {
		case "(":
			x, err := p.expr()
			if err != nil {
				return nil, err
			}
			return x, p.expectOp(")")
		case "-":
			x, err := p.primary()
			if err != nil {
				return nil, err
			}
			if l, ok := x.(*fakeLit); ok {
				if v, ok := l.v.(int64); ok {
					return &fakeLit{-v}, nil
				}
			}
			return nil, errors.New("unary minus on a non-number")
		}
	case 'w':
		switch t.v {
		case "null":
			return &fakeLit{nil}, nil
		case "true":
			return &fakeLit{true}, nil
		case "false":
			return &fakeLit{false}, nil
		case "case":
			c := &fakeCase{}
			for p.accept("when") {
				cond, err := p.expr()
				if err != nil {
					return nil, err
				}
				if err := p.expect("then"); err != nil {
					return nil, err
				}
				then, err := p.expr()
				if err != nil {
					return nil, err
				}
				c.whens = append(c.whens, fakeWhen{cond, then})
			}
			if p.accept("else") {
				els, err := p.expr()
				if err != nil {
					return nil, err
				}
				c.els = els
			}
			if len(c.whens) == 0 {
				return nil, errors.New("CASE without WHEN")
			}
			return c, p.expect("end")
		}
		if p.op("(") {
			c := &fakeCall{name: t.v}
			if !p.op(")") {
				for {
					a, err := p.expr()
					if err != nil {
						return nil, err
					}
					c.args = append(c.args, a)
					if p.op(")") {
						break
					}
					if err := p.expectOp(","); err != nil {
						return nil, err
					}
				}
			}
			return c, nil
		}
		return &fakeRef{t.v}, nil
	}
	return nil, fmt.Errorf("unexpected %q", t.v)
}

// ---- statements: evaluation ----

// fakeEval evaluates one statement on its session, with mu held. Without c
// (keysOf) it evaluates constants only.
type fakeEval struct {
	c    *fakeConn
	run  *fakeRun
	tx   *fakeTx
	args []any
	env  map[string]any // the columns of a FROM subquery
}

// statement runs p and returns its row.
func (e *fakeEval) statement(p *fakeParsed) ([]any, error) {
	s := e.c.s
	switch {
	case p.listen != "":
		s.listening[p.listen] = true
		return nil, nil
	case p.unlist != "":
		if p.unlist == "*" {
			clear(s.listening)
		} else {
			delete(s.listening, p.unlist)
		}
		return nil, nil
	case p.holders:
		return e.holders(p)
	case p.keysFn != "":
		return e.keys(p)
	}
	return e.selectRow(p.sel)
}

func (e *fakeEval) selectRow(sel *fakeSelect) ([]any, error) {
	if sel.from != nil {
		vals, err := e.selectRow(sel.from)
		if err != nil {
			return nil, err
		}
		env := map[string]any{}
		for i, it := range sel.from.items {
			if it.name != "" {
				env[it.name] = vals[i]
			}
		}
		e.env = env
	}
	vals := make([]any, len(sel.items))
	for i, it := range sel.items {
		v, err := e.eval(it.x) // left to right, as the server does
		if err != nil {
			return nil, err
		}
		vals[i] = v
	}
	return vals, nil
}

func (e *fakeEval) eval(x fakeExpr) (any, error) {
	switch x := x.(type) {
	case *fakeLit:
		return x.v, nil
	case *fakeParam:
		if x.n < 1 || x.n > len(e.args) {
			return nil, fmt.Errorf("fake: no parameter $%d", x.n)
		}
		return fakeArg(e.args[x.n-1])
	case *fakeRef:
		v, ok := e.env[x.name]
		if !ok {
			return nil, fmt.Errorf("fake: no column %q", x.name)
		}
		return v, nil
	case *fakeCast:
		v, err := e.eval(x.x)
		if err != nil {
			return nil, err
		}
		return fakeCastTo(v, x.typ)
	case *fakeIsNull:
		v, err := e.eval(x.x)
		if err != nil {
			return nil, err
		}
		return (v == nil) != x.not, nil
	case *fakeAnd:
		l, err := e.eval(x.l)
		if err != nil {
			return nil, err
		}
		if l != true {
			return false, nil
		}
		r, err := e.eval(x.r)
		return r == true, err
	case *fakeCmp:
		l, err := e.eval(x.l)
		if err != nil {
			return nil, err
		}
		r, err := e.eval(x.r)
		if err != nil {
			return nil, err
		}
		a, ok1 := l.(int64)
		b, ok2 := r.(int64)
		if !ok1 || !ok2 {
			return nil, fmt.Errorf("fake: comparing %T and %T", l, r)
		}
		switch x.op {
		case ">=":
			return a >= b, nil
		case "<=":
			return a <= b, nil
		case ">":
			return a > b, nil
		case "<":
			return a < b, nil
		case "=":
			return a == b, nil
		}
		return a != b, nil
	case *fakeConcat:
		var b strings.Builder
		for _, p := range x.parts {
			v, err := e.eval(p)
			if err != nil {
				return nil, err
			}
			if v == nil {
				return nil, nil
			}
			b.WriteString(fakeText(v).(string))
		}
		return b.String(), nil
	case *fakeAtZone:
		v, err := e.eval(x.x)
		if err != nil {
			return nil, err
		}
		t, ok := v.(time.Time)
		if !ok {
			return nil, errors.New("fake: AT TIME ZONE on a non-time")
		}
		return t.UTC(), nil
	case *fakeCase:
		for _, w := range x.whens {
			c, err := e.eval(w.cond)
			if err != nil {
				return nil, err
			}
			if c == true {
				return e.eval(w.then)
			}
		}
		if x.els != nil {
			return e.eval(x.els)
		}
		return nil, nil
	case *fakeCall:
		args := make([]any, len(x.args))
		for i, a := range x.args {
			v, err := e.eval(a)
			if err != nil {
				return nil, err
			}
			args[i] = v
		}
		return e.call(x.name, args)
	}
	return nil, fmt.Errorf("fake: cannot evaluate %T", x)
}

// call runs one function. It runs with mu held.
func (e *fakeEval) call(name string, args []any) (any, error) {
	if e.c == nil {
		return nil, errors.New("fake: not a constant")
	}
	srv, s := e.c.s.srv, e.c.s
	str := func(i int) (string, bool) {
		if i >= len(args) {
			return "", false
		}
		v, ok := args[i].(string)
		return v, ok
	}
	switch name {
	case "pg_try_advisory_lock", "pg_try_advisory_lock_shared":
		k, err := fakeKeyOf(args)
		if err != nil {
			return nil, err
		}
		return srv.tryLocked(s, k, strings.HasSuffix(name, "_shared"))
	case "pg_advisory_lock", "pg_advisory_lock_shared":
		k, err := fakeKeyOf(args)
		if err != nil {
			return nil, err
		}
		return "", e.c.waitLocked(e.run, k, strings.HasSuffix(name, "_shared")) // void
	case "pg_advisory_unlock", "pg_advisory_unlock_shared":
		k, err := fakeKeyOf(args)
		if err != nil {
			return nil, err
		}
		return srv.unlockLocked(s, k, strings.HasSuffix(name, "_shared")), nil
	case "pg_advisory_unlock_all":
		srv.unlockAllLocked(s)
		return "", nil
	case "pg_backend_pid":
		return int64(s.pid), nil
	case "pg_is_in_recovery":
		return srv.standby, nil
	case "pg_current_xact_id":
		if e.tx.xid == 0 {
			srv.xid++
			e.tx.xid = srv.xid
		}
		return e.tx.xid, nil
	case "current_setting":
		n, _ := str(0)
		v, ok := s.settings[n]
		switch {
		case ok:
			return v, nil
		case len(args) > 1 && args[1] == true:
			return nil, nil
		}
		return nil, fakePgError("42704", "ERROR", fmt.Sprintf("unrecognized configuration parameter %q", n))
	case "set_config":
		if len(args) != 3 {
			return nil, errors.New("fake: set_config takes 3 arguments")
		}
		n, _ := str(0)
		v, ok := str(1)
		local, _ := args[2].(bool)
		old, has := s.settings[n]
		switch {
		case !has:
			return nil, fakePgError("42704", "ERROR", fmt.Sprintf("unrecognized configuration parameter %q", n))
		case !ok:
			srv.violatef("set_config(%q) to NULL", n)
			return nil, fakePgError("22004", "ERROR", "fake: set_config to NULL")
		}
		s.settings[n] = v
		e.tx.undo = append(e.tx.undo, fakeUndo{local: local, f: func() { s.settings[n] = old }})
		return v, nil
	case "pg_notify":
		ch, ok1 := str(0)
		payload, ok2 := str(1)
		if !ok1 || !ok2 {
			return nil, errors.New("fake: pg_notify of NULL")
		}
		e.tx.notes = append(e.tx.notes, &pgconn.Notification{PID: uint32(s.pid), Channel: ch, Payload: payload})
		return "", nil // void
	case "pg_cancel_backend":
		pid, ok := int64(0), false
		if len(args) == 1 {
			pid, ok = args[0].(int64)
		}
		if !ok {
			return nil, errors.New("fake: pg_cancel_backend of a non-number")
		}
		target := srv.sessions[int32(pid)]
		if target == nil {
			return false, nil
		}
		srv.mu.Unlock()
		ok = srv.cancelBackend(target)
		srv.mu.Lock()
		return ok, nil
	case "concat":
		var b strings.Builder
		for _, a := range args {
			if a != nil {
				b.WriteString(fakeText(a).(string))
			}
		}
		return b.String(), nil
	case "coalesce":
		for _, a := range args {
			if a != nil {
				return a, nil
			}
		}
		return nil, nil
	case "clock_timestamp", "now":
		return time.Now(), nil
	case "to_char":
		t, ok := args[0].(time.Time)
		f, _ := str(1)
		if !ok || f != `YYYYMMDD"T"HH24MISS.MS"Z"` {
			return nil, fmt.Errorf("fake: to_char(%T, %q)", args[0], f)
		}
		return t.UTC().Format("20060102T150405.000Z"), nil
	}
	srv.violatef("a function the fake does not know: %s", name)
	return nil, fakePgError("42883", "ERROR", "fake: function "+name+" does not exist")
}

// keys runs the multi-key statement (keysStmt): the function on every key
// of the lists, bigint keys first, and returns those it answered true for.
// A failure midway leaves what was taken before it held.
func (e *fakeEval) keys(p *fakeParsed) ([]any, error) {
	ids, as, bs := fakeFields(e.args, p.keysArg[0]), fakeFields(e.args, p.keysArg[1]), fakeFields(e.args, p.keysArg[2])
	if len(as) != len(bs) {
		return nil, fakePgError("22023", "ERROR", "fake: unnest of arrays of different lengths")
	}
	var got []string
	try := func(x string, args ...any) error {
		v, err := e.call(p.keysFn, args)
		if err != nil {
			return err
		}
		if v == true {
			got = append(got, x)
		}
		return nil
	}
	for _, id := range ids {
		v, err := strconv.ParseInt(id, 10, 64)
		if err != nil {
			return nil, fakePgError("22P02", "ERROR", "invalid input syntax for type bigint")
		}
		if err := try(id, v); err != nil {
			return nil, err
		}
	}
	for i := range as {
		a, err1 := strconv.ParseInt(as[i], 10, 32)
		b, err2 := strconv.ParseInt(bs[i], 10, 32)
		if err1 != nil || err2 != nil {
			return nil, fakePgError("22P02", "ERROR", "invalid input syntax for type integer")
		}
		if err := try(as[i]+","+bs[i], a, b); err != nil {
			return nil, err
		}
	}
	return []any{strings.Join(got, " ")}, nil
}

// holders answers sqlHolders from the lock table.
func (e *fakeEval) holders(p *fakeParsed) ([]any, error) {
	srv := e.c.s.srv
	var v [3]int64
	for i := range 3 {
		if p.keysArg[i] < 1 || p.keysArg[i] > len(e.args) {
			return nil, errors.New("fake: pg_locks query without its parameters")
		}
		x, err := fakeArg(e.args[p.keysArg[i]-1])
		if err != nil {
			return nil, err
		}
		v[i], _ = x.(int64)
	}
	key, ok := KeyFromPgLocks(int16(v[0]), uint32(v[1]), uint32(v[2]))
	type h struct {
		PID   int32     `json:"pid"`
		Mode  string    `json:"mode"`
		App   string    `json:"app"`
		Addr  string    `json:"addr"`
		Port  int       `json:"port"`
		Start time.Time `json:"start"`
	}
	list := []h{}
	if lk := srv.locks[key]; ok && lk != nil {
		for s, n := range lk.held {
			for m, c := range n {
				if c > 0 {
					mode := "ExclusiveLock"
					if m == 1 {
						mode = "ShareLock"
					}
					list = append(list, h{PID: s.pid, Mode: mode, App: s.settings["application_name"], Start: s.started})
				}
			}
		}
	}
	slices.SortFunc(list, func(a, b h) int { return int(a.PID - b.PID) })
	b, err := json.Marshal(list)
	if err != nil {
		return nil, err
	}
	return []any{srv.standby, string(b)}, nil
}

// fakeKeyOf is the key of an advisory function's arguments.
func fakeKeyOf(args []any) (Key, error) {
	switch len(args) {
	case 1:
		if v, ok := args[0].(int64); ok {
			return ID(v), nil
		}
	case 2:
		a, ok1 := args[0].(int64)
		b, ok2 := args[1].(int64)
		if ok1 && ok2 && a == int64(int32(a)) && b == int64(int32(b)) {
			return Pair(int32(a), int32(b)), nil
		}
	}
	return Key{}, fmt.Errorf("fake: advisory key of %v", args)
}

// fakeArg converts a parameter as a driver would send it.
func fakeArg(v any) (any, error) {
	if vr, ok := v.(driver.Valuer); ok {
		var err error
		if v, err = vr.Value(); err != nil {
			return nil, err
		}
	}
	switch x := v.(type) {
	case nil, string, bool, int64, time.Time:
		return x, nil
	case int:
		return int64(x), nil
	case int32:
		return int64(x), nil
	case int16:
		return int64(x), nil
	case uint32:
		return int64(x), nil
	case []byte:
		return string(x), nil
	}
	return nil, fmt.Errorf("fake: a parameter of type %T", v)
}

// fakeText is v as text (NULL stays NULL).
func fakeText(v any) any {
	switch x := v.(type) {
	case nil:
		return nil
	case string:
		return x
	case int64:
		return strconv.FormatInt(x, 10)
	case bool:
		return strconv.FormatBool(x)
	case time.Time:
		return x.Format(time.RFC3339Nano)
	}
	return fmt.Sprint(v)
}

func fakeCastTo(v any, typ string) (any, error) {
	if v == nil {
		return nil, nil
	}
	switch typ {
	case "text":
		return fakeText(v), nil
	case "bigint", "int8", "int4", "integer", "int":
		var n int64
		switch x := v.(type) {
		case int64:
			n = x
		case string:
			var err error
			if n, err = strconv.ParseInt(strings.TrimSpace(x), 10, 64); err != nil {
				return nil, fakePgError("22P02", "ERROR", fmt.Sprintf("invalid input syntax for type %s: %q", typ, x))
			}
		default:
			return nil, fmt.Errorf("fake: cannot cast %T to %s", v, typ)
		}
		if (typ == "int4" || typ == "integer" || typ == "int") && n != int64(int32(n)) {
			return nil, fakePgError("22003", "ERROR", "integer out of range")
		}
		return n, nil
	case "bool", "boolean":
		if b, ok := v.(bool); ok {
			return b, nil
		}
	}
	return nil, fmt.Errorf("fake: cannot cast %T to %s", v, typ)
}

// fakeAssign scans v into dst as pgx would.
func fakeAssign(dst, v any) error {
	switch d := dst.(type) {
	case *any:
		*d = v
		return nil
	case *sql.NullString:
		if v == nil {
			*d = sql.NullString{}
			return nil
		}
		*d = sql.NullString{String: fakeText(v).(string), Valid: true}
		return nil
	}
	if v == nil {
		return fmt.Errorf("fake: cannot scan NULL into %T", dst)
	}
	switch d := dst.(type) {
	case *string:
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("fake: cannot scan %T into *string", v)
		}
		*d = s
		return nil
	case *bool:
		b, ok := v.(bool)
		if !ok {
			return fmt.Errorf("fake: cannot scan %T into *bool", v)
		}
		*d = b
		return nil
	}
	n, ok := v.(int64)
	if !ok {
		return fmt.Errorf("fake: cannot scan %T into %T", v, dst)
	}
	switch d := dst.(type) {
	case *int64:
		*d = n
	case *int:
		*d = int(n)
	case *int32:
		if n != int64(int32(n)) {
			return errors.New("fake: out of range for int32")
		}
		*d = int32(n)
	default:
		return fmt.Errorf("fake: cannot scan into %T", dst)
	}
	return nil
}

// ---- test helpers ----

// newFakeLocker builds a Locker on src, closed when t ends.
func newFakeLocker(t testing.TB, src *fakeSource, opts ...Option) *Locker {
	t.Helper()
	l, err := newLocker(&Locker{}, src, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A test that failed may leave a wait stuck, which Close would wait
		// for: then cut it.
		done := make(chan struct{})
		go func() {
			_ = l.Close()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("Close did not return within 5s; cutting every statement on the fake")
			src.srv.unblock()
			<-done
		}
	})
	return l
}

// fakeWaitFor polls cond until it holds, failing t after a while.
func fakeWaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// checkFakeClean checks, after Close, that every session the pools handed
// out was given back or destroyed, and that none holds or waits for a lock.
func checkFakeClean(t testing.TB, srv *fakeServer, srcs ...*fakeSource) {
	t.Helper()
	srv.mu.Lock()
	defer srv.mu.Unlock()
	for _, p := range srcs {
		if p.inUse != 0 {
			var in []string
			for _, s := range p.all {
				if s.conn != nil {
					in = append(in, fmt.Sprintf("%d (ended: %v, running: %v)", s.pid, s.ended, s.running != nil))
				}
			}
			t.Errorf("fake: %d sessions still taken from the pool after Close: %v", p.inUse, in)
		}
		if p.acquired != p.released+p.destroyed+p.inUse {
			t.Errorf("fake: pool counts do not add up: acquired %d, released %d, destroyed %d, in use %d",
				p.acquired, p.released, p.destroyed, p.inUse)
		}
		for _, s := range p.all {
			if s.ended != nil {
				continue
			}
			if held := srv.heldLocked(s); len(held) > 0 {
				t.Errorf("fake: session %d still holds %v after Close", s.pid, held)
			}
			if s.waiting != nil {
				t.Errorf("fake: session %d still waits for %v after Close", s.pid, s.waiting.key)
			}
		}
	}
}

// heldOnPools returns what the pools' sessions hold now.
func heldOnPools(srv *fakeServer, srcs ...*fakeSource) map[int32][]fakeHeld {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	out := map[int32][]fakeHeld{}
	for _, p := range srcs {
		for _, s := range p.all {
			if h := srv.heldLocked(s); len(h) > 0 {
				out[s.pid] = h
			}
		}
	}
	return out
}

// queuedFromPools returns the keys the pools' sessions wait for now.
func queuedFromPools(srv *fakeServer, srcs ...*fakeSource) []Key {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var out []Key
	for _, p := range srcs {
		for _, s := range p.all {
			if s.waiting != nil {
				out = append(out, s.waiting.key)
			}
		}
	}
	return out
}
