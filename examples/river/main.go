// This example is a service of two replicas, each with its own pool, its
// own pglocks Locker and its own River client, working one queue through
// riverpglocks:
//
//	go -C examples/river run .
//
// Report jobs hold their kind's key, so one runs at a time in the whole
// service; export jobs hold one of the kind's 2 slots, so at most 2 run at
// once. Every replica fetches every kind; a job whose key (or both of whose
// slots) another replica holds is snoozed, its attempt not counted, and
// comes back later. Halfway, replica 1 stops (River's Stop waits for its
// running jobs), and replica 2 works what is left.
//
// It uses the server that DATABASE_URL names (and the River tables there,
// migrated with rivermigrate), or starts a throwaway one from the local
// PostgreSQL installation (as the tests do) and removes it after, also when
// it is interrupted, terminated, hung up on, or its stdout is closed.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
	"github.com/pglocks/pglocks/riverpglocks"
)

// ReportArgs are a report job's: one runs at a time.
type ReportArgs struct {
	N int `json:"n"`
}

// Kind is River's name for report jobs.
func (ReportArgs) Kind() string { return "example_report" }

// ExportArgs are an export job's: at most 2 run at once.
type ExportArgs struct {
	N int `json:"n"`
}

// Kind is River's name for export jobs.
func (ExportArgs) Kind() string { return "example_export" }

// work is how long each job works.
const work = 150 * time.Millisecond

func main() {
	jobs := flag.Int("jobs", 6, "how many jobs of each kind to insert")
	flag.Parse()
	// SIGINT, SIGTERM, SIGHUP and a closed stdout (go run . | head) stop
	// the replicas early, and run's deferred Stop removes the throwaway
	// server. A program of yours would call
	// signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM).
	ctx, stop := pgtest.NotifyContext(context.Background())
	code := run(ctx, os.Stdout, os.Stderr, *jobs)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, stdout, stderr io.Writer, jobs int) int {
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		fmt.Fprintln(stdout, "DATABASE_URL is not set: starting a throwaway PostgreSQL...")
		srv, err := pgtest.Start()
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		defer srv.Stop()
		url = srv.URL
	}
	if err := migrate(ctx, url); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "two replicas; %d report jobs, one at a time, and %d export jobs, at most 2 at once, each working %v\n",
		jobs, jobs, work)

	// Replica 1 stops once half the reports are done.
	log := &runLog{out: stdout, running: map[string]int{}, most: map[string]int{}, stopAt: max(1, jobs/2), stopped: make(chan struct{})}
	var replicas []*replica
	defer func() {
		for _, r := range replicas {
			r.stop()
		}
	}()
	for id := 1; id <= 2; id++ {
		r, err := startReplica(ctx, url, id, log)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		replicas = append(replicas, r)
	}
	var batch []river.InsertManyParams
	for i := range jobs {
		batch = append(batch, river.InsertManyParams{Args: ReportArgs{N: i + 1}}, river.InsertManyParams{Args: ExportArgs{N: i + 1}})
	}
	if _, err := replicas[0].client.InsertMany(ctx, batch); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	select {
	case <-log.stopped:
		fmt.Fprintf(stdout, "%s  replica 1 stops; replica 2 works what is left\n", stamp())
		replicas[0].stop()
	case <-ctx.Done():
	}
	for log.finished() < 2*jobs && ctx.Err() == nil {
		select {
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
		}
	}
	for _, r := range replicas {
		r.stop()
	}
	replicas = nil
	if ctx.Err() != nil {
		return 1
	}
	return log.summary(stdout)
}

// migrate brings River's tables in the database of url up to date.
func migrate(ctx context.Context, url string) error {
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return err
	}
	defer pool.Close()
	m, err := rivermigrate.New(riverpgxv5.New(pool), nil)
	if err != nil {
		return err
	}
	_, err = m.Migrate(ctx, rivermigrate.DirectionUp, nil)
	return err
}

// replica is one replica of the service: what one process would have.
type replica struct {
	pool   *pgxpool.Pool
	locker *pglocks.Locker
	client *river.Client[pgx.Tx]
	once   sync.Once
}

