// Quickstart shows two workers, each with its own pool as two processes
// would have, handing one advisory lock over.
//
//	go run ./examples/quickstart
//
// It uses the server that DATABASE_URL names, or starts a throwaway one from
// the local PostgreSQL installation (as the tests do) and removes it after,
// also when it is interrupted, terminated, hung up on, or its stdout is
// closed (go run ./examples/quickstart | head -3).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

func main() {
	// SIGINT, SIGTERM, SIGHUP and a closed stdout (go run . | head -3)
	// cancel ctx, so that run returns and its deferred Stop removes the
	// throwaway server. A program of yours would call
	// signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM).
	ctx, stop := pgtest.NotifyContext(context.Background())
	code := run(ctx, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, stdout, stderr io.Writer) int {
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

	key := pglocks.Name("nightly-report")
	fmt.Fprintf(stdout, "key %s = hashtextextended('nightly-report', 0); psql can take it too\n", key)

	var mu sync.Mutex // keeps the two workers' lines whole
	say := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(stdout, time.Now().Format("15:04:05.000 ")+format+"\n", args...)
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for w := 1; w <= 2; w++ {
		wg.Go(func() {
			errs <- worker(ctx, url, w, key, say, start)
		})
		time.Sleep(100 * time.Millisecond) // worker 1 asks first
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
	}
	return 0
}

// worker is one process: its own pool, its own Locker.
func worker(ctx context.Context, url string, id int, key pglocks.Key, say func(string, ...any), start time.Time) error {
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return err
	}
	defer pool.Close()
	locker, err := pglocks.New(pool)
	if err != nil {
		return err
	}
	defer locker.Close()

	// TryDo never waits: it runs fn only if the lock is free right now.
	err = locker.TryDo(ctx, key, func(context.Context) error { return nil })
	if errors.Is(err, pglocks.ErrLocked) {
		say("worker %d: the lock is taken; waiting in the server's queue", id)
	} else if err != nil {
		return err
	}
	asked := time.Now()
	// Lock waits inside the server and is bounded by ctx's deadline.
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return locker.Do(lctx, key, func(ctx context.Context) error {
		say("worker %d: has the lock (waited %v); working for 1s", id, time.Since(asked).Round(time.Millisecond))
		select {
		case <-time.After(time.Second):
		case <-ctx.Done(): // the lock was lost, or we were interrupted
			return context.Cause(ctx)
		}
		say("worker %d: done, releasing", id)
		return nil
	})
}
