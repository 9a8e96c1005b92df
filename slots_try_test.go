package pglocks_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/pglocks/pglocks"
)

// Goroutines of one Locker trying slots of one key at once each get one
// while slots are free: 8 goroutines on Slots(50) hold at most 8, and claim
// at most 4 more each (a try claims some of the free slots, not all), so no
// TryLock may say ErrLocked. (When a try claimed every free slot, the
// others found none to try and gave up: 4 of 500 tries failed with 5
// goroutines, 2,248 of 5,000 with 50.)
func TestSlotTriesSideBySide(t *testing.T) {
	forEachDriver(t, func(t *testing.T, e *env) {
		l := e.locker(2)
		key := testKey(t, 0)
		const goroutines, tries = 8, 60
		var locked, took atomic.Int64
		var wg sync.WaitGroup
		for range goroutines {
			wg.Go(func() {
				for range tries {
					lk, err := l.TryLock(context.Background(), key, pglocks.Slots(50))
					if errors.Is(err, pglocks.ErrLocked) {
						locked.Add(1)
						continue
					}
					if err != nil {
						t.Error(err)
						return
					}
					took.Add(1)
					if err := lk.Release(context.Background()); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		if n := locked.Load(); n > 0 {
			t.Fatalf("%d of %d tries said ErrLocked with at most %d of 50 slots held", n, goroutines*tries, goroutines)
		}
		t.Logf("%d tries, each took a slot", took.Load())
	})
}
