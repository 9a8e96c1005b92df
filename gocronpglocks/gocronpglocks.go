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
//	_ = jobs.Drain(ctx)    // lets the minimum holds run out
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
// With the Locker, no two replicas run the same job at the same time, and a
// job runs once per tick when the minimum hold is longer than the largest
// difference between the replicas' clocks (plus the scheduling delay of the
// slowest replica) and shorter than the job's period minus that difference.
// A replica that cannot reach the server skips the run (gocron calls the
// job's AfterLockError listener with the error). A job's lock lost while
// it runs (its server session ended) is not reported to the job: gocron
// gives the job no handle on its lock; the Locker logs the loss (see
// [pglocks.WithLogger]).
//
// With the Elector, only the replica that leads runs jobs. A replica learns
// it has lost the leadership within the bound that [pglocks.Locker.Lead]
// documents: at once when the server ends its session, within the heartbeat
// bound ([pglocks.WithHeartbeat]) when it is cut off. A leader handover
// between the moments two replicas' clocks reach the same tick can run that
// tick twice, on the old and on the new leader, when the new leader's clock
// is behind; [WithTakeoverDelay] longer than the clocks' difference prevents
// it, at the cost of ticks missed during the handover.
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
	locker  *pglocks.Locker
	minHold time.Duration
	key     func(job string) pglocks.Key

	mu    sync.Mutex
	until time.Time // when the last minimum hold taken runs out, at the latest
}

var _ gocron.Locker = (*Locker)(nil)

// A LockerOption configures a [Locker].
type LockerOption func(*Locker)

// WithKey sets how a job's name (gocron's lock key: the job's name, which
// defaults to its function's name) becomes the advisory lock's key. The
// default is [JobKey]. fn must return a valid key for every name, and the
// same key on every replica.
func WithKey(fn func(job string) pglocks.Key) LockerOption {
	return func(lk *Locker) { lk.key = fn }
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
// the jobs it serves; for jobs of very different periods, give each its own
// Locker with gocron.WithDistributedJobLocker.
//
// Closing l ends the holds at once, and a replica that shuts down right
// after a run would let a replica whose clock is behind run the same tick
// again. Shut down in this order: the scheduler (gocron's Shutdown waits
// for running jobs), then [Locker.Drain], then l.
func NewLocker(l *pglocks.Locker, minHold time.Duration, opts ...LockerOption) (*Locker, error) {
	if l == nil {
		return nil, errors.New("gocronpglocks: NewLocker: nil *pglocks.Locker")
	}
	if minHold < 0 || minHold > maxHold {
		return nil, fmt.Errorf("gocronpglocks: NewLocker: minimum hold %v is not in 0..%v", minHold, maxHold)
	}
	lk := &Locker{locker: l, minHold: minHold, key: JobKey}
	for _, o := range opts {
		o(lk)
	}
	if lk.key == nil {
		return nil, errors.New("gocronpglocks: NewLocker: WithKey(nil)")
	}
	return lk, nil
}

// Lock takes job's lock if it can be had at once. Otherwise it returns an
// error matching [pglocks.ErrLocked] (another replica runs this tick), or the
// error that kept it from asking the server; gocron then skips the run on
// this replica.
func (lk *Locker) Lock(ctx context.Context, job string) (gocron.Lock, error) {
	opts := []pglocks.LockOption{pglocks.Label(job)}
	if lk.minHold > 0 {
		opts = append(opts, pglocks.MinHold(lk.minHold))
	}
	l, err := lk.locker.TryLock(ctx, lk.key(job), opts...)
	if err != nil {
		return nil, fmt.Errorf("gocronpglocks: job %q: %w", job, err)
	}
	if lk.minHold > 0 {
		// The hold runs from the grant, which was before now.
		until := time.Now().Add(lk.minHold)
		lk.mu.Lock()
		if until.After(lk.until) {
			lk.until = until
		}
		lk.mu.Unlock()
	}
	return jobLock{l}, nil
}

// Drain waits until the minimum hold of every lock this Locker has taken
// has run out (and so has been let go), or until ctx is done, and then
// returns ctx's error. Call it after the scheduler's Shutdown and before
// closing the pglocks.Locker, which would otherwise end the holds early.
// Without a minimum hold it returns at once.
func (lk *Locker) Drain(ctx context.Context) error {
	for {
		lk.mu.Lock()
		wait := time.Until(lk.until)
		lk.mu.Unlock()
		if wait <= 0 {
			return nil
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
}

// jobLock is one run's lock.
type jobLock struct{ l *pglocks.Lock }

// Unlock releases the lock, or hands it to the minimum hold: it returns at
// once, and the lock is let go when the hold is up. It runs to the end even
// when ctx is done (gocron passes the job's context, which its shutdown
// cancels). It returns the loss error for a lock that was lost during the
// run.
func (j jobLock) Unlock(ctx context.Context) error {
	return j.l.Release(context.WithoutCancel(ctx))
}

// Elector is a gocron.Elector backed by [pglocks.Locker.Lead]: from
// [NewElector] until [Elector.Close], it campaigns for one key; while it
// leads, [Elector.IsLeader] returns nil and gocron runs the jobs here.
type Elector struct {
	key     pglocks.Key
	delay   time.Duration
	cancel  context.CancelFunc
	done    chan struct{}
	leading atomic.Bool

	mu  sync.Mutex
	err error // why campaigning stopped before Close, if it did
}

var _ gocron.Elector = (*Elector)(nil)

// An ElectorOption configures an [Elector].
type ElectorOption func(*Elector)

// WithTakeoverDelay makes a newly elected replica wait d after its election
// before it runs jobs. With d longer than the largest difference between
// the replicas' clocks, a tick that the old leader ran on its own clock is
// not run again by a new leader whose clock reaches it later; ticks that
// fall in the delay are skipped by everyone. The default is zero.
func WithTakeoverDelay(d time.Duration) ElectorOption {
	return func(e *Elector) { e.delay = d }
}

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

// campaign runs Lead until ctx ends or Lead gives up for good.
func (e *Elector) campaign(ctx context.Context, l *pglocks.Locker) {
	defer close(e.done)
	err := l.Lead(ctx, e.key, func(ctx context.Context) error {
		if e.delay > 0 {
			t := time.NewTimer(e.delay)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return nil
			}
		}
		e.leading.Store(true)
		<-ctx.Done()
		e.leading.Store(false)
		return nil
	})
	if ctx.Err() == nil {
		e.mu.Lock()
		e.err = err
		e.mu.Unlock()
	}
}

// IsLeader returns nil while this replica leads. Otherwise it returns
// [ErrNotLeader], or, once campaigning has stopped for an error that
// campaigning again cannot cure (see [pglocks.Locker.Lead]) or after
// Close, an error that says why.
func (e *Elector) IsLeader(context.Context) error {
	if e.leading.Load() {
		return nil
	}
	select {
	case <-e.done:
	default:
		return ErrNotLeader
	}
	e.mu.Lock()
	err := e.err
	e.mu.Unlock()
	if err == nil {
		return fmt.Errorf("%w: the elector is closed", ErrNotLeader)
	}
	return fmt.Errorf("%w: campaigning stopped: %w", ErrNotLeader, err)
}

// Close stops campaigning and, if this replica leads, resigns, so that the
// next replica is elected at once. It waits for both and returns nil; it
// may be called more than once.
func (e *Elector) Close() error {
	e.cancel()
	<-e.done
	return nil
}
