// Package riverpglocks runs River jobs (github.com/riverqueue/river v0.51)
// under pglocks advisory locks: a worker middleware that works a job only
// while this process holds a key derived from the job, so that jobs of one
// key never run at the same time anywhere in the fleet, or at most n of them
// with [Slots](n).
//
// River works every job it fetches; it has no notion of two jobs that must
// not overlap. [Middleware] adds it: before the worker runs, it takes the
// job's key with [pglocks.Locker.TryLock] (no waiting, so that a worker slot
// is never spent waiting for a lock), runs the worker with a context that is
// cancelled if the lock is lost, and releases the key when the worker
// returns. A job whose key is held elsewhere is snoozed ([river.JobSnooze]),
// not failed, and comes back after the snooze to try again:
//
//	locker, _ := pglocks.New(pool) // one per process, on River's pool or another
//	exports, _ := riverpglocks.New(locker, riverpglocks.Slots(2))
//	client, _ := river.NewClient(riverpgxv5.New(pool), &river.Config{
//		Queues:     map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 100}},
//		Workers:    workers,
//		Middleware: []rivertype.Middleware{exports}, // or per worker: Worker.Middleware
//	})
//	...
//	_ = client.Stop(ctx) // waits for running jobs, which release their keys
//	_ = locker.Close()
//
// Installed in river.Config.Middleware it locks every job the client works;
// to lock only some kinds, return it from those workers' Middleware method
// instead (see [New]).
//
// # What is guaranteed
//
//   - Exclusion: among clients whose middlewares agree on a job's key (and on
//     n), no two jobs of one key are worked at the same time, from the grant
//     until the worker returns or the lock is lost; with [Slots](n), at most
//     n. That holds across processes, across the clients of one process
//     (a Locker's goroutines exclude each other), and for a job that River's
//     rescuer sets running again while a stuck run of it still works.
//   - A held key snoozes, and snoozes do not count as attempts. River
//     v0.51 writes a snoozed job back with attempt set to the value it had
//     before it was fetched, leaves max_attempts and errors alone, and counts
//     the snooze in the job's metadata ("snoozes"): a job may wait for its key
//     any number of times without being discarded. The worker does not run,
//     nor do River's WorkBegin and WorkEnd hooks, nor the job's timeout.
//   - A lost lock cancels the job. If the lock's server session ends while
//     the worker runs (see [pglocks.Lock.Done] for how soon that is known),
//     the job's context is cancelled with the loss as its cause
//     (context.Cause matches [pglocks.ErrLockLost]), and the job's error
//     matches pglocks.ErrLockLost, joined with the worker's own: River counts
//     it as a failed attempt, records it in the job's errors and retries it by
//     its retry policy, or discards it if that was its last attempt (an
//     ErrorHandler may look for ErrLockLost and decide otherwise).
//   - A success is reported only once exclusion is proven. The key is released
//     when the worker returns, and the middleware waits for the server's
//     answer ([pglocks.Lock.Release]). If it says the lock was lost before then,
//     a worker that returned nil is reported as failed with the loss, since
//     another job of the key may have run beside it: River retries it (an
//     attempt counted). A worker's own error, snooze or cancel passes through
//     unchanged when the lock held throughout.
//   - Nothing is left held: the key is released when the worker returns or
//     panics, and a failed try leaves nothing on the server.
//
// # What is not guaranteed
//
//   - Order: waiting jobs of one key are not served first come, first
//     served. Each snoozed job tries again after its snooze; whichever is
//     fetched first once the key is free gets it. A job's priority and
//     scheduled_at still order the fetches.
//   - Latency: a job waits its snooze (default 1 s, plus up to 500 ms of
//     jitter), then for a fetch, however soon the key frees. Each waiting job
//     costs a fetch, one lock try and one job update per snooze.
//   - Exactly once: River runs a job at least once, and a job reported failed
//     after a loss is run again even if its work was done. Guard what a job
//     writes with a fencing token ([pglocks.WithFencingTokens];
//     pglocks.FencingToken(ctx) in the worker) where a stale run must not
//     write, and make jobs idempotent, as River asks.
//   - A lock lives as long as its server session: when the session ends, the
//     server may give the key to another job before this one's context is
//     cancelled (milliseconds with pgx, up to the heartbeat bound for a silent
//     network), and a worker that ignores its context keeps running.
//   - The key is not insert-time uniqueness: River's UniqueOpts decide
//     whether a job is inserted; this middleware decides when it runs.
//   - With [Slots], a try can still, rarely, be told the key is held
//     though a slot is free, when as many goroutines of one Locker as there
//     are slots try them at once (pglocks' TryLock waits for its other
//     goroutines' tries a bounded number of times): such a job snoozes for
//     nothing (0.002-0.005 snoozes a job in the Slots(50) benchmark).
//   - Errors other than a held key (the server cannot be reached, the Locker
//     is closed, [pglocks.ErrTooManyLocks]) fail the attempt: no job runs
//     without its lock. Stop the River client before closing the Locker, and
//     give the Locker's [pglocks.WithMaxLocks] room for every worker slot.
package riverpglocks

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglocks/pglocks"
)

