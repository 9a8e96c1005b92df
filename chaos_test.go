package pglocks_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// errStale is a write refused by the fence: a newer holder has written.
var errStale = errors.New("stale token")

// span is a stretch of time: a critical section as its worker saw it (from
// the lock's grant to the call that ends it), or a fault.
type span struct {
	key        int
	start, end time.Time
}

// spans collects spans from many goroutines.
type spans struct {
	mu sync.Mutex
	s  []span
}

func (s *spans) add(x span) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.s = append(s.s, x)
}

// 9. Chaos: workers on a few keys, session locks and transaction locks,
// and crowds of goroutines contending for the same keys through one Locker
// on a small pool (most of their waits multiplexed), while backends are
// terminated, the server restarts and the network is cut.
// Every critical section is written through a fence (the classic use of
// fencing tokens). At the end: no two accepted sections of a key overlap, and
// nothing is left behind.
//
// It runs twice: straight to the server, and through PgBouncer in
// transaction pooling (where the Locker pins its sessions), with the
// partitions cut between PgBouncer and the server.
func TestChaos(t *testing.T) {
	t.Parallel()
	for _, via := range []string{"direct", "pgbouncer"} {
		t.Run(via, func(t *testing.T) {
			t.Parallel()
			chaos(t, via == "pgbouncer")
		})
	}
}

