// Package gocronpglocks runs the jobs of go-co-op/gocron v2 schedulers on a
// fleet of replicas that share one PostgreSQL, with pglocks advisory locks
// deciding which replica runs what. It provides both of gocron's distributed
// modes:
//
//   - [Locker] is a gocron.Locker: each run of a job takes the job's lock
//     with [pglocks.Locker.TryLock], so every replica schedules every job
//     and the one that gets the lock runs it; the others skip that run.
//     The lock is kept at least a minimum hold ([pglocks.MinHold]) after it
//     was taken, however soon the job returns, so that a replica whose
//     clock is behind, and which fires the same tick a little later, finds
//     it still held. That is the "time splay between schedulers" that
//     gocron leaves to the locker.
//   - [Elector] is a gocron.Elector: one replica leads, elected with
//     [pglocks.Locker.Lead], and runs every job; the others skip them all.
//     When the leader's session ends (the process killed, its connection
//     cut), the next replica is elected and runs the jobs from then on.
//
// Install either on every replica's scheduler, and shut down in the order
// shown, so that a replica going away neither cuts a minimum hold short
// nor leaves a campaign behind:
//
//	locker, _ := pglocks.New(pool)
//	jobs, _ := gocronpglocks.NewLocker(locker, 30*time.Second) // jobs every minute
//	s, _ := gocron.NewScheduler(gocron.WithDistributedLocker(jobs))
//	...
//	_ = s.Shutdown()       // waits for running jobs
//	_ = jobs.Drain(ctx)    // waits out the minimum holds (up to 30 s here)
//	_ = locker.Close()
//
// or, with an election:
//
//	e, _ := gocronpglocks.NewElector(locker, pglocks.Name("billing:scheduler"))
//	s, _ := gocron.NewScheduler(gocron.WithDistributedElector(e))
//	...
//	_ = s.Shutdown()
//	_ = e.Close()          // resigns: the next replica is elected at once
//	_ = locker.Close()
//
// # What is guaranteed
//
// With the Locker, no two replicas run the same job at the same time while
// its lock is held: from Lock until the job returns, or until the lock is
// lost (its server session ended: the job is not told, since gocron gives
// it no handle on its lock; pglocks logs the loss, see [pglocks.WithLogger],
// and a tracer sees it with the job's name as its [pglocks.Label]). A job
// runs once per tick when its runs are shorter than its period and the
// minimum hold is longer than the largest difference between the replicas'
// clocks (plus the scheduling delay of the slowest replica) and shorter than
// the period minus that difference. Taking the lock is bounded
// ([WithLockTimeout]), so that a replica slow to reach the server does not
// take a lock that a faster replica has already used for the same tick. A
// replica that cannot reach the server skips the run (gocron calls the
// job's AfterLockError listener with the error): no replica runs a job it
// could not lock.
//
// With the Elector, only the replica that leads runs jobs. A replica learns
// it has lost the leadership within the bound that [pglocks.Locker.Lead]
// documents: at once when the server ends its session, within the heartbeat
// bound ([pglocks.WithHeartbeat]) when it is cut off. A leader handover
// between the moments two replicas' clocks reach the same tick can run that
// tick twice, on the old and on the new leader, when the new leader's clock
// is behind; [WithTakeoverDelay] longer than the clocks' difference prevents
// it, at the cost of ticks missed during the handover. gocron does not show
// why a replica is not the leader; [Elector.Err] does.
package gocronpglocks

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-co-op/gocron/v2"

	"github.com/pglocks/pglocks"
)

// maxHold is the longest minimum hold pglocks accepts (2^31-1 ms).
const maxHold = math.MaxInt32 * time.Millisecond

// ErrNotLeader is what [Elector.IsLeader] returns on a replica that does not
// lead: gocron then skips the job there.
var ErrNotLeader = errors.New("gocronpglocks: this replica does not lead")

