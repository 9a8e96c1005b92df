package pglocks

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A Locker takes and holds session-level advisory locks for one process. It
// is a lock manager, not a wrapper around one connection:
//
//   - It takes at most [WithMaxConns] connections of its pool (default 2),
//     for holding and waiting together, however many goroutines use it.
//   - Locks are taken with pg_try_advisory_lock on a shared holder
//     connection, the primary. Held locks share it, so holding a thousand
//     uncontended locks costs one server connection, not a thousand.
//   - A wait for a key that another session holds takes a connection of its
//     own while the Locker may have one, and waits inside the server's lock
//     queue on it; once granted, that connection holds the lock until it is
//     released. Beyond those, waits are multiplexed: they take no
//     connection, the primary tries the awaited keys together, and locks
//     granted to them are held on the primary (see [Locker.Lock]).
//   - PostgreSQL lets a session take a lock it already holds, so the Locker
//     arbitrates between its own goroutines: they exclude each other exactly
//     as separate sessions would, in first-come order.
//   - A connection goes back to the pool only when it holds no lock. If a
//     statement on a holder connection fails, the connection is closed (the
//     server then frees its locks) and every lock it held is reported lost.
//
// A Locker is safe for concurrent use. Create one per pool with [New] or
// [NewDB] and share it; [Locker.Close] releases everything it holds.
type Locker struct {
	pgx      *pgxpool.Pool // set by New
	db       *sql.DB       // set by NewDB
	cfg      config
	closeCtx context.Context // cancelled by Close
	closeNow context.CancelFunc
	g        group  // background goroutines: the heartbeat, probes, watchers, the poller
	counts   counts // Stat's totals

	table *table    // what this process holds and waits for
	pool  *pool     // the server sessions it holds them on
	mux   *mux      // the waits without a session of their own
	acq   *acquirer // the acquisition pipeline
	rel   *releaser // and its reverse
}

// New returns a Locker that takes its connections from pool. The pool stays
// the caller's: the Locker never closes it, and Close leaves it usable.
func New(pool *pgxpool.Pool, opts ...Option) (*Locker, error) {
	if pool == nil {
		return nil, errors.New("pglocks: New: nil pool")
	}
	return newLocker(&Locker{pgx: pool}, pgxSource{pool}, opts)
}

// NewDB returns a Locker that takes its connections from db, which must be a
// PostgreSQL database (pgx's stdlib driver and lib/pq are tested). The Locker
// never closes db, and Close leaves it usable. With drivers other than pgx's
// stdlib, which cannot send a cancel request, a cancelled wait is stopped with
// pg_cancel_backend from a session the Locker holds.
func NewDB(db *sql.DB, opts ...Option) (*Locker, error) {
	if db == nil {
		return nil, errors.New("pglocks: NewDB: nil db")
	}
	return newLocker(&Locker{db: db}, sqlSource{db}, opts)
}

func newLocker(l *Locker, src source, opts []Option) (*Locker, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("pglocks: nil Option")
		}
		o(&cfg)
	}
	if cfg.err != nil {
		return nil, cfg.err
	}
	if bound := cfg.serverBound(); cfg.hbInterval >= bound || cfg.hbTimeout >= bound-cfg.hbInterval {
		return nil, fmt.Errorf("pglocks: heartbeat interval+timeout (%v) must be shorter than the server keepalive bound (%v), or the server could give a lock away before its holder hears of the loss",
			cfg.hbInterval+cfg.hbTimeout, cfg.serverBound())
	}
	l.cfg = cfg
	l.closeCtx, l.closeNow = context.WithCancel(context.Background())
	max := cfg.maxConns
	if pm := src.maxConns(); pm > 0 && pm < max {
		max = pm // more could not be had
	}
	// From the bottom up: each layer is given what it needs of those below,
	// and the pool and table what to tell the Locker (events).
	l.table = newTable(cfg.maxLocks, tableEvents{
		newHold: func() *hold {
			lk := &Lock{l: l}
			lk.handle = lk
			return &lk.hold
		},
		lingerEnd: func(e *entry) { l.rel.endLinger(e) },
		losses:    &l.counts.losses,
	})
	l.pool = newPool(src, &l.cfg, max, l.closeCtx, &l.g, events{l})
	b := &batcher{pool: l.pool, cfg: &l.cfg}
	l.mux = newMux(l.pool, b, l.table.want, l.closeCtx, &l.cfg)
	l.rel = &releaser{table: l.table, pool: l.pool, batch: b, mux: l.mux}
	b.posted = l.rel.posted
	l.acq = &acquirer{table: l.table, pool: l.pool, batch: b, mux: l.mux, rel: l.rel, cfg: &l.cfg, closeCtx: l.closeCtx}
	l.g.start()
	go func() {
		defer l.g.done()
		l.pool.heartbeat()
	}()
	l.g.start()
	go func() {
		defer l.g.done()
		l.mux.run()
	}()
	if t := l.cfg.tracers.locker; t != nil {
		t.TraceLockerNew(l)
	}
	return l, nil
}

// events is what the pool tells the Locker.
type events struct{ l *Locker }

func (ev events) lost(s *session, cause error) int {
	holds, lingering := ev.l.table.lost(s, cause) // counted in Stat's Losses
	ev.l.cfg.tracers.traceLoss(ev.l, holds)
	return len(holds) + lingering
}

func (ev events) heard(n *pgconn.Notification) { ev.l.mux.heard(n) }

