package riverpglocks_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/riverpglocks"
)

// These tests run River's own client, several of them as the replicas of a
// service, each with its own pool and Locker, on a database migrated with
// rivermigrate.

// The test middleware snoozes briefly, and the clients fetch often, so that
// a job whose key frees is worked again within tens of milliseconds.
const (
	testSnooze = 20 * time.Millisecond
	testJitter = 20 * time.Millisecond
	// patience bounds every wait for River: generous, never an assertion
	// on speed.
	patience = 2 * time.Minute
)

// riverDB returns a database for t with River's tables in it.
func riverDB(t testing.TB) string {
	t.Helper()
	dsn := srv.DB(t)
	migrate(t, dsn)
	return dsn
}

// migrate applies every River migration to the database of dsn.
func migrate(t testing.TB, dsn string) {
	t.Helper()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	m, err := rivermigrate.New(riverpgxv5.New(pool), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		t.Fatal(err)
	}
}

// workArgs are the test jobs' args: Key groups them as the test wants.
type workArgs struct {
	Key string `json:"key"`
}

func (workArgs) Kind() string { return "work" }

// testWorker runs its work func; mw is its own middleware (Worker.Middleware).
type testWorker[T river.JobArgs] struct {
	river.WorkerDefaults[T]
	work func(ctx context.Context, job *river.Job[T]) error
	mw   []rivertype.WorkerMiddleware
}

func (w *testWorker[T]) Work(ctx context.Context, job *river.Job[T]) error { return w.work(ctx, job) }

func (w *testWorker[T]) Middleware(*rivertype.JobRow) []rivertype.WorkerMiddleware { return w.mw }

// replica is what one process of the service has.
type replica struct {
	pool   *pgxpool.Pool
	locker *pglocks.Locker
	client *river.Client[pgx.Tx]
}

// startReplica starts a River client on a pool and Locker of its own, with
// middleware(locker) installed on the client (when middleware is not nil)
// and the workers that workers adds. It is stopped, and its Locker closed,
// when t ends.
func startReplica(t testing.TB, dsn string, maxWorkers int,
	middleware func(*pglocks.Locker) rivertype.Middleware,
	workers func(w *river.Workers, l *pglocks.Locker)) *replica {
	t.Helper()
	r := &replica{pool: newPool(t, dsn)}
	r.locker = newLocker(t, r.pool)
	w := river.NewWorkers()
	workers(w, r.locker)
	cfg := &river.Config{
		Queues:            map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: maxWorkers}},
		Workers:           w,
		FetchCooldown:     2 * time.Millisecond,
		FetchPollInterval: 10 * time.Millisecond,
		Logger:            slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	if middleware != nil {
		cfg.Middleware = []rivertype.Middleware{middleware(r.locker)}
	}
	var err error
	if r.client, err = river.NewClient(riverpgxv5.New(r.pool), cfg); err != nil {
		t.Fatal(err)
	}
	if err := r.client.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), patience)
		defer cancel()
		if err := r.client.Stop(ctx); err != nil {
			t.Errorf("stopping River: %v", err)
		}
	})
	return r
}

// insert inserts jobs with an insert-only client.
func insert(t testing.TB, pool *pgxpool.Pool, jobs ...river.InsertManyParams) []int64 {
	t.Helper()
	c, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.InsertMany(context.Background(), jobs)
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]int64, len(res))
	for i, r := range res {
		ids[i] = r.Job.ID
	}
	return ids
}