// Locker is a gocron.Locker backed by a [pglocks.Locker]. It is safe for
// concurrent use by any number of schedulers and jobs.
type Locker struct {
	locker      *pglocks.Locker
	minHold     time.Duration
	lockTimeout time.Duration
	key         func(job string) pglocks.Key

	mu      sync.Mutex
	held    int           // job locks taken and not yet unlocked
	until   time.Time     // when the last minimum hold taken runs out, at the latest
	changed chan struct{} // closed (and replaced) when held drops
}

var _ gocron.Locker = (*Locker)(nil)

// A LockerOption configures a [Locker].
type LockerOption func(*Locker)

// WithKey sets how a job's name (gocron's lock key: the job's name, which
// defaults to its function's name) becomes the advisory lock's key. The
// default is [JobKey]. fn must return a valid key for every name, and the
// same key on every replica. Jobs that share a name share a lock: name each
// job (gocron.WithName) when several run the same function.
func WithKey(fn func(job string) pglocks.Key) LockerOption {
	return func(lk *Locker) { lk.key = fn }
}

// WithLockTimeout bounds how long taking a job's lock may take, from the
// moment gocron asks (waiting for a connection of the pool, and the round
// trip). A lock granted later than another replica's minimum hold could run
// a tick that replica already ran; when the bound is up the run is skipped
// here instead. The default is half the minimum hold, or no bound but the
// job's context without one. d must not be negative; zero means the default.
func WithLockTimeout(d time.Duration) LockerOption {
	return func(lk *Locker) { lk.lockTimeout = d }
}

// JobKey is the key a [Locker] takes for job by default:
// pglocks.Name("gocron:" + job), so that another process takes the same lock
// with
//
//	pglocks run gocron:nightly-report -- ...
//	SELECT pg_advisory_lock(hashtextextended('gocron:nightly-report', 0));
//
// and a job's lock is not mistaken for one the application takes for
// something else of the same name.
func JobKey(job string) pglocks.Key { return pglocks.Name("gocron:" + job) }

// NewLocker returns a gocron.Locker that takes each job run's lock from l,
// without waiting, and keeps it until at least minHold after it was taken
// (zero: until the job returns). minHold should be longer than the
// difference between the replicas' clocks and shorter than the period of
// the jobs it serves minus that difference; for jobs of very different
// periods, give each its own Locker with gocron.WithDistributedJobLocker.
//
// Closing l releases every lock at once: the lock of a job still running,
// and the rest of a minimum hold, which would let a replica whose clock is
// behind run the same tick again. Shut down in this order: the scheduler
// (gocron's Shutdown waits for running jobs, up to its stop timeout), then
// [Locker.Drain], then l.
func NewLocker(l *pglocks.Locker, minHold time.Duration, opts ...LockerOption) (*Locker, error) {
	if l == nil {
		return nil, errors.New("gocronpglocks: NewLocker: nil *pglocks.Locker")
	}
	if minHold < 0 || minHold > maxHold {
		return nil, fmt.Errorf("gocronpglocks: NewLocker: minimum hold %v is not in 0..%v", minHold, maxHold)
	}
	lk := &Locker{locker: l, minHold: minHold, key: JobKey, changed: make(chan struct{})}
	for _, o := range opts {
		o(lk)
	}
	switch {
	case lk.key == nil:
		return nil, errors.New("gocronpglocks: NewLocker: WithKey(nil)")
	case lk.lockTimeout < 0:
		return nil, fmt.Errorf("gocronpglocks: NewLocker: negative lock timeout %v", lk.lockTimeout)
	case lk.lockTimeout == 0:
		lk.lockTimeout = minHold / 2
	}
	return lk, nil
}

