package pglocks_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks"
)

// recorder is a tracer that implements every tracer interface and writes
// down what it is told.
type recorder struct {
	mu       sync.Mutex
	starts   []pglocks.TraceAcquireStartData
	ends     []pglocks.TraceAcquireEndData
	releases []pglocks.TraceReleaseData
	losses   []pglocks.TraceLossData
	gained   []int64 // tokens
	lostLead []error
	lockers  []string // "new", "close"
	ctxOK    int      // release and loss hooks that got the start's ctx
}

type startKey struct{}

func (r *recorder) TraceAcquireStart(ctx context.Context, _ *pglocks.Locker, d pglocks.TraceAcquireStartData) context.Context {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.starts = append(r.starts, d)
	return context.WithValue(ctx, startKey{}, len(r.starts))
}

func (r *recorder) TraceAcquireEnd(ctx context.Context, _ *pglocks.Locker, d pglocks.TraceAcquireEndData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ctx.Value(startKey{}) != len(r.starts) && d.Outcome == pglocks.OutcomeAcquired {
		panic("TraceAcquireEnd without its start's ctx")
	}
	r.ends = append(r.ends, d)
}

func (r *recorder) TraceRelease(ctx context.Context, _ *pglocks.Locker, d pglocks.TraceReleaseData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ctx.Value(startKey{}) != nil {
		r.ctxOK++
	}
	r.releases = append(r.releases, d)
}

func (r *recorder) TraceLoss(ctx context.Context, _ *pglocks.Locker, d pglocks.TraceLossData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ctx.Value(startKey{}) != nil {
		r.ctxOK++
	}
	r.losses = append(r.losses, d)
}

func (r *recorder) TraceLeaderGained(_ context.Context, _ *pglocks.Locker, _ pglocks.Key, token int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.gained = append(r.gained, token)
}

func (r *recorder) TraceLeaderLost(_ context.Context, _ *pglocks.Locker, _ pglocks.Key, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lostLead = append(r.lostLead, err)
}

func (r *recorder) TraceLockerNew(*pglocks.Locker) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lockers = append(r.lockers, "new")
}

func (r *recorder) TraceLockerClose(*pglocks.Locker) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lockers = append(r.lockers, "close")
}

func (r *recorder) outcomes() []pglocks.Outcome {
	r.mu.Lock()
	defer r.mu.Unlock()
	var o []pglocks.Outcome
	for _, e := range r.ends {
		o = append(o, e.Outcome)
	}
	return o
}