// The defaults of [WithSnooze].
const (
	DefaultSnooze       = time.Second
	DefaultSnoozeJitter = 500 * time.Millisecond
)

// A KeyFunc returns the key that a job must hold while it is worked. It must
// return the same key for a job on every client, and may be called
// concurrently. An error fails the job's attempt (River retries it), without
// working it.
type KeyFunc func(job *rivertype.JobRow) (pglocks.Key, error)

// KindKey is the default [KeyFunc]: every job of a kind takes the same key,
// pglocks.Name("river:" + kind), so that another process takes that lock with
//
//	pglocks run river:nightly_report -- ...
//	SELECT pg_advisory_lock(hashtextextended('river:nightly_report', 0));
//
// It never fails.
func KindKey(job *rivertype.JobRow) (pglocks.Key, error) {
	return pglocks.Name("river:" + job.Kind), nil
}

// ArgsKey returns a [KeyFunc] for the jobs of T's kind that keys each job by
// its kind and a string fn makes of its args, pglocks.Name("river:" + kind +
// ":" + fn(args)): jobs for one customer, say, exclude each other, and jobs
// for different customers run side by side. It decodes each job's args into
// a T (as River does) before calling fn, and fails a job whose args do not
// decode or whose kind is not T's. Install it on T's worker (its Middleware
// method), not on the whole client. ArgsKey(nil) is nil, which [WithKey]
// refuses.
func ArgsKey[T river.JobArgs](fn func(args T) string) KeyFunc {
	if fn == nil {
		return nil
	}
	var zero T
	kind := zero.Kind()
	return func(job *rivertype.JobRow) (pglocks.Key, error) {
		if job.Kind != kind {
			return pglocks.Key{}, fmt.Errorf("ArgsKey for kind %q given a job of kind %q", kind, job.Kind)
		}
		var args T
		if err := json.Unmarshal(job.EncodedArgs, &args); err != nil {
			return pglocks.Key{}, fmt.Errorf("decoding args: %w", err)
		}
		return pglocks.Name("river:" + kind + ":" + fn(args)), nil
	}
}

// Middleware is a River worker middleware (rivertype.WorkerMiddleware) that
// works each job only while holding the job's key; see the package
// documentation for what it guarantees. Make one with [New]; it is safe for
// concurrent use by any number of clients and jobs.
type Middleware struct {
	// MiddlewareDefaults makes it a rivertype.Middleware (IsMiddleware), and
	// a rivertype.Plugin.
	river.MiddlewareDefaults

	locker *pglocks.Locker
	cfg    config
}

var _ rivertype.WorkerMiddleware = (*Middleware)(nil)

// config is what the Options set.
type config struct {
	key    KeyFunc
	slots  int // 0: the key itself
	snooze time.Duration
	jitter time.Duration
	err    error // the first invalid option
}

func (c *config) fail(err error) {
	if c.err == nil {
		c.err = err
	}
}

// An Option configures a [Middleware]. An invalid one makes [New] fail with
// an error that says why.
type Option func(*config)

// WithKey sets how a job's key is made. The default is [KindKey]: one key per
// kind. fn must not be nil.
func WithKey(fn KeyFunc) Option {
	return func(c *config) {
		if fn == nil {
			c.fail(errors.New("WithKey(nil)"))
			return
		}
		c.key = fn
	}
}

// Slots lets n jobs of one key run at once, in the whole fleet, instead of
// one: each holds one of the key's n slots ([pglocks.Slots]). With [KindKey],
// that is "at most n jobs of this kind at a time". Every client must use the
// same n for a key. n is from 1 to [pglocks.MaxSlots]; the default, without
// Slots, is the key itself, held by one job at a time. (Slots(1) also runs
// one at a time, but on slot 0's key, [pglocks.Key.Slot](0), not the key
// itself.)
func Slots(n int) Option {
	return func(c *config) {
		if n < 1 || n > pglocks.MaxSlots {
			c.fail(fmt.Errorf("Slots(%d): n must be from 1 to %d", n, pglocks.MaxSlots))
			return
		}
		c.slots = n
	}
}

