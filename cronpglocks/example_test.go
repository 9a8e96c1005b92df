package cronpglocks_test

import (
	"context"
	"fmt"
	"time"

	"github.com/robfig/cron/v3"

	"github.com/pglocks/pglocks/cronpglocks"
)

// The examples are README.md's code, between the README markers (see
// DEVELOPERS.md); what comes before sets up what that code is handed.

// Every replica runs this; each night, one of them sends the report, and
// each hour one of them exports.
func ExampleNew() {
	locker, done := exampleLocker()
	defer done()
	// The replica stops after 100 ms, before the jobs first run.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	sendReport := func() {}
	export := func(ctx context.Context) {}
	err := func() error {
		// README:begin
		// Every replica schedules every job; each run goes to the replica that gets
		// the job's lock (JobKey: pglocks.Name("cron:" + job name)), held at least
		// 30 s so that a replica whose clock is behind finds it taken. The ctx of a
		// FuncContext job is cancelled if its lock is lost, or when ctx is done.
		jobs, err := cronpglocks.New(locker, 30*time.Second, cronpglocks.WithBaseContext(ctx))
		if err != nil {
			return err
		}
		c := cron.New(cron.WithChain(cron.Recover(cron.DefaultLogger)))
		if _, err := c.AddJob("0 3 * * *", jobs.Func("nightly-report", sendReport)); err != nil {
			return err
		}
		if _, err := c.AddJob("@hourly", jobs.FuncContext("export", export)); err != nil {
			return err
		}
		c.Start()
		<-ctx.Done() // until the replica stops

		// Stop the scheduler and wait for running jobs, wait out the jobs'
		// minimum holds (up to 30 s), and only then close the pglocks Locker.
		<-c.Stop().Done()
		return jobs.Drain(context.Background())
		// README:end
	}()
	fmt.Println(err)
	// Output:
	// <nil>
}

// Wrap puts the lock in a cron.Chain, here after cron.Recover, so that a
// panic is recovered after the lock is released.
func ExampleWrapper_Wrap() {
	locker, done := exampleLocker()
	defer done()
	jobs, err := cronpglocks.New(locker, 0)
	if err != nil {
		fmt.Println(err)
		return
	}
	job := cron.NewChain(cron.Recover(cron.DefaultLogger), jobs.Wrap("report")).
		Then(cron.FuncJob(func() { fmt.Println("report") }))
	job.Run() // as cron.Cron does at each tick
	// Output:
	// report
}
