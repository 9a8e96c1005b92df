package pglocks_test

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglocks/pglocks"
)

// rawHold takes keys from c, a plain session, as another process would.
func rawHold(t *testing.T, c *pgx.Conn, keys ...pglocks.Key) {
	t.Helper()
	for _, k := range keys {
		var err error
		if id, ok := k.Int64(); ok {
			_, err = c.Exec(context.Background(), "SELECT pg_advisory_lock($1::bigint)", id)
		} else {
			a, b, _ := k.Int32s()
			_, err = c.Exec(context.Background(), "SELECT pg_advisory_lock($1::int4, $2::int4)", a, b)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// numKey is a key unique to t and n, as testKey's, but a number: it leaves
// the process's table of key names (about a thousand) alone, which the
// tests of errors that name their key rely on while thousands of keys are
// made here.
func numKey(t *testing.T, n int) pglocks.Key {
	h := fnv.New64a()
	fmt.Fprintf(h, "%s#%d", t.Name(), n)
	return pglocks.ID(int64(h.Sum64()))
}

// The give-up race (DistributedLock's #147: a wait reported as timed out
// although the lock was granted): waits whose deadline or cancellation
// lands within a millisecond of their grant, the holder letting go on a
// timer. Each either returns the lock, or leaves nothing of the Locker's
// held or queued on the server; for a single key (a wait in the server's
// queue), LockAll (two keys) and a slot (a multiplexed wait for any of two
// slots).
func TestGiveUpRace(t *testing.T) {
	const rounds = 350
	variants := []struct {
		name string
		// hold returns the keys the other process holds, and take waits for
		// them as the variant does, returning a release.
		keys func(t *testing.T, i int) []pglocks.Key
		take func(ctx context.Context, l *pglocks.Locker, keys []pglocks.Key) (release func() error, err error)
	}{
		{"Lock", func(t *testing.T, i int) []pglocks.Key { return []pglocks.Key{numKey(t, i)} },
			func(ctx context.Context, l *pglocks.Locker, keys []pglocks.Key) (func() error, error) {
				lk, err := l.Lock(ctx, keys[0])
				if err != nil {
					return nil, err
				}
				return func() error { return lk.Release(context.Background()) }, nil
			}},
		{"LockAll", func(t *testing.T, i int) []pglocks.Key { return []pglocks.Key{numKey(t, 2*i), numKey(t, 2*i+1)} },
			func(ctx context.Context, l *pglocks.Locker, keys []pglocks.Key) (func() error, error) {
				s, err := l.LockAll(ctx, keys)
				if err != nil {
					return nil, err
				}
				return func() error { return s.Release(context.Background()) }, nil
			}},
		{"Slots", func(t *testing.T, i int) []pglocks.Key {
			k := numKey(t, i)
			return []pglocks.Key{k.Slot(0), k.Slot(1)}
		}, nil},
	}
	forEachDriver(t, func(t *testing.T, e *env) {
		for _, v := range variants {
			t.Run(v.name, func(t *testing.T) {
				l := e.locker(2)
				holder := e.rawConn(t)
				rnd := rand.New(rand.NewPCG(uint64(len(t.Name())), 23))
				var got, gaveUp int
				for i := range rounds {
					keys := v.keys(t, i)
					take := v.take
					if take == nil { // Slots: the waiter names the base key
						base := numKey(t, i)
						take = func(ctx context.Context, l *pglocks.Locker, _ []pglocks.Key) (func() error, error) {
							lk, err := l.Lock(ctx, base, pglocks.Slots(2))
							if err != nil {
								return nil, err
							}
							return func() error { return lk.Release(context.Background()) }, nil
						}
					}
					rawHold(t, holder, keys...)
					const hold = 3 * time.Millisecond
					// Most deadlines land within a millisecond of the grant
					// (the holder's unlock, its round trip and the
					// waiter's wake-up: about half a millisecond after
					// hold here); a few well before or after it, so that
					// both outcomes are seen.
					var at time.Duration
					switch r := rnd.IntN(10); {
					case r == 0:
						at = hold / 6
					case r == 1:
						at = hold + 50*time.Millisecond
					default:
						at = hold - time.Millisecond/2 + time.Duration(rnd.Int64N(int64(2*time.Millisecond)))
					}
					let := make(chan error, 1)
					began := time.Now()
					time.AfterFunc(hold, func() {
						_, err := holder.Exec(context.Background(), "SELECT pg_advisory_unlock_all()")
						let <- err
					})
					var ctx context.Context
					var cancel context.CancelFunc
					if i%2 == 0 {
						ctx, cancel = context.WithDeadline(context.Background(), began.Add(at))
					} else {
						ctx, cancel = context.WithCancel(context.Background())
						time.AfterFunc(at, cancel)
					}
					release, err := take(ctx, l, keys)
					cancel()
					if err := <-let; err != nil {
						t.Fatal(err)
					}
					if err == nil {
						got++
						// The lock is the waiter's: releasing it says so.
						if err := release(); err != nil {
							t.Fatalf("round %d: Release after the wait returned the lock: %v", i, err)
						}
					} else {
						gaveUp++
						if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
							t.Fatalf("round %d: the wait ended with %v, want its ctx's error", i, err)
						}
					}
					// Either way nothing is held or queued once the holder
					// let go and a lock returned was released: a wait that
					// gave up as it was granted let go of what it got.
					waitFor(t, 5*time.Second, fmt.Sprintf("round %d (%v, deadline %v after the start): nothing left", i, err, at), func() bool {
						return len(e.locks()) == 0
					})
				}
				t.Logf("%d waits got the lock, %d gave up", got, gaveUp)
				if got == 0 || gaveUp == 0 {
					t.Fatalf("%d got the lock and %d gave up: the deadlines did not land on both sides of the grant", got, gaveUp)
				}
			})
		}
	})
}