// WithSnooze sets how long a job whose key is held waits before it tries
// again: d plus a random duration in [0, jitter), so that jobs snoozed
// together do not all come back at once. The default is [DefaultSnooze] (1 s)
// plus up to [DefaultSnoozeJitter] (500 ms). d must be positive, jitter not
// negative. River makes a job snoozed for up to its scheduler interval (5 s)
// available at once, to be fetched when its time comes; a longer snooze waits
// for the leader's scheduler, and may come back up to 5 s later.
func WithSnooze(d, jitter time.Duration) Option {
	return func(c *config) {
		if d <= 0 || jitter < 0 {
			c.fail(fmt.Errorf("WithSnooze(%v, %v): d must be positive and jitter not negative", d, jitter))
			return
		}
		c.snooze, c.jitter = d, jitter
	}
}

// New returns a Middleware that takes jobs' keys with l. Install it on a
// River client (river.Config.Middleware) to lock every job that client
// works, or return it from a worker's Middleware method to lock that
// worker's jobs only (several Middlewares, with different keys or slots, may
// share one Locker):
//
//	func (w *ExportWorker) Middleware(*rivertype.JobRow) []rivertype.WorkerMiddleware {
//		return []rivertype.WorkerMiddleware{w.exports}
//	}
//
// Every client that works the same jobs must use the same key function and
// [Slots]. Stop the River clients (Client.Stop waits for running jobs)
// before closing l, which would release the keys of jobs still running.
func New(l *pglocks.Locker, opts ...Option) (*Middleware, error) {
	if l == nil {
		return nil, errors.New("riverpglocks: New: nil *pglocks.Locker")
	}
	cfg := config{key: KindKey, snooze: DefaultSnooze, jitter: DefaultSnoozeJitter}
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("riverpglocks: New: nil Option")
		}
		o(&cfg)
	}
	if cfg.err != nil {
		return nil, fmt.Errorf("riverpglocks: New: %w", cfg.err)
	}
	return &Middleware{locker: l, cfg: cfg}, nil
}

// Work works job through doInner (the rest of River's middleware, and the
// worker) while holding the job's key:
//
//   - The key is taken with [pglocks.Locker.TryLock], labelled with the job's
//     kind ([pglocks.Label]) for tracers. If it is held, Work returns
//     river.JobSnooze (the snooze [WithSnooze] sets) without calling doInner:
//     River then makes the job available again after the snooze, its attempt
//     not counted.
//   - doInner's ctx is cancelled, with the loss as its cause, if the lock is
//     lost meanwhile; it carries the lock for pglocks.FencingToken.
//   - When doInner returns (or panics), the key is released, and Work waits
//     for the server's answer. It returns doInner's error; joined with the
//     loss error (matching [pglocks.ErrLockLost]) if the lock was lost before
//     the release, even when doInner returned nil.
//
// Any other failure to take the key (the key function's error, the server
// unreachable, the Locker closed) is returned as the attempt's error, and
// doInner is not called.
func (m *Middleware) Work(ctx context.Context, job *rivertype.JobRow, doInner func(ctx context.Context) error) error {
	key, err := m.cfg.key(job)
	if err != nil {
		return fmt.Errorf("riverpglocks: job %d (%s): key: %w", job.ID, job.Kind, err)
	}
	opts := []pglocks.LockOption{pglocks.Label(job.Kind)}
	if m.cfg.slots > 0 {
		opts = append(opts, pglocks.Slots(m.cfg.slots))
	}
	ran := false
	err = m.locker.TryDo(ctx, key, func(ctx context.Context) error {
		ran = true
		return doInner(ctx)
	}, opts...)
	switch {
	case ran:
		return err // doInner's, and the loss if the lock went before Release
	case errors.Is(err, pglocks.ErrLocked):
		return river.JobSnooze(m.snoozeFor())
	case err != nil:
		return fmt.Errorf("riverpglocks: job %d (%s): %w", job.ID, job.Kind, err)
	}
	return nil
}

// snoozeFor returns the next snooze: the snooze plus a random jitter.
func (m *Middleware) snoozeFor() time.Duration {
	if m.cfg.jitter <= 0 {
		return m.cfg.snooze
	}
	return m.cfg.snooze + rand.N(m.cfg.jitter)
}
