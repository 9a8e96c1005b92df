package gocronpglocks_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/gocronpglocks"
)

// Every replica runs this; each minute, one of them sends the report.
func ExampleNewLocker() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	locker, err := pglocks.New(pool)
	if err != nil {
		panic(err)
	}
	defer locker.Close()

	// Held at least 30 s: longer than the replicas' clocks differ, shorter
	// than the minute between runs.
	jobs, err := gocronpglocks.NewLocker(locker, 30*time.Second)
	if err != nil {
		panic(err)
	}
	s, err := gocron.NewScheduler(gocron.WithDistributedLocker(jobs))
	if err != nil {
		panic(err)
	}
	_, err = s.NewJob(gocron.CronJob("* * * * *", false),
		gocron.NewTask(func() { fmt.Println("sending the report") }),
		gocron.WithName("report")) // the lock: gocronpglocks.JobKey("report")
	if err != nil {
		panic(err)
	}
	s.Start()

	// ... until the replica stops:
	_ = s.Shutdown()
	_ = jobs.Drain(ctx)
}

// Every replica runs this; the one that leads runs every job.
func ExampleNewElector() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	locker, err := pglocks.New(pool)
	if err != nil {
		panic(err)
	}
	defer locker.Close()

	e, err := gocronpglocks.NewElector(locker, pglocks.Name("billing:scheduler"),
		gocronpglocks.WithTakeoverDelay(2*time.Second)) // clocks differ by less
	if err != nil {
		panic(err)
	}
	defer e.Close()
	s, err := gocron.NewScheduler(gocron.WithDistributedElector(e))
	if err != nil {
		panic(err)
	}
	_, err = s.NewJob(gocron.DurationJob(time.Minute), gocron.NewTask(func() { fmt.Println("billing run") }))
	if err != nil {
		panic(err)
	}
	s.Start()

	// ... until the replica stops:
	_ = s.Shutdown()
}
