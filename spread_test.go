package pglocks_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks"
)

// TestSpreadTries checks that, under load from many goroutines, one Locker
// takes locks on more than one server session (up to WithMaxConns), and
// that spreading never breaks what ReleaseNoWait promises: a TryLock of the
// key just released by this Locker succeeds.
func TestSpreadTries(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(4, pglocks.WithMaxConns(4))
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()

		const workers = 6
		keys := make([]pglocks.Key, workers)
		for i := range keys {
			keys[i] = testKey(t, i)
		}
		var wg sync.WaitGroup
		errs := make(chan error, workers+1)
		for _, k := range keys {
			wg.Go(func() {
				for ctx.Err() == nil {
					lk, err := l.Lock(ctx, k)
					if err != nil {
						if ctx.Err() == nil {
							errs <- err
						}
						return
					}
					time.Sleep(time.Millisecond)
					if err := lk.Release(context.Background()); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		// Behind a posted unlock, a try must go after it, on its session.
		own := testKey(t, workers)
		tries := 0
		wg.Go(func() {
			for ctx.Err() == nil {
				lk, err := l.Lock(ctx, own)
				if err != nil {
					if ctx.Err() == nil {
						errs <- err
					}
					return
				}
				if err := lk.ReleaseNoWait(context.Background()); err != nil {
					errs <- err
					return
				}
				lk, err = l.TryLock(context.Background(), own)
				if err != nil {
					errs <- errors.Join(errors.New("TryLock after ReleaseNoWait"), err)
					return
				}
				tries++
				if err := lk.Release(context.Background()); err != nil {
					errs <- err
					return
				}
			}
		})

		// Wait until the server shows the workers' keys held by two
		// sessions at once.
		deadline := time.Now().Add(20 * time.Second)
		spread := false
		for !spread && time.Now().Before(deadline) && len(errs) == 0 {
			_, pids := e.heldKeys(keys...)
			spread = len(pids) >= 2
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if !spread {
			t.Fatalf("in 20 s the workers' locks were never held by more than one session")
		}
		if tries == 0 {
			t.Fatal("no TryLock after ReleaseNoWait ran")
		}
		if n := e.backends(); n > 4 {
			t.Errorf("%d server sessions; WithMaxConns(4) allows 4", n)
		}
	})
}