func (ev events) freed() {
	if ev.l.mux.waiting() {
		ev.l.mux.poke() // a session may be free for the oldest wait
	}
}

func (ev events) busy() bool { return ev.l.mux.waiting() }

// Lock takes key, waiting as long as ctx allows while another session or
// another goroutine of this Locker holds it in a conflicting mode. When ctx
// ends first, Lock returns an error matching ctx.Err() and nothing of it
// stays held or queued on the server. Goroutines of this Locker that want
// key are served first come, first served.
//
// The wait happens in the server's lock queue on a session of its own while
// the Locker may have one ([WithMaxConns]), so the lock is had as soon as it
// is free, in queue order, and ctx's deadline is enforced by the server. (If
// the server does not answer the cancellation within the statement timeout,
// Lock closes the connection and returns; the server then drops the wait
// when it notices.) Beyond those sessions the wait is multiplexed: it costs
// no connection, and the Locker tries the awaited keys together on its
// primary session, at once when another Locker (of any process, with a pgx
// driver) tells that it let the key go, and otherwise at least every 250 ms.
// A multiplexed try never jumps the server's queue, and the oldest
// multiplexed wait moves into the server's queue when a session frees.
//
// The wait runs on a session of its own while the Locker's other locks stay
// on theirs, so PostgreSQL's deadlock detector cannot see a cycle that runs
// through a Locker: take several locks with [Locker.LockAll], or in one
// global order with a deadline.
//
// ctx bounds the acquisition only: the lock is held until [Lock.Release], until
// [Locker.Close], or until it is lost ([Lock.Done]).
func (l *Locker) Lock(ctx context.Context, key Key, opts ...LockOption) (*Lock, error) {
	return l.lockOne(ctx, key, lockOptions(opts), true)
}

// TryLock takes key if it can be had at once, and otherwise returns an error
// matching [ErrLocked]. It never waits for the lock, though it does wait (as
// ctx allows) for a connection and one round trip.
func (l *Locker) TryLock(ctx context.Context, key Key, opts ...LockOption) (*Lock, error) {
	return l.lockOne(ctx, key, lockOptions(opts), false)
}

// lockOne is Lock and TryLock: the acquisition of a set of one.
func (l *Locker) lockOne(ctx context.Context, key Key, o lockConfig, wait bool) (*Lock, error) {
	switch {
	case ctx == nil:
		return nil, lockError(key, errNilContext)
	case !key.valid():
		return nil, lockError(key, ErrInvalidKey)
	case o.err != nil:
		return nil, lockError(key, o.err)
	}
	began := time.Now()
	var tctx context.Context
	if l.cfg.tracers.acquire != nil {
		tctx = l.cfg.tracers.start(ctx, l, []Key{key}, o, wait)
	}
	var lk *Lock
	var err error
	switch {
	case ctx.Err() != nil:
		err = lockError(key, ctxError(ctx))
	case o.slots > 0:
		var h *hold
		if h, err = (slotTaker{l.acq}).lockSlot(ctx, key, o, wait); err == nil {
			lk = lockOf(h)
		}
	default:
		var holds []*hold
		if holds, err = l.acq.acquire(ctx, []Key{key}, o, wait); err == nil {
			lk = lockOf(holds[0])
		}
	}
	d := time.Since(began)
	l.counts.count(d, err)
	if l.cfg.tracers.acquire != nil {
		l.cfg.tracers.end(tctx, l, d, lk, nil, err)
	}
	return lk, err
}

// Do runs fn while holding key, taken as [Locker.Lock] does, and releases it
// when fn returns or panics. fn's ctx is cancelled, with the loss error as its
// cause, if the lock is lost while fn runs; Do then returns an error matching
// [ErrLockLost] (joined with fn's own error).
func (l *Locker) Do(ctx context.Context, key Key, fn func(ctx context.Context) error, opts ...LockOption) error {
	if fn == nil {
		return lockError(key, errNilFunc)
	}
	lk, err := l.Lock(ctx, key, opts...)
	if err != nil {
		return err
	}
	return lk.run(ctx, fn)
}

// TryDo is [Locker.Do] with [Locker.TryLock]: if key cannot be had at once it
// returns an error matching [ErrLocked] and does not run fn.
func (l *Locker) TryDo(ctx context.Context, key Key, fn func(ctx context.Context) error, opts ...LockOption) error {
	if fn == nil {
		return lockError(key, errNilFunc)
	}
	lk, err := l.TryLock(ctx, key, opts...)
	if err != nil {
		return err
	}
	return lk.run(ctx, fn)
}

// Close releases every lock the Locker holds, makes Lock calls still waiting
// return [ErrClosed], waits for its goroutines to stop and gives its
// connections back to the pool (a connection whose locks cannot be released is
// closed instead). One exception: with a driver that cannot interrupt a
// statement on a silent network (lib/pq), a connection whose statement was
// abandoned is closed by a goroutine when the driver returns, which may be
// after Close. Handles of released locks report [ErrClosed] from Err.
// Every call after Close, Close included, returns an error matching ErrClosed.
func (l *Locker) Close() error {
	if !l.table.close() {
		return fmt.Errorf("pglocks: %w", ErrClosed)
	}
	l.closeNow()
	l.table.ops.Wait() // acquisitions and releases in flight
	l.pool.close()     // refuses new background goroutines too
	l.g.wait()         // nothing else touches the sessions after this
	err := l.pool.clear()
	l.table.closeAll()
	if t := l.cfg.tracers.locker; t != nil {
		t.TraceLockerClose(l)
	}
	return err
}
