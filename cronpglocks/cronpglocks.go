// Package cronpglocks runs the jobs of robfig/cron v3 schedulers on a fleet
// of replicas that share one PostgreSQL, with pglocks advisory locks
// deciding which replica runs each tick. Every replica schedules every job,
// each wrapped by a [Wrapper]: a run takes the job's lock with
// [pglocks.Locker.TryLock], and runs only on the replica that got it; the
// others skip that run. The lock is kept at least a minimum hold
// ([pglocks.MinHold]) after it was taken, however soon the job returns, so
// that a replica whose clock is behind, and which fires the same tick a
// little later, finds it still held.
//
// robfig/cron jobs have no names, and the lock needs one: it is given when
// a job is wrapped, with [Wrapper.Job], [Wrapper.Func], [Wrapper.FuncContext]
// or, in a cron.Chain, [Wrapper.Wrap]. Wrap every replica's jobs the same
// way, and shut down in the order shown, so that a replica going away does
// not cut a minimum hold short:
//
//	locker, _ := pglocks.New(pool)
//	jobs, _ := cronpglocks.New(locker, 30*time.Second) // jobs every minute or slower
//	c := cron.New()
//	_, _ = c.AddJob("0 3 * * *", jobs.Func("nightly-report", sendReport))
//	_, _ = c.AddJob("@hourly", cron.NewChain(jobs.Wrap("cleanup")).Then(cleanup))
//	c.Start()
//	...
//	<-c.Stop().Done()   // waits for running jobs
//	_ = jobs.Drain(ctx) // waits out the minimum holds (up to 30 s here)
//	_ = locker.Close()
//
// # What is guaranteed
//
// No two replicas run the same job at the same time while its lock is held:
// from the moment a run takes it until the job returns, or until the lock
// is lost (its server session ended). Runs of one job on one replica that
// overlap (a run longer than the period) are kept apart the same way: the
// later one is skipped. A job runs once per tick when its runs are shorter
// than its period and the minimum hold is longer than the largest
// difference between the replicas' clocks (plus the scheduling delay of the
// slowest replica) and shorter than the period minus that difference.
// Taking the lock is bounded ([WithLockTimeout]), so that a replica slow to
// reach the server does not take a lock that a faster replica has already
// used for the same tick. A replica that cannot reach the server skips the
// run, and says why to the [WithLogger] logger: no replica runs a job it
// could not lock.
//
// # What is not
//
// That a tick runs at all: a tick is skipped everywhere when no replica can
// reach the server in time, or when the replica that took the lock stops
// before running the job. That a job whose lock is lost stops: robfig/cron
// jobs take no context, so a job wrapped with [Wrapper.Job] or
// [Wrapper.Func] runs on; pglocks logs the loss ([pglocks.WithLogger]), a
// tracer sees it with the job's name as its [pglocks.Label], and the
// [WithLogger] logger is told when the job returns. A job wrapped with
// [Wrapper.FuncContext] is told: its context is cancelled, with the loss as
// its cause. Either way another replica may take the lock and run the job
// while the first has not yet stopped. That ticks are not run twice when
// the minimum hold is shorter than the clocks' difference, or when a
// replica's pglocks.Locker is closed before [Wrapper.Drain] returns.
package cronpglocks

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/robfig/cron/v3"

	"github.com/pglocks/pglocks"
)

// maxHold is the longest minimum hold pglocks accepts (2^31-1 ms).
const maxHold = math.MaxInt32 * time.Millisecond

// Wrapper wraps robfig/cron jobs so that each run takes the job's lock from
// a [pglocks.Locker], and runs only if it got it. It is safe for concurrent
// use by any number of cron.Cron schedulers and jobs.
type Wrapper struct {
	locker      *pglocks.Locker
	minHold     time.Duration
	lockTimeout time.Duration
	key         func(job string) pglocks.Key
	logger      cron.Logger
	base        context.Context

	mu      sync.Mutex
	held    int           // job locks taken and not yet released
	until   time.Time     // when the last minimum hold taken runs out, at the latest
	changed chan struct{} // closed (and replaced) when held drops
}

// An Option configures a [Wrapper].
type Option func(*Wrapper)

// WithKey sets how a job's name becomes the advisory lock's key. The
// default is [JobKey]. fn must return a valid key for every name, and the
// same key on every replica. Jobs that share a name share a lock.
func WithKey(fn func(job string) pglocks.Key) Option {
	return func(w *Wrapper) { w.key = fn }
}

// WithLockTimeout bounds how long taking a job's lock may take, from the
// moment the job fires (waiting for a connection of the pool, and the round
// trip). A lock granted later than another replica's minimum hold could run
// a tick that replica already ran; when the bound is up the run is skipped
// here instead. The default is half the minimum hold, or no bound but the
// base context ([WithBaseContext]) without one. d must not be negative;
// zero means the default.
func WithLockTimeout(d time.Duration) Option {
	return func(w *Wrapper) { w.lockTimeout = d }
}

