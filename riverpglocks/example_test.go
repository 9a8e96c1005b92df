package riverpglocks_test

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglocks/pglocks/riverpglocks"
)

// The examples are README.md's code, between the README markers (see
// DEVELOPERS.md); what comes before sets up what that code is handed.

// ExportArgs are an export job's args.
type ExportArgs struct {
	Customer string `json:"customer"`
}

// Kind is River's name for export jobs.
func (ExportArgs) Kind() string { return "export" }

// Every replica works the queue; at most 2 exports run at once in the whole
// fleet, and the others wait their turn, snoozed.
func ExampleNew() {
	pool, locker, done := exampleLocker()
	defer done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The export worker counts how many run at once, and the replica stops
	// once 6 are done.
	var mu sync.Mutex
	var running, most, finished int
	export := func(ctx context.Context, job *river.Job[ExportArgs]) error {
		mu.Lock()
		running++
		most = max(most, running)
		mu.Unlock()
		time.Sleep(20 * time.Millisecond)
		mu.Lock()
		defer mu.Unlock()
		running--
		if finished++; finished == 6 {
			cancel()
		}
		return nil
	}
	inserter, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	if err != nil {
		panic(err)
	}
	for _, c := range []string{"acme", "globex", "initech", "hooli", "umbrella", "wonka"} {
		if _, err := inserter.Insert(ctx, ExportArgs{Customer: c}, nil); err != nil {
			panic(err)
		}
	}

	err = func() error {
		// README:begin
		// Every job this client works holds its kind's key, pglocks.Name("river:" + kind),
		// or here one of its 2 slots: at most 2 exports at once in the whole fleet.
		// A job whose key is taken is snoozed (1 s, plus up to 0.5 s), its attempt
		// not counted, and tries again.
		exports, err := riverpglocks.New(locker, riverpglocks.Slots(2))
		if err != nil {
			return err
		}
		workers := river.NewWorkers()
		river.AddWorker(workers, river.WorkFunc(export))
		client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{
			Queues:     map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 10}},
			Workers:    workers,
			Middleware: []rivertype.Middleware{exports}, // or from a worker's Middleware method
		})
		if err != nil {
			return err
		}
		if err := client.Start(context.Background()); err != nil {
			return err
		}
		<-ctx.Done() // until the replica stops

		// Stop River first (it waits for running jobs, which release their
		// keys), and only then close the pglocks Locker.
		return client.Stop(context.Background())
		// README:end
	}()
	fmt.Println(err)
	mu.Lock()
	fmt.Printf("%d exports done, at most 2 at once: %v\n", finished, most <= 2)
	mu.Unlock()
	// Output:
	// <nil>
	// 6 exports done, at most 2 at once: true
}