// waitJobs waits until every job in the database is in a final state, and
// returns them all by id.
func waitJobs(t testing.TB, pool *pgxpool.Pool) map[int64]*jobState {
	t.Helper()
	end := time.Now().Add(patience)
	for {
		jobs := readJobs(t, pool)
		pending := 0
		for _, j := range jobs {
			if j.State != "completed" && j.State != "discarded" && j.State != "cancelled" {
				pending++
			}
		}
		if pending == 0 {
			return jobs
		}
		if time.Now().After(end) {
			t.Fatalf("%d of %d jobs not done after %v: %v", pending, len(jobs), patience, jobs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// jobState is what the tests read of a job's row.
type jobState struct {
	State       string
	Attempt     int
	MaxAttempts int
	Snoozes     int
	Errors      []string
}

func (j *jobState) String() string {
	return fmt.Sprintf("%s attempt %d/%d, %d snoozes, errors %q", j.State, j.Attempt, j.MaxAttempts, j.Snoozes, j.Errors)
}

func readJobs(t testing.TB, pool *pgxpool.Pool) map[int64]*jobState {
	t.Helper()
	rows, err := pool.Query(context.Background(), `
		SELECT id, state::text, attempt, max_attempts, coalesce((metadata->>'snoozes')::int, 0),
		       coalesce((SELECT array_agg(e->>'error') FROM unnest(errors) e), '{}')
		FROM river_job`)
	if err != nil {
		t.Fatal(err)
	}
	jobs := map[int64]*jobState{}
	var id int64
	var j jobState
	_, err = pgx.ForEachRow(rows, []any{&id, &j.State, &j.Attempt, &j.MaxAttempts, &j.Snoozes, &j.Errors}, func() error {
		c := j
		jobs[id] = &c
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return jobs
}

// occupancy records which jobs run at once, by the group each test puts
// them in, across every replica of a test.
type occupancy struct {
	mu      sync.Mutex
	limits  map[string]int // the most that may run at once, per group
	active  map[string]int // running now, per group
	most    map[string]int // the most at once, per group
	total   int            // running now, in all groups
	mostAll int
	runs    map[int64]int            // times each job ran
	by      map[int64]int64          // job → the number of the replica that ran it
	reached map[string]chan struct{} // closed once the group had its limit at once
	over    []string
}

// newOccupancy returns an occupancy where each group may have limits[group]
// jobs at once, or limit for groups not in limits.
func newOccupancy(limit int, limits map[string]int) *occupancy {
	if limits == nil {
		limits = map[string]int{}
	}
	limits[""] = limit
	return &occupancy{limits: limits, active: map[string]int{}, most: map[string]int{},
		runs: map[int64]int{}, by: map[int64]int64{}, reached: map[string]chan struct{}{}}
}

func (o *occupancy) limit(group string) int {
	if n, ok := o.limits[group]; ok && group != "" {
		return n
	}
	return o.limits[""]
}

// reachedCh returns the channel closed when group reaches its limit.
func (o *occupancy) reachedCh(group string) chan struct{} {
	ch := o.reached[group]
	if ch == nil {
		ch = make(chan struct{})
		o.reached[group] = ch
	}
	return ch
}

func (o *occupancy) enter(group string, job int64, replica int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.active[group]++
	o.total++
	o.runs[job]++
	o.by[job] = replica
	n := o.active[group]
	o.most[group] = max(o.most[group], n)
	o.mostAll = max(o.mostAll, o.total)
	if n > o.limit(group) {
		o.over = append(o.over, fmt.Sprintf("job %d: %d of group %q at once", job, n, group))
	}
	if ch := o.reachedCh(group); n == o.limit(group) {
		select {
		case <-ch:
		default:
			close(ch)
		}
	}
}

func (o *occupancy) leave(group string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.active[group]--
	o.total--
}

// waitReached waits until group had its limit of jobs at once (or ctx
// ended, or patience ran out), so that a test sees the limit reached, not
// merely respected.
func (o *occupancy) waitReached(ctx context.Context, group string) {
	o.mu.Lock()
	ch := o.reachedCh(group)
	o.mu.Unlock()
	select {
	case <-ch:
	case <-ctx.Done():
	case <-time.After(patience):
	}
}

// check fails t unless each of want jobs ran exactly once and completed
// with its first attempt, and no group went over its limit; it returns
// the snoozes counted in all.
func (o *occupancy) check(t *testing.T, jobs map[int64]*jobState, want int) int {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, s := range o.over {
		t.Error(s)
	}
	if len(jobs) != want {
		t.Errorf("%d jobs in river_job, want %d", len(jobs), want)
	}
	snoozes := 0
	for id, j := range jobs {
		snoozes += j.Snoozes
		if j.State != "completed" || j.Attempt != 1 || len(j.Errors) != 0 {
			t.Errorf("job %d: %v, want completed at its first attempt, with no error", id, j)
		}
		if o.runs[id] != 1 {
			t.Errorf("job %d ran %d times", id, o.runs[id])
		}
	}
	return snoozes
}

// byReplica counts the jobs each replica ran.
func (o *occupancy) byReplica() map[int64]int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := map[int64]int{}
	for _, r := range o.by {
		n[r]++
	}
	return n
}

// snoozed waits until some job of the database has been snoozed, or
// patience runs out.
func snoozed(ctx context.Context, pool *pgxpool.Pool) {
	end := time.Now().Add(patience)
	for time.Now().Before(end) && ctx.Err() == nil {
		var n int
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM river_job WHERE metadata ? 'snoozes'").Scan(&n); err != nil || n > 0 {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// runFleet runs jobs on replicas replicas, each working up to maxWorkers
// at once, with the middleware that mw makes from each replica's Locker
// installed on every client, and a worker that records its runs in occ by
// its args' key. The first job to run waits, holding its key, until another
// job was snoozed, and every job waits until occ's limit was reached, so
// that contention and the limit are seen on every run, however the jobs are
// scheduled. It returns the jobs' final states.
func runFleet(t *testing.T, replicas, maxWorkers int, occ *occupancy, jobs []river.InsertManyParams,
	mw func(*pglocks.Locker) rivertype.Middleware) map[int64]*jobState {
	t.Helper()
	dsn := riverDB(t)
	setup := newPool(t, dsn)
	var first sync.Once
	for i := range replicas {
		id := int64(i + 1)
		startReplica(t, dsn, maxWorkers, mw, func(w *river.Workers, _ *pglocks.Locker) {
			river.AddWorker(w, &testWorker[workArgs]{work: func(ctx context.Context, job *river.Job[workArgs]) error {
				occ.enter(job.Args.Key, job.ID, id)
				defer occ.leave(job.Args.Key)
				first.Do(func() { snoozed(ctx, setup) })
				occ.waitReached(ctx, job.Args.Key)
				time.Sleep(2 * time.Millisecond) // a little work, so that runs can overlap
				return nil
			}})
		})
	}
	insert(t, setup, jobs...)
	return waitJobs(t, setup)
}

func sameKeyJobs(n int) []river.InsertManyParams {
	jobs := make([]river.InsertManyParams, n)
	for i := range jobs {
		jobs[i] = river.InsertManyParams{Args: workArgs{Key: "all"}}
	}
	return jobs
}

// Jobs of one kind, with one key (KindKey): three replicas of 4 workers
// each work 40 of them, one at a time; every job completes at its first
// attempt though many were snoozed, and nothing is left in pg_locks.
func TestOneJobOfAKindAtATime(t *testing.T) {
	t.Parallel()
	const n = 40
	occ := newOccupancy(1, nil)
	jobs := runFleet(t, 3, 4, occ, sameKeyJobs(n), func(l *pglocks.Locker) rivertype.Middleware {
		return newMiddleware(t, l, riverpglocks.WithSnooze(testSnooze, testJitter))
	})
	snoozes := occ.check(t, jobs, n)
	if snoozes == 0 {
		t.Error("no job was ever snoozed: the test saw no contention")
	}
	if occ.most["all"] != 1 {
		t.Errorf("at most %d at once, want 1", occ.most["all"])
	}
	t.Logf("%d jobs, one at a time, %d snoozes; jobs per replica %v", n, snoozes, occ.byReplica())
}

// With Slots(2), at most 2 jobs of the kind at once, and 2 are reached.
func TestSlotsBoundTheFleet(t *testing.T) {
	t.Parallel()
	const n = 40
	occ := newOccupancy(2, nil)
	jobs := runFleet(t, 3, 4, occ, sameKeyJobs(n), func(l *pglocks.Locker) rivertype.Middleware {
		return newMiddleware(t, l, riverpglocks.Slots(2), riverpglocks.WithSnooze(testSnooze, testJitter))
	})
	snoozes := occ.check(t, jobs, n)
	if occ.most["all"] != 2 {
		t.Errorf("at most %d at once, want 2", occ.most["all"])
	}
	if snoozes == 0 {
		t.Error("no job was ever snoozed: the test saw no contention")
	}
	t.Logf("%d jobs, at most %d at once, %d snoozes; jobs per replica %v", n, occ.most["all"], snoozes, occ.byReplica())
}

// ArgsKey, installed on one worker: jobs for one customer run one at a
// time, jobs for different customers side by side; another kind's worker,
// without the middleware, takes no lock.
func TestArgsKeyPerWorker(t *testing.T) {
	t.Parallel()
	dsn := riverDB(t)
	setup := newPool(t, dsn)
	occ := newOccupancy(1, map[string]int{"free": 3}) // the other kind's jobs: 3 run at once
	var both sync.WaitGroup                           // the first job of each customer waits for the other's
	both.Add(2)
	var firstOf sync.Map
	var sideBySide atomic.Int32 // first jobs that saw the other customer's running
	for i := range 3 {
		id := int64(i + 1)
		startReplica(t, dsn, 4, nil, func(w *river.Workers, l *pglocks.Locker) {
			mw := newMiddleware(t, l, riverpglocks.WithSnooze(testSnooze, testJitter),
				riverpglocks.WithKey(riverpglocks.ArgsKey(func(a customerArgs) string { return a.Customer })))
			river.AddWorker(w, &testWorker[customerArgs]{mw: []rivertype.WorkerMiddleware{mw},
				work: func(ctx context.Context, job *river.Job[customerArgs]) error {
					occ.enter(job.Args.Customer, job.ID, id)
					defer occ.leave(job.Args.Customer)
					if _, loaded := firstOf.LoadOrStore(job.Args.Customer, true); !loaded {
						both.Done()
						if waitGroup(ctx, &both) {
							sideBySide.Add(1)
						}
					}
					time.Sleep(2 * time.Millisecond)
					return nil
				}})
			river.AddWorker(w, &testWorker[workArgs]{work: func(ctx context.Context, job *river.Job[workArgs]) error {
				occ.enter("free", job.ID, id)
				defer occ.leave("free")
				occ.waitReached(ctx, "free")
				return nil
			}})
		})
	}
	var jobs []river.InsertManyParams
	for i := range 24 {
		jobs = append(jobs, river.InsertManyParams{Args: customerArgs{Customer: []string{"acme", "globex"}[i%2], N: i}})
	}
	for range 3 {
		jobs = append(jobs, river.InsertManyParams{Args: workArgs{}})
	}
	insert(t, setup, jobs...)
	states := waitJobs(t, setup)
	occ.check(t, states, len(jobs))
	if sideBySide.Load() != 2 || occ.most["acme"] != 1 || occ.most["globex"] != 1 {
		t.Errorf("per customer at most %v at once, customers side by side %d times; want 1 each, and both side by side", occ.most, sideBySide.Load())
	}
	if occ.most["free"] != 3 {
		t.Errorf("the other kind ran %d at once, want all 3 (it takes no lock)", occ.most["free"])
	}
	t.Logf("per customer at most %v at once, %d in all", occ.most, occ.mostAll)
}

// waitGroup waits for wg as long as ctx and patience allow, and reports
// whether it was done.
func waitGroup(ctx context.Context, wg *sync.WaitGroup) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-ctx.Done():
	case <-time.After(patience):
	}
	return false
}

// A job whose key is held elsewhere is snoozed again and again without
// running and without using its attempts (max_attempts 1 here), and runs
// once the key is free, at its first attempt.
func TestSnoozesDoNotCountAttempts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := riverDB(t)
	setup := newPool(t, dsn)
	// Another process holds the kind's key, as plain SQL.
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(hashtextextended('river:work', 0))"); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var attempts []int
	startReplica(t, dsn, 2, func(l *pglocks.Locker) rivertype.Middleware {
		return newMiddleware(t, l, riverpglocks.WithSnooze(testSnooze, testJitter))
	}, func(w *river.Workers, _ *pglocks.Locker) {
		river.AddWorker(w, &testWorker[workArgs]{work: func(_ context.Context, job *river.Job[workArgs]) error {
			mu.Lock()
			attempts = append(attempts, job.Attempt)
			mu.Unlock()
			return nil
		}})
	})
	ids := insert(t, setup, river.InsertManyParams{Args: workArgs{}, InsertOpts: &river.InsertOpts{MaxAttempts: 1}})

	// Snoozed 5 times, and between two tries: never run, attempt 0.
	var j *jobState
	for end := time.Now().Add(patience); ; time.Sleep(2 * time.Millisecond) {
		j = readJobs(t, setup)[ids[0]]
		if j.Snoozes >= 5 && j.State != "running" {
			break
		}
		if time.Now().After(end) || j.State == "discarded" || j.State == "completed" {
			t.Fatalf("job %v, want it snoozed 5 times", j)
		}
	}
	mu.Lock()
	ran := len(attempts)
	mu.Unlock()
	if ran != 0 || j.Attempt != 0 || j.MaxAttempts != 1 || len(j.Errors) != 0 {
		t.Fatalf("while its key was held elsewhere: ran %d times, job %v; want never run, attempt 0 of 1, no error", ran, j)
	}
	t.Logf("while held: %v", j)

	if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock(hashtextextended('river:work', 0))"); err != nil {
		t.Fatal(err)
	}
	j = waitJobs(t, setup)[ids[0]]
	if j.State != "completed" || j.Attempt != 1 || len(attempts) != 1 || attempts[0] != 1 {
		t.Errorf("once free: job %v, worker saw attempts %v; want completed at attempt 1", j, attempts)
	}
	t.Logf("once free: %v", j)
}

// A lost lock cancels the running job's context with the loss as its
// cause; River records the loss as the attempt's error and retries the job,
// which completes at its second attempt. A job that returns nil after its
// lock was lost (its ctx ignored) is failed with the loss just the same.
func TestLostLockCancelsJob(t *testing.T) {
	t.Parallel()
	for _, ignore := range []bool{false, true} {
		name := "job watches ctx"
		if ignore {
			name = "job returns nil"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			dsn := riverDB(t)
			setup := newPool(t, dsn)
			causes := make(chan error, 2)
			startReplica(t, dsn, 2, func(l *pglocks.Locker) rivertype.Middleware {
				return newMiddleware(t, l, riverpglocks.WithSnooze(testSnooze, testJitter))
			}, func(w *river.Workers, l *pglocks.Locker) {
				river.AddWorker(w, &testWorker[workArgs]{work: func(ctx context.Context, job *river.Job[workArgs]) error {
					if job.Attempt > 1 {
						return nil
					}
					// End the session that holds the job's key, as the
					// server would (a restart, a failover, a DBA).
					h, err := l.Holders(ctx, pglocks.Name("river:work"))
					if err != nil || len(h) != 1 {
						return fmt.Errorf("holders: %v, %v", h, err)
					}
					// (Not on the job's ctx, which the loss cancels; the
					// call returns once the session has ended.)
					sent := time.Now()
					if _, err := srv.Admin.Exec(context.Background(), "SELECT pg_terminate_backend($1, 10000)", h[0].PID); err != nil {
						return err
					}
					if ignore {
						return nil // done, as far as the job knows
					}
					select {
					case <-ctx.Done():
						t.Logf("the job's ctx was cancelled %v after pg_terminate_backend was sent", time.Since(sent).Round(10*time.Microsecond))
						causes <- context.Cause(ctx)
						return ctx.Err()
					case <-time.After(patience):
						return errors.New("ctx not cancelled after the lock was lost")
					}
				}})
			})
			start := time.Now()
			ids := insert(t, setup, river.InsertManyParams{Args: workArgs{}, InsertOpts: &river.InsertOpts{MaxAttempts: 2}})
			j := waitJobs(t, setup)[ids[0]]
			if !ignore {
				select {
				case cause := <-causes:
					if !errors.Is(cause, pglocks.ErrLockLost) {
						t.Errorf("the job's ctx was cancelled with %v, want ErrLockLost", cause)
					}
				default:
					t.Errorf("the job's ctx was not cancelled; job %v", j)
				}
			}
			if j.State != "completed" || j.Attempt != 2 || len(j.Errors) != 1 || !strings.Contains(j.Errors[0], pglocks.ErrLockLost.Error()) {
				t.Fatalf("job %v; want completed at attempt 2, the loss as attempt 1's error", j)
			}
			t.Logf("job %v, %v after its insert", j, time.Since(start).Round(time.Millisecond))
		})
	}
}