// Lock takes job's lock if it can be had at once. Otherwise it returns an
// error matching [pglocks.ErrLocked] (another replica runs this tick), or the
// error that kept it from asking the server in time; gocron then skips the
// run on this replica, and passes the error to the job's AfterLockError
// listener.
func (lk *Locker) Lock(ctx context.Context, job string) (gocron.Lock, error) {
	if lk.lockTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, lk.lockTimeout)
		defer cancel()
	}
	opts := []pglocks.LockOption{pglocks.Label(job)}
	if lk.minHold > 0 {
		opts = append(opts, pglocks.MinHold(lk.minHold))
	}
	l, err := lk.locker.TryLock(ctx, lk.key(job), opts...)
	if err != nil {
		return nil, fmt.Errorf("gocronpglocks: job %q: %w", job, err)
	}
	lk.mu.Lock()
	lk.held++
	if lk.minHold > 0 {
		// pglocks counts the hold from the grant, which was before now.
		if until := time.Now().Add(lk.minHold); until.After(lk.until) {
			lk.until = until
		}
	}
	lk.mu.Unlock()
	return &jobLock{lk: lk, l: l}, nil
}

// unlocked counts a job lock let go.
func (lk *Locker) unlocked() {
	lk.mu.Lock()
	lk.held--
	close(lk.changed)
	lk.changed = make(chan struct{})
	lk.mu.Unlock()
}