// WithLogger sets where the Wrapper says why a run was skipped or did not
// hold its lock to the end. A run skipped because another replica holds the
// lock (the error matches [pglocks.ErrLocked]), or because the base context
// is done, is logged with Info("skip", "job", name, "error", err): that is
// what every replica but one does on every tick. A run skipped for any
// other reason (the server unreachable, the lock timeout up) is logged with
// Error(err, "skip", "job", name), and a run whose lock was lost, or
// released early by the Locker's Close, with Error(err, "lock lost", "job",
// name) or Error(err, "release", "job", name) once the job has returned. The
// default is cron.DefaultLogger, which logs errors only, to standard
// output, as cron.Cron does by default. logger must not be nil; pass
// cron.DiscardLogger for silence.
func WithLogger(logger cron.Logger) Option {
	return func(w *Wrapper) { w.logger = logger }
}

// WithBaseContext sets the context that runs are bounded by: once ctx is
// done, runs are skipped, and the contexts of [Wrapper.FuncContext] jobs
// still running are cancelled, so that stopping a replica (ctx cancelled,
// then the scheduler's Stop) need not wait for them to finish. Values of
// ctx reach the jobs' contexts and pglocks' tracers. The default is
// context.Background(). ctx must not be nil.
func WithBaseContext(ctx context.Context) Option {
	return func(w *Wrapper) { w.base = ctx }
}

// JobKey is the key a [Wrapper] takes for job by default:
// pglocks.Name("cron:" + job), so that another process takes the same lock
// with
//
//	pglocks run cron:nightly-report -- ...
//	SELECT pg_advisory_lock(hashtextextended('cron:nightly-report', 0));
//
// and a job's lock is not mistaken for one the application takes for
// something else of the same name.
func JobKey(job string) pglocks.Key { return pglocks.Name("cron:" + job) }

// New returns a Wrapper that takes each job run's lock from l, without
// waiting, and keeps it until at least minHold after it was taken (zero:
// until the job returns). minHold should be longer than the difference
// between the replicas' clocks and shorter than the period of the jobs it
// serves minus that difference; for jobs of very different periods, give
// each its own Wrapper.
//
// Closing l releases every lock at once: the lock of a job still running,
// and the rest of a minimum hold, which would let a replica whose clock is
// behind run the same tick again. Shut down in this order: the scheduler
// (wait for the context cron.Cron's Stop returns: it is done when the
// running jobs have returned), then [Wrapper.Drain], then l.
func New(l *pglocks.Locker, minHold time.Duration, opts ...Option) (*Wrapper, error) {
	if l == nil {
		return nil, errors.New("cronpglocks: New: nil *pglocks.Locker")
	}
	if minHold < 0 || minHold > maxHold {
		return nil, fmt.Errorf("cronpglocks: New: minimum hold %v is not in 0..%v", minHold, maxHold)
	}
	w := &Wrapper{
		locker:  l,
		minHold: minHold,
		key:     JobKey,
		logger:  cron.DefaultLogger,
		base:    context.Background(),
		changed: make(chan struct{}),
	}
	for _, o := range opts {
		o(w)
	}
	switch {
	case w.key == nil:
		return nil, errors.New("cronpglocks: New: WithKey(nil)")
	case w.logger == nil:
		return nil, errors.New("cronpglocks: New: WithLogger(nil): pass cron.DiscardLogger for silence")
	case w.base == nil:
		return nil, errors.New("cronpglocks: New: WithBaseContext(nil)")
	case w.lockTimeout < 0:
		return nil, fmt.Errorf("cronpglocks: New: negative lock timeout %v", w.lockTimeout)
	case w.lockTimeout == 0:
		w.lockTimeout = minHold / 2
	}
	return w, nil
}

// Job returns a cron.Job that runs job only where job's lock (the key for
// name) can be had at once, and holds it while job runs and for the rest of
// the minimum hold. job is not told if the lock is lost while it runs; see
// [Wrapper.FuncContext] for a job that is.
//
// Job panics if job is nil, if name is empty, or if the key for name is
// not valid: mistakes of the program, found as it sets up its schedule,
// rather than at every tick.
func (w *Wrapper) Job(name string, job cron.Job) cron.Job {
	if job == nil {
		panic(fmt.Sprintf("cronpglocks: Job(%q): nil job", name))
	}
	return w.newJob("Job", name, job.Run, nil)
}

// Func is [Wrapper.Job] for a function: cron.FuncJob(fn), wrapped. It
// panics if fn is nil, and as Job does.
func (w *Wrapper) Func(name string, fn func()) cron.Job {
	if fn == nil {
		panic(fmt.Sprintf("cronpglocks: Func(%q): nil func", name))
	}
	return w.newJob("Func", name, fn, nil)
}

// FuncContext is [Wrapper.Func] for a function that takes a context, which
// is cancelled, with the loss error (matching [pglocks.ErrLockLost]) as its
// cause, if the lock is lost while fn runs, or when the base context
// ([WithBaseContext]) is done; it is the lock's own signal, so fn can stop
// before another replica takes the lock and runs the job too. It panics if
// fn is nil, and as Job does.
func (w *Wrapper) FuncContext(name string, fn func(ctx context.Context)) cron.Job {
	if fn == nil {
		panic(fmt.Sprintf("cronpglocks: FuncContext(%q): nil func", name))
	}
	return w.newJob("FuncContext", name, nil, fn)
}

