package gocronpglocks_test

import (
	"context"
	"fmt"
	"time"

	"github.com/go-co-op/gocron/v2"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/gocronpglocks"
)

// The examples are README.md's code, between the README markers (see
// DEVELOPERS.md); what comes before sets up what that code is handed.

// Every replica runs this; each night, one of them sends the report.
func ExampleNewLocker() {
	locker, done := exampleLocker()
	defer done()
	// The replica stops after 100 ms, before the job first runs (at 03:00).
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	sendReport := func() {}
	err := func() error {
		// README:begin
		// Every replica schedules every job; each run goes to the replica that gets
		// the job's lock (JobKey: pglocks.Name("gocron:" + job name)), held at least
		// 30 s so that a replica whose clock is behind finds it taken.
		jobs, err := gocronpglocks.NewLocker(locker, 30*time.Second)
		if err != nil {
			return err
		}
		s, err := gocron.NewScheduler(gocron.WithDistributedLocker(jobs))
		if err != nil {
			return err
		}
		_, err = s.NewJob(gocron.CronJob("0 3 * * *", false), gocron.NewTask(sendReport), gocron.WithName("nightly-report"))
		if err != nil {
			return err
		}
		s.Start()
		<-ctx.Done() // until the replica stops

		// Stop the scheduler (it waits for running jobs), wait out the jobs'
		// minimum holds (up to 30 s), and only then close the pglocks Locker.
		if err := s.Shutdown(); err != nil {
			return err
		}
		return jobs.Drain(context.Background())
		// README:end
	}()
	fmt.Println(err)
	// Output:
	// <nil>
}

// Every replica runs this; the one that leads runs every job.
func ExampleNewElector() {
	locker, done := exampleLocker()
	defer done()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := func() error {
		// README:begin
		e, err := gocronpglocks.NewElector(locker, pglocks.Name("billing:scheduler"))
		if err != nil {
			return err
		}
		s, err := gocron.NewScheduler(gocron.WithDistributedElector(e))
		if err != nil {
			return err
		}
		// s.NewJob(...) for each job, as with the Locker
		s.Start()
		<-ctx.Done() // until the replica stops

		// Stop the scheduler, resign (the next replica is elected at once),
		// and only then close the pglocks Locker.
		if err := s.Shutdown(); err != nil {
			return err
		}
		return e.Close()
		// README:end
	}()
	fmt.Println(err)
	// Output:
	// <nil>
}