func startReplica(ctx context.Context, url string, id int, log *runLog) (*replica, error) {
	r := &replica{}
	var err error
	if r.pool, err = pgxpool.New(ctx, url); err != nil {
		return nil, err
	}
	if r.locker, err = pglocks.New(r.pool); err != nil {
		r.pool.Close()
		return nil, err
	}
	// Reports hold their kind's key (riverpglocks.KindKey); exports one of
	// its 2 slots. Each middleware is returned by its worker's Middleware
	// method, so that each kind has its own. The snooze is short here, so
	// that the example does not dawdle.
	reports, err := riverpglocks.New(r.locker, riverpglocks.WithSnooze(100*time.Millisecond, 100*time.Millisecond))
	if err != nil {
		r.stop()
		return nil, err
	}
	exports, err := riverpglocks.New(r.locker, riverpglocks.Slots(2), riverpglocks.WithSnooze(100*time.Millisecond, 100*time.Millisecond))
	if err != nil {
		r.stop()
		return nil, err
	}
	workers := river.NewWorkers()
	river.AddWorker(workers, &worker[ReportArgs]{mw: reports, id: id, log: log})
	river.AddWorker(workers, &worker[ExportArgs]{mw: exports, id: id, log: log})
	r.client, err = river.NewClient(riverpgxv5.New(r.pool), &river.Config{
		Queues:            map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 4}},
		Workers:           workers,
		FetchCooldown:     10 * time.Millisecond,
		FetchPollInterval: 50 * time.Millisecond, // snoozed jobs are fetched again at a poll
	})
	if err == nil {
		err = r.client.Start(context.Background())
	}
	if err != nil {
		r.stop()
		return nil, err
	}
	return r, nil
}

// stop stops River first (Stop waits for running jobs, which release their
// keys), then closes the Locker and the pool.
func (r *replica) stop() {
	r.once.Do(func() {
		if r.client != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := r.client.Stop(ctx); err != nil {
				_ = r.client.StopAndCancel(context.Background())
			}
			cancel()
		}
		if r.locker != nil {
			_ = r.locker.Close()
		}
		r.pool.Close()
	})
}

// worker works a job of kind T on one replica, holding its key through mw.
type worker[T river.JobArgs] struct {
	river.WorkerDefaults[T]
	mw  *riverpglocks.Middleware
	id  int
	log *runLog
}

func (w *worker[T]) Middleware(*rivertype.JobRow) []rivertype.WorkerMiddleware {
	return []rivertype.WorkerMiddleware{w.mw}
}

func (w *worker[T]) Work(ctx context.Context, job *river.Job[T]) error {
	w.log.enter(job.Kind, job.ID, w.id, job.Attempt, job.Metadata)
	defer w.log.leave(job.Kind)
	select {
	case <-time.After(work):
		return nil
	case <-ctx.Done(): // the lock was lost, or River is stopping
		return ctx.Err()
	}
}

// runLog prints each run, and counts how many of each kind run at once.
type runLog struct {
	out     io.Writer
	mu      sync.Mutex
	running map[string]int
	most    map[string]int
	done    int
	reports int
	stopAt  int
	stopped chan struct{} // closed once stopAt reports are done
}

func stamp() string { return time.Now().Format("15:04:05.000") }

func (l *runLog) enter(kind string, id int64, replica, attempt int, metadata []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.running[kind]++
	l.most[kind] = max(l.most[kind], l.running[kind])
	var snoozes struct {
		Snoozes int `json:"snoozes"`
	}
	_ = json.Unmarshal(metadata, &snoozes)
	fmt.Fprintf(l.out, "%s  %-14s job %2d runs on replica %d (attempt %d, snoozed %d times before); %d running\n",
		stamp(), kind, id, replica, attempt, snoozes.Snoozes, l.running[kind])
}

func (l *runLog) leave(kind string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.running[kind]--
	l.done++
	if kind == (ReportArgs{}).Kind() {
		l.reports++
		if l.reports == l.stopAt {
			close(l.stopped)
		}
	}
}

func (l *runLog) finished() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.done
}

// summary prints the most of each kind that ran at once, and returns 1 if
// more ran than allowed.
func (l *runLog) summary(w io.Writer) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	code := 0
	for _, k := range []struct {
		kind  string
		limit int
	}{{(ReportArgs{}).Kind(), 1}, {(ExportArgs{}).Kind(), 2}} {
		fmt.Fprintf(w, "%s: at most %d at once (allowed %d)\n", k.kind, l.most[k.kind], k.limit)
		if l.most[k.kind] > k.limit {
			code = 1
		}
	}
	fmt.Fprintf(w, "%d jobs done\n", l.done)
	return code
}