// Wrap returns a cron.JobWrapper that wraps a job as [Wrapper.Job] does,
// for a cron.Chain: every job it wraps takes the lock for name, so give
// each job a Wrap of its own. Put cron.Recover before it in the chain (the
// lock is released when the job panics, and the panic goes on), and
// cron.SkipIfStillRunning or cron.DelayIfStillRunning, if used, after it.
// It panics at once if the key for name is not valid, as Job does.
func (w *Wrapper) Wrap(name string) cron.JobWrapper {
	w.jobKey("Wrap", name)
	return func(job cron.Job) cron.Job { return w.Job(name, job) }
}

// jobKey returns the key for name, or panics as Job documents.
func (w *Wrapper) jobKey(method, name string) pglocks.Key {
	if name == "" {
		panic(fmt.Sprintf("cronpglocks: %s: empty job name", method))
	}
	k := w.key(name)
	if _, ok := k.Int64(); !ok {
		if _, _, ok := k.Int32s(); !ok {
			panic(fmt.Sprintf("cronpglocks: %s(%q): the key function returned %v", method, name, pglocks.ErrInvalidKey))
		}
	}
	return k
}

func (w *Wrapper) newJob(method, name string, fn func(), fnCtx func(ctx context.Context)) *job {
	j := &job{w: w, name: name, key: w.jobKey(method, name), fn: fn, fnCtx: fnCtx}
	j.opts = []pglocks.LockOption{pglocks.Label(name)}
	if w.minHold > 0 {
		j.opts = append(j.opts, pglocks.MinHold(w.minHold))
	}
	return j
}

// job is a wrapped job; one of fn and fnCtx is set.
type job struct {
	w     *Wrapper
	name  string
	key   pglocks.Key
	opts  []pglocks.LockOption
	fn    func()
	fnCtx func(ctx context.Context)
}

// Run runs the job if its lock can be had, and releases it (or hands it to
// the minimum hold) when the job returns or panics.
func (j *job) Run() {
	lk := j.w.lock(j.name, j.key, j.opts)
	if lk == nil {
		return
	}
	defer j.w.release(j.name, lk)
	if j.fnCtx == nil {
		j.fn()
		return
	}
	ctx, cancel := context.WithCancelCause(j.w.base)
	ran, watched := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case <-lk.Done():
			cancel(lk.Err())
		case <-ran:
		}
	}()
	defer func() {
		close(ran)
		<-watched
		cancel(nil)
	}()
	j.fnCtx(ctx)
}

// lock takes key for a run of job name, or returns nil, having logged why
// not.
func (w *Wrapper) lock(name string, key pglocks.Key, opts []pglocks.LockOption) *pglocks.Lock {
	ctx := w.base
	if w.lockTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, w.lockTimeout)
		defer cancel()
	}
	lk, err := w.locker.TryLock(ctx, key, opts...)
	if err != nil {
		err = fmt.Errorf("cronpglocks: job %q: %w", name, err)
		if errors.Is(err, pglocks.ErrLocked) || w.base.Err() != nil {
			w.logger.Info("skip", "job", name, "error", err)
		} else {
			w.logger.Error(err, "skip", "job", name)
		}
		return nil
	}
	w.mu.Lock()
	w.held++
	if w.minHold > 0 {
		// pglocks counts the hold from the grant, which was before now.
		if until := time.Now().Add(w.minHold); until.After(w.until) {
			w.until = until
		}
	}
	w.mu.Unlock()
	return lk
}

// release releases a run's lock, or hands it to the minimum hold, counts it
// let go, and logs a loss.
func (w *Wrapper) release(name string, lk *pglocks.Lock) {
	// Release runs to the end whatever its ctx; it only passes values on.
	err := lk.Release(context.WithoutCancel(w.base))
	w.mu.Lock()
	w.held--
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
	if err == nil {
		return
	}
	err = fmt.Errorf("cronpglocks: job %q: %w", name, err)
	if errors.Is(err, pglocks.ErrLockLost) {
		w.logger.Error(err, "lock lost", "job", name)
	} else {
		w.logger.Error(err, "release", "job", name)
	}
}

// Drain waits until every job lock this Wrapper has taken is released (its
// job returned) and every minimum hold has run out, or until ctx is done,
// and then returns ctx's error. Call it after the scheduler has stopped
// and its running jobs have returned (<-c.Stop().Done()), and before
// closing the pglocks.Locker, which would otherwise release them early. A
// replica's shutdown can so take up to the minimum hold: give it that long
// (a container's grace period) or accept that a replica whose clock is
// behind may run the last tick again.
func (w *Wrapper) Drain(ctx context.Context) error {
	for {
		w.mu.Lock()
		held, wait, changed := w.held, time.Until(w.until), w.changed
		w.mu.Unlock()
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