// Stat counts what a Locker holds and waits for, and its totals, as the
// tracer sees the same acquisitions: held, ErrLocked, a timeout, a
// cancellation, a wait in the process, a loss, a leader's term.
func TestStatAndTracer(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		ctx := t.Context()
		rec, other := &recorder{}, &recorder{}
		l := e.locker(4, pglocks.WithTracer(rec))
		b := e.locker(4, pglocks.WithTracer(other))
		k0, k1, k2 := testKey(t, 0), testKey(t, 1), testKey(t, 2)

		if s := l.Stat(); s.HeldExclusive() != 0 || s.Acquisitions() != 0 {
			t.Fatalf("a new Locker's Stat: %+v", s)
		}
		lk0 := mustLock(t, l, k0, pglocks.Label("job"))
		s1 := mustLock(t, l, k1, pglocks.Shared())
		s2 := mustLock(t, l, k1, pglocks.Shared())
		s := l.Stat()
		if s.HeldExclusive() != 1 || s.HeldShared() != 1 || s.Acquisitions() != 3 {
			t.Errorf("held: exclusive %d shared %d acquisitions %d; want 1 1 3", s.HeldExclusive(), s.HeldShared(), s.Acquisitions())
		}
		if s.Sessions() < 1 || !s.HasPrimary() {
			t.Errorf("sessions %d primary %v", s.Sessions(), s.HasPrimary())
		}
		if rec.starts[0].Label != "job" || rec.starts[0].Keys[0] != k0 || !rec.starts[0].Wait || rec.starts[1].Shared != true {
			t.Errorf("starts: %+v", rec.starts)
		}

		// Another Locker: ErrLocked, a timeout, a cancellation.
		_, err := b.TryLock(ctx, k0)
		wantErr(t, err, pglocks.ErrLocked)
		tctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		_, err = b.Lock(tctx, k0)
		cancel()
		wantErr(t, err, context.DeadlineExceeded)
		cctx, cancel := context.WithCancel(ctx)
		waited := make(chan error)
		go func() {
			_, err := b.Lock(cctx, k0)
			waited <- err
		}()
		waitFor(t, 10*time.Second, "the wait to show in Stat", func() bool {
			s := b.Stat()
			return s.WaitingServer()+s.WaitingMultiplexed() == 1
		})
		cancel()
		wantErr(t, <-waited, context.Canceled)
		s = b.Stat()
		if s.Locked() != 1 || s.Timeouts() != 1 || s.Cancelled() != 1 || s.Acquisitions() != 0 {
			t.Errorf("b: locked %d timeouts %d cancelled %d acquisitions %d; want 1 1 1 0", s.Locked(), s.Timeouts(), s.Cancelled(), s.Acquisitions())
		}
		if s.WaitTime() < 300*time.Millisecond {
			t.Errorf("b waited %v in all, less than its timeout", s.WaitTime())
		}
		waitFor(t, 10*time.Second, "b's waits to end", func() bool {
			s := b.Stat()
			return s.WaitingServer()+s.WaitingMultiplexed() == 0
		})
		if got, want := other.outcomes(), []pglocks.Outcome{pglocks.OutcomeLocked, pglocks.OutcomeTimeout, pglocks.OutcomeCancelled}; !equal(got, want) {
			t.Errorf("b's tracer saw %v, want %v", got, want)
		}
		if other.starts[0].Wait || !other.starts[1].Wait {
			t.Errorf("try/wait: %+v", other.starts)
		}

		// A goroutine of l waits in the process for k0.
		inproc := make(chan *pglocks.Lock)
		go func() {
			lk, err := l.Lock(ctx, k0)
			if err != nil {
				t.Error(err)
			}
			inproc <- lk
		}()
		waitFor(t, 10*time.Second, "the in-process wait to show in Stat", func() bool { return l.Stat().WaitingInProcess() == 1 })
		time.Sleep(50 * time.Millisecond)
		mustRelease(t, lk0)
		lk0 = <-inproc
		if s := l.Stat(); s.WaitingInProcess() != 0 || s.HeldExclusive() != 1 || s.Acquisitions() != 4 {
			t.Errorf("after the hand-over: in process %d exclusive %d acquisitions %d", s.WaitingInProcess(), s.HeldExclusive(), s.Acquisitions())
		}
		if d := rec.ends[3].Took; d < 50*time.Millisecond {
			t.Errorf("the hand-over's wait was traced as %v", d)
		}
		rec.mu.Lock()
		rel := rec.releases[0]
		rec.mu.Unlock()
		if rel.Lock.Key() != k0 || rel.Held < 50*time.Millisecond || rel.Err != nil {
			t.Errorf("release traced as %+v", rel)
		}
		mustRelease(t, s1)
		mustRelease(t, s2)
		if s := l.Stat(); s.HeldShared() != 0 {
			t.Errorf("shared still held: %d", s.HeldShared())
		}

		// A loss: the session is terminated.
		var ok bool
		if err := srv.Admin.QueryRow(ctx, "SELECT pg_terminate_backend($1)", e.held(bigint(k0))[0]).Scan(&ok); err != nil || !ok {
			t.Fatalf("terminate: %v %v", ok, err)
		}
		<-lk0.Done()
		// Counted before Done closes; traced just after.
		if n := l.Stat().Losses(); n != 1 {
			t.Errorf("Stat().Losses() = %d once Done is closed, want 1", n)
		}
		waitFor(t, 10*time.Second, "the loss to be traced", func() bool {
			rec.mu.Lock()
			defer rec.mu.Unlock()
			return len(rec.losses) > 0
		})
		rec.mu.Lock()
		if len(rec.losses) != 1 || rec.losses[0].Lock != lk0 || !errors.Is(rec.losses[0].Cause, pglocks.ErrLockLost) {
			t.Errorf("losses traced: %+v", rec.losses)
		}
		rec.mu.Unlock()
		if s := l.Stat(); s.HeldExclusive() != 0 {
			t.Errorf("a lost lock is still counted held")
		}

		// A leader's term: gained, then ended by Lead's ctx.
		lctx, cancel := context.WithCancel(ctx)
		err = l.Lead(lctx, k2, func(context.Context) error {
			cancel()
			return nil
		})
		wantErr(t, err, context.Canceled)
		rec.mu.Lock()
		if len(rec.gained) != 1 || len(rec.lostLead) != 1 || !errors.Is(rec.lostLead[0], context.Canceled) {
			t.Errorf("leadership traced: gained %v lost %v", rec.gained, rec.lostLead)
		}
		if !rec.starts[len(rec.starts)-1].Lead {
			t.Error("Lead's campaign not marked Lead")
		}
		// Every release and loss got the ctx of its acquisition's start.
		if rec.ctxOK != len(rec.releases)+len(rec.losses) {
			t.Errorf("%d of %d release and loss hooks got the start's ctx", rec.ctxOK, len(rec.releases)+len(rec.losses))
		}
		rec.mu.Unlock()

		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		rec.mu.Lock()
		if !equal(rec.lockers, []string{"new", "close"}) {
			t.Errorf("Locker's life traced as %v", rec.lockers)
		}
		rec.mu.Unlock()
		if locks := e.locks(); len(locks) != 0 {
			t.Errorf("left: %v", locks)
		}
	})
}

// WithTracer refuses a value that implements no tracer interface.
func TestWithTracerInvalid(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		newLocker, closePool := e.drv.pool(t, e.dsn, 2)
		defer closePool()
		l, err := newLocker(pglocks.WithTracer(struct{}{}))
		if err == nil {
			_ = l.Close()
			t.Fatal("WithTracer(struct{}{}) was accepted")
		}
	})
}

func equal[T comparable](a, b []T) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Stat prints as one line that says what it counts (not raw nanoseconds
// under %+v), and an option's range says 24.8 days as the docs do.
func TestStatStringAndLimits(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4)
		lk := mustLock(t, l, testKey(t, 0))
		s := fmt.Sprintf("%+v", l.Stat())
		for _, want := range []string{"held 1 exclusive, 0 shared", "acquired 1,", "a primary", "wait time "} {
			if !strings.Contains(s, want) {
				t.Errorf("Stat prints %q, without %q", s, want)
			}
		}
		if strings.Contains(s, "\n") {
			t.Errorf("Stat prints more than one line: %q", s)
		}
		mustRelease(t, lk)
		_, err := l.Lock(t.Context(), testKey(t, 1), pglocks.MinHold(30*24*time.Hour))
		if err == nil || !strings.Contains(err.Error(), "24.8 days") {
			t.Errorf("MinHold(30 days): %v", err)
		}
	})
}