// Drain waits until every job lock this Locker has taken is unlocked (its
// job returned) and every minimum hold has run out, or until ctx is done,
// and then returns ctx's error. Call it after the scheduler's Shutdown and
// before closing the pglocks.Locker, which would otherwise release them
// early. A job that outlived gocron's stop timeout is waited for, as ctx
// allows. A replica's shutdown can so take up to the minimum hold: give it
// that long (a container's grace period) or accept that a replica whose
// clock is behind may run the last tick again.
func (lk *Locker) Drain(ctx context.Context) error {
	for {
		lk.mu.Lock()
		held, wait, changed := lk.held, time.Until(lk.until), lk.changed
		lk.mu.Unlock()
		if held == 0 && wait <= 0 {
			return nil
		}
		var timeout <-chan time.Time
		var t *time.Timer
		if held == 0 {
			t = time.NewTimer(wait)
			timeout = t.C
		}
		select {
		case <-changed:
		case <-timeout:
		case <-ctx.Done():
		}
		if t != nil {
			t.Stop()
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// jobLock is one run's lock.
type jobLock struct {
	lk   *Locker
	l    *pglocks.Lock
	once sync.Once
}

// Unlock releases the lock, or hands it to the minimum hold: it returns at
// once, and pglocks lets the lock go when the hold is up. It runs to the end
// even when ctx is done (gocron passes the job's context, which its
// shutdown cancels). It returns the loss error for a lock that was lost
// during the run (which gocron ignores).
func (j *jobLock) Unlock(ctx context.Context) error {
	err := j.l.Release(ctx)
	j.once.Do(j.lk.unlocked)
	return err
}

// Elector is a gocron.Elector backed by [pglocks.Locker.Lead]: from
// [NewElector] until [Elector.Close], it campaigns for one key; while it
// leads, [Elector.IsLeader] returns nil and gocron runs the jobs here.
type Elector struct {
	key    pglocks.Key
	delay  time.Duration
	cancel context.CancelFunc
	done   chan struct{}
	term   atomic.Pointer[context.Context] // fn's ctx while this replica leads

	mu  sync.Mutex
	err error // why the last campaign failed, until the next term begins
}

var _ gocron.Elector = (*Elector)(nil)

// An ElectorOption configures an [Elector].
type ElectorOption func(*Elector)

// WithTakeoverDelay makes a newly elected replica wait d after its election
// before it runs jobs. With d longer than the largest difference between
// the replicas' clocks (and than the overlap of an old leader that has not
// yet learnt of its loss: milliseconds with pgx when the server ends its
// session, the heartbeat bound when it is cut off), a tick that the old
// leader ran on its own clock is not run again by a new leader whose clock
// reaches it later; ticks that fall in the delay are skipped by everyone.
// The default is zero.
func WithTakeoverDelay(d time.Duration) ElectorOption {
	return func(e *Elector) { e.delay = d }
}

// campaignRetry is how long an Elector waits before it campaigns again after
// Lead gave up (a standby, a transaction-pooling proxy), at first and at
// most: a failover or a configuration fix may cure it.
const (
	campaignRetry    = time.Second
	campaignRetryMax = 30 * time.Second
)

// NewElector starts campaigning for key with l, in the background, and
// returns the gocron.Elector that says whether this replica leads. Every
// replica must use the same key. Close stops the campaign and resigns; do
// it after the scheduler's Shutdown and before l's Close.
func NewElector(l *pglocks.Locker, key pglocks.Key, opts ...ElectorOption) (*Elector, error) {
	if l == nil {
		return nil, errors.New("gocronpglocks: NewElector: nil *pglocks.Locker")
	}
	if _, ok := key.Int64(); !ok {
		if _, _, ok := key.Int32s(); !ok {
			return nil, fmt.Errorf("gocronpglocks: NewElector: %w", pglocks.ErrInvalidKey)
		}
	}
	e := &Elector{key: key, done: make(chan struct{})}
	for _, o := range opts {
		o(e)
	}
	if e.delay < 0 {
		return nil, fmt.Errorf("gocronpglocks: NewElector: negative takeover delay %v", e.delay)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	go e.campaign(ctx, l)
	return e, nil
}

// campaign runs Lead until ctx ends or l is closed. Lead retries failures
// that campaigning again may cure by itself; after those it gives up on
// (the server is a standby, a transaction-pooling proxy is in the way),
// campaign keeps trying, less and less often, since a failover or a fixed
// setting cures them too; Err says why meanwhile.
func (e *Elector) campaign(ctx context.Context, l *pglocks.Locker) {
	defer close(e.done)
	pause := campaignRetry
	for {
		err := l.Lead(ctx, e.key, e.lead)
		if ctx.Err() != nil {
			return
		}
		e.setErr(err)
		if errors.Is(err, pglocks.ErrClosed) {
			return
		}
		t := time.NewTimer(pause)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
		pause = min(2*pause, campaignRetryMax)
	}
}

// lead is Lead's fn: one term of leadership.
func (e *Elector) lead(ctx context.Context) error {
	e.setErr(nil)
	if e.delay > 0 {
		t := time.NewTimer(e.delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil
		}
	}
	e.term.Store(&ctx)
	<-ctx.Done()
	e.term.Store(nil)
	return nil
}

func (e *Elector) setErr(err error) {
	e.mu.Lock()
	e.err = err
	e.mu.Unlock()
}

// Err returns why this replica cannot campaign now (say, its pool reaches a
// standby, or the Locker was closed), or nil while it campaigns or leads.
// gocron does not show IsLeader's error, so a replica that never runs jobs
// can be asked here.
func (e *Elector) Err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// IsLeader returns nil while this replica leads: elected, the takeover delay
// over, and leadership not known to be lost. Otherwise it returns an error
// matching [ErrNotLeader], which says why when campaigning is failing or
// the Elector is closed.
func (e *Elector) IsLeader(context.Context) error {
	if t := e.term.Load(); t != nil && (*t).Err() == nil {
		return nil
	}
	select {
	case <-e.done:
		if err := e.Err(); err != nil {
			return fmt.Errorf("%w: campaigning stopped: %w", ErrNotLeader, err)
		}
		return fmt.Errorf("%w: the elector is closed", ErrNotLeader)
	default:
	}
	if err := e.Err(); err != nil {
		return fmt.Errorf("%w: campaigning fails: %w", ErrNotLeader, err)
	}
	return ErrNotLeader
}

// Close stops campaigning and, if this replica leads, resigns, so that the
// next replica is elected at once. It waits for both and returns nil; it
// may be called more than once.
func (e *Elector) Close() error {
	e.cancel()
	<-e.done
	return nil
}