func chaos(t *testing.T, bouncer bool) {
	const (
		run     = 30 * time.Second
		workers = 8
		keys    = 3
	)
	fs := pgtest.Local(t, pgtest.Options{})
	proxy, err := pgtest.NewProxy(fmt.Sprintf("127.0.0.1:%d", fs.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	_, err = fs.Admin.Exec(t.Context(), `
		CREATE TABLE fences (key int PRIMARY KEY, token bigint NOT NULL);
		INSERT INTO fences SELECT g, 0 FROM generate_series(0, 9) g;
		CREATE TABLE sections (key int, token bigint, kind text, started timestamptz, ended timestamptz)`)
	if err != nil {
		t.Fatal(err)
	}
	dsn := withHostPort(fs.URL, proxy.Addr()) + "&application_name=chaos"
	stopBouncer := func() {}
	if bouncer {
		_, port, _ := strings.Cut(proxy.Addr(), ":")
		p, _ := strconv.Atoi(port)
		b, err := fs.StartPgBouncerVia("transaction", p)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Stop()
		stopBouncer = b.Stop // its idle server connections keep the last client's application_name
		dsn = b.URL + "&application_name=chaos"
	}

	ctx, stop := context.WithTimeout(context.Background(), run)
	defer stop()
	var sessionOK, txOK, setOK, leaderOK, crowdOK, stale, lost, failed atomic.Int64
	var muxSeen atomic.Int64 // the most multiplexed waits a crowd's Locker had at once
	var seen, faultSpans spans
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			pool, l, done := chaosLocker(t, dsn)
			if l == nil {
				return
			}
			defer done()
			r := rand.New(rand.NewPCG(uint64(w), 9))
			for ctx.Err() == nil {
				key := r.IntN(keys)
				var err error
				switch r.IntN(3) {
				case 0:
					err = sessionSection(ctx, l, pool, []int{key}, r, &seen)
					if err == nil {
						sessionOK.Add(1)
					}
				case 1:
					err = txSection(ctx, l, key, r, &seen)
					if err == nil {
						txOK.Add(1)
					}
				default:
					two := []int{key, (key + 1 + r.IntN(keys-1)) % keys}
					err = sessionSection(ctx, l, pool, two, r, &seen)
					if err == nil {
						setOK.Add(1)
					}
				}
				switch {
				case err == nil:
				case errors.Is(err, errStale):
					stale.Add(1)
				case errors.Is(err, pglocks.ErrLockLost):
					lost.Add(1)
				default:
					failed.Add(1)
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}

	// Two crowds: one Locker each on a pool of 3 that the sections' own
	// writes share, 12 goroutines each on the same keys.
	for c := range 2 {
		pool, l, done := chaosLockerMax(t, dsn, 3)
		if l == nil {
			break
		}
		var crowd sync.WaitGroup
		for g := range 12 {
			crowd.Go(func() {
				r := rand.New(rand.NewPCG(uint64(200+c*100+g), 9))
				for ctx.Err() == nil {
					// The workers' keys, and more of their own (below leaderKey).
					ks := []int{r.IntN(leaderKey)}
					if r.IntN(3) == 0 {
						ks = append(ks, (ks[0]+1+r.IntN(leaderKey-1))%leaderKey)
					}
					err := sessionSection(ctx, l, pool, ks, r, &seen)
					switch {
					case err == nil:
						crowdOK.Add(1)
					case errors.Is(err, errStale):
						stale.Add(1)
					case errors.Is(err, pglocks.ErrLockLost):
						lost.Add(1)
					default:
						failed.Add(1)
						time.Sleep(50 * time.Millisecond)
					}
				}
			})
		}
		wg.Go(func() {
			defer done()
			for ctx.Err() == nil {
				if _, m := pglocks.WaitsForTest(l); int64(m) > muxSeen.Load() {
					muxSeen.Store(int64(m))
				}
				time.Sleep(10 * time.Millisecond)
			}
			crowd.Wait()
		})
	}

	// Two electors lead key leaderKey in turn; their terms are sections too.
	for e := range 2 {
		wg.Go(func() {
			pool, l, done := chaosLocker(t, dsn)
			if l == nil {
				return
			}
			defer done()
			r := rand.New(rand.NewPCG(uint64(100+e), 9))
			_ = l.Lead(ctx, pglocks.ID(leaderKey), func(lctx context.Context) error {
				for lctx.Err() == nil {
					err := leaderSection(lctx, pool, pglocks.FencingToken(lctx), r, &seen)
					switch {
					case err == nil:
						leaderOK.Add(1)
					case errors.Is(err, errStale):
						stale.Add(1)
						return err
					case lctx.Err() != nil:
						lost.Add(1)
					default:
						failed.Add(1)
						return err
					}
				}
				return lctx.Err()
			})
		})
	}

	faults := map[string]int{}
	r := rand.New(rand.NewPCG(99, 1))
	for i := 0; ctx.Err() == nil; i++ {
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(1500+r.IntN(1500)) * time.Millisecond):
		}
		if ctx.Err() != nil {
			break
		}
		fault := span{start: time.Now()}
		switch i % 4 {
		case 0, 2:
			tag, err := fs.Admin.Exec(context.Background(),
				"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'chaos%' AND random() < 0.5")
			if err == nil {
				faults["backends terminated"] += int(tag.RowsAffected())
			}
		case 1:
			proxy.Freeze()
			time.Sleep(3 * time.Second)
			proxy.Cut()
			faults["network partitions (3 s, then cut)"]++
		case 3:
			if err := fs.Restart("fast"); err != nil {
				t.Fatal(err)
			}
			faults["server restarts"]++
		}
		fault.end = time.Now()
		faultSpans.add(fault)
	}
	wg.Wait()

	// Without a fault, the lock alone excludes: sections that overlap as their
	// workers saw them must each be near a fault (within the loss-detection
	// bound), where only the fence keeps them apart.
	const slack = 3 * time.Second
	nearFault := func(x span) bool {
		for _, f := range faultSpans.s {
			if x.start.Before(f.end.Add(slack)) && f.start.Before(x.end) {
				return true
			}
		}
		return false
	}
	unexplained := 0
	for i, a := range seen.s {
		for _, b := range seen.s[i+1:] {
			if a.key == b.key && a.start.Before(b.end) && b.start.Before(a.end) && !nearFault(a) && !nearFault(b) {
				unexplained++
				t.Logf("key %d: sections %v–%v and %v–%v overlap", a.key, a.start.Format("15:04:05.000"), a.end.Format("15:04:05.000"), b.start.Format("15:04:05.000"), b.end.Format("15:04:05.000"))
			}
		}
	}
	if unexplained != 0 {
		t.Errorf("%d pairs of critical sections overlapped with no fault near them", unexplained)
	}

	var overlaps, accepted int
	err = fs.Admin.QueryRow(context.Background(), `
		SELECT (SELECT count(*) FROM sections a JOIN sections b ON a.key = b.key AND a.token < b.token
		        WHERE a.ended IS NOT NULL AND b.ended IS NOT NULL AND a.started < b.ended AND b.started < a.ended),
		       (SELECT count(*) FROM sections WHERE ended IS NOT NULL)`).Scan(&overlaps, &accepted)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("faults: %v", faults)

	t.Logf("sections: %d session-lock, %d transaction-lock, %d two-key LockAll, %d leader and %d crowd sections done (up to %d waits multiplexed at once), %d accepted by the fence; %d refused as stale, %d ended by a lost lock, %d failed (faults)",
		sessionOK.Load(), txOK.Load(), setOK.Load(), leaderOK.Load(), crowdOK.Load(), muxSeen.Load(), accepted, stale.Load(), lost.Load(), failed.Load())
	if overlaps != 0 {
		t.Errorf("%d pairs of accepted critical sections overlap", overlaps)
	}
	if sessionOK.Load() == 0 || txOK.Load() == 0 || setOK.Load() == 0 || leaderOK.Load() == 0 || crowdOK.Load() == 0 || muxSeen.Load() == 0 {
		t.Error("a kind of critical section never completed: the test did not exercise it")
	}
	if len(serverLocks(t, fs)) != 0 {
		// Nothing is held once the workers have closed their Lockers,
		// PgBouncer's server connections included.
		waitFor(t, 10*time.Second, "no locks on the server", func() bool { return len(serverLocks(t, fs)) == 0 })
	}
	stopBouncer()
	waitFor(t, 30*time.Second, "no locks and no worker sessions on the server", func() bool {
		var n int
		_ = fs.Admin.QueryRow(context.Background(), "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'chaos%'").Scan(&n)
		return n == 0 && len(serverLocks(t, fs)) == 0
	})
}

// chaosLocker opens a pool of its own on dsn (as another process would) and
// a fencing Locker on it; done closes both. On error it reports it and
// returns a nil Locker.
func chaosLocker(t *testing.T, dsn string) (*pgxpool.Pool, *pglocks.Locker, func()) {
	return chaosLockerMax(t, dsn, 0)
}

// chaosLockerMax is chaosLocker on a pool of at most max connections (0:
// pgxpool's default).
func chaosLockerMax(t *testing.T, dsn string, max int32) (*pgxpool.Pool, *pglocks.Locker, func()) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Error(err)
		return nil, nil, nil
	}
	if max > 0 {
		cfg.MaxConns = max
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Error(err)
		return nil, nil, nil
	}
	l, err := pglocks.New(pool, pglocks.WithFencingTokens())
	if err != nil {
		t.Error(err)
		pool.Close()
		return nil, nil, nil
	}
	return pool, l, func() { _ = l.Close(); pool.Close() }
}

// leaderKey is the key the chaos electors lead.
const leaderKey = 9

// sessionSection runs one critical section under session locks on keys (one
// key with Lock, several with LockAll), writing its start and end through
// each key's fence.
func sessionSection(ctx context.Context, l *pglocks.Locker, pool *pgxpool.Pool, keys []int, r *rand.Rand, seen *spans) error {
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var locks []*pglocks.Lock
	var done <-chan struct{}
	var why func() error
	if len(keys) == 1 {
		lk, err := l.Lock(lctx, pglocks.ID(int64(keys[0])))
		if err != nil {
			return err
		}
		defer func() { _ = lk.Release(context.Background()) }()
		locks, done, why = []*pglocks.Lock{lk}, lk.Done(), lk.Err
	} else {
		ks := []pglocks.Key{pglocks.ID(int64(keys[0])), pglocks.ID(int64(keys[1]))}
		set, err := l.LockAll(lctx, ks)
		if err != nil {
			return err
		}
		defer func() { _ = set.Release(context.Background()) }()
		locks, done, why = set.Locks(), set.Done(), set.Err
	}
	start := time.Now()
	defer func() {
		for _, lk := range locks {
			k, _ := lk.Key().Int64()
			seen.add(span{key: int(k), start: start, end: time.Now()})
		}
	}()
	wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer wcancel()
	err := pgx.BeginFunc(wctx, pool, func(tx pgx.Tx) error {
		for _, lk := range locks {
			if err := fenceStart(wctx, tx, lk.Key(), lk.Token(), "session"); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	select {
	case <-time.After(time.Duration(r.IntN(20)) * time.Millisecond): // the work
	case <-done:
		return why()
	}
	return pgx.BeginFunc(wctx, pool, func(tx pgx.Tx) error {
		for _, lk := range locks {
			if err := fenceEnd(wctx, tx, lk.Key(), lk.Token()); err != nil {
				return err
			}
		}
		return nil
	})
}

// leaderSection is one stretch of a leader's work under its term's token
// (a term runs many; they share the token).
func leaderSection(ctx context.Context, pool *pgxpool.Pool, tok int64, r *rand.Rand, seen *spans) error {
	start := time.Now()
	defer func() { seen.add(span{key: leaderKey, start: start, end: time.Now()}) }()
	key := pglocks.ID(leaderKey)
	wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer wcancel()
	err := pgx.BeginFunc(wctx, pool, func(tx pgx.Tx) error { return fenceStart(wctx, tx, key, tok, "leader") })
	if err != nil {
		return err
	}
	select {
	case <-time.After(time.Duration(r.IntN(20)) * time.Millisecond): // the work
	case <-ctx.Done():
		return ctx.Err()
	}
	return pgx.BeginFunc(wctx, pool, func(tx pgx.Tx) error { return fenceEnd(wctx, tx, key, tok) })
}

// fenceStart records the start of a section under token tok, unless a newer
// token has written to key's fence (errStale). A leader's term writes many
// sections with one token, hence <=.
func fenceStart(ctx context.Context, tx pgx.Tx, key pglocks.Key, tok int64, kind string) error {
	k, _ := key.Int64()
	tag, err := tx.Exec(ctx, "UPDATE fences SET token = $2 WHERE key = $1 AND token <= $2", k, tok)
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return errStale
	}
	_, err = tx.Exec(ctx, "INSERT INTO sections VALUES ($1, $2, $3, clock_timestamp(), NULL)", k, tok, kind)
	return err
}

// fenceEnd records the end of the section begun under tok, unless a newer
// token has written since.
func fenceEnd(ctx context.Context, tx pgx.Tx, key pglocks.Key, tok int64) error {
	k, _ := key.Int64()
	// The row lock on the fence orders this against a newer holder's start.
	tag, err := tx.Exec(ctx, "UPDATE fences SET token = token WHERE key = $1 AND token = $2", k, tok)
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return errStale
	}
	_, err = tx.Exec(ctx, "UPDATE sections SET ended = clock_timestamp() WHERE key = $1 AND token = $2 AND ended IS NULL", k, tok)
	return err
}

// txSection runs one critical section as a transaction under a transaction
// lock; its token is the transaction's own id, from the same sequence as the
// session locks' tokens.
func txSection(ctx context.Context, l *pglocks.Locker, key int, r *rand.Rand, seen *spans) error {
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return l.DoTx(lctx, pglocks.ID(int64(key)), func(ctx context.Context, tx pgx.Tx) error {
		// The transaction holds the lock from here until after its commit.
		sec := span{key: key, start: time.Now()}
		defer func() {
			sec.end = time.Now()
			seen.add(sec)
		}()
		var tok int64
		if err := tx.QueryRow(ctx, "SELECT pg_current_xact_id()::text::bigint").Scan(&tok); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, "UPDATE fences SET token = $2 WHERE key = $1 AND token < $2", key, tok)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return errStale
		}
		if _, err := tx.Exec(ctx, "INSERT INTO sections VALUES ($1, $2, 'tx', clock_timestamp(), NULL)", key, tok); err != nil {
			return err
		}
		time.Sleep(time.Duration(r.IntN(20)) * time.Millisecond) // the work
		_, err = tx.Exec(ctx, "UPDATE sections SET ended = clock_timestamp() WHERE key = $1 AND token = $2", key, tok)
		return err
	})
}
