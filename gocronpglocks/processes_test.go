package gocronpglocks_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// replicaEnv carries a replicaConfig, as JSON, to a replica process: the
// test binary run again, which then runs replicaMain instead of the tests.
const replicaEnv = "GOCRONPGLOCKS_REPLICA"

// replicaMain is a replica process: it records each run in the runs table
// and runs until its stdin closes (then shuts down cleanly) or it is killed.
func replicaMain(cfgJSON string) int {
	var cfg replicaConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	db, err := pgxpool.New(ctx, cfg.DSN)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer db.Close()
	pid := os.Getpid()
	r, err := startReplica(ctx, cfg, func(job string, tick time.Time) {
		if _, err := db.Exec(context.Background(),
			"INSERT INTO runs (job, tick, replica, pid) VALUES ($1, $2, $3, $4)", job, tick, cfg.Name, pid); err != nil {
			fmt.Fprintln(os.Stderr, "record:", err)
		}
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	eof := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(eof) }()
	select {
	case <-eof:
	case <-ctx.Done():
	}
	r.stop()
	return 0
}

// process is a replica process.
type process struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

// startProcesses starts one replica process per offset and waits until
// each is ready. When t ends, the ones still running are asked to stop and
// waited for.
func startProcesses(t *testing.T, base replicaConfig, offsets []time.Duration) []*process {
	t.Helper()
	var ps []*process
	t.Cleanup(func() {
		for _, p := range ps {
			_ = p.stdin.Close()
		}
		for _, p := range ps {
			done := make(chan error, 1)
			go func() { done <- p.cmd.Wait() }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = p.cmd.Process.Kill()
				<-done
				t.Errorf("%s did not stop within 10 s of its stdin closing", p.name)
			}
		}
	})
	for i, off := range offsets {
		cfg := base
		cfg.Name = fmt.Sprintf("process-%d", i+1)
		cfg.Offset = off
		js, err := json.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), replicaEnv+"="+string(js))
		cmd.Stderr = os.Stderr
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		// A pipe of our own rather than StdoutPipe, which must not be read
		// once Wait is called.
		stdout, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout = w
		err = cmd.Start()
		w.Close()
		if err != nil {
			stdout.Close()
			t.Fatal(err)
		}
		p := &process{name: cfg.Name, cmd: cmd, stdin: stdin}
		ps = append(ps, p)
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err != nil || line != "ready\n" {
			stdout.Close()
			t.Fatalf("%s: %q, %v", p.name, line, err)
		}
		go func() { _, _ = io.Copy(io.Discard, stdout); stdout.Close() }()
	}
	return ps
}

// runsTable creates the table the replica processes record their runs in,
// and returns a function that reads them.
func runsTable(t *testing.T, dsn string) func() []run {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(ctx) })
	if _, err := conn.Exec(ctx, `CREATE TABLE runs (job text, tick timestamptz, replica text, pid int,
		at timestamptz DEFAULT clock_timestamp())`); err != nil {
		t.Fatal(err)
	}
	return func() []run {
		rows, err := conn.Query(ctx, "SELECT job, replica, tick, at FROM runs ORDER BY at")
		if err != nil {
			t.Fatal(err)
		}
		runs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (run, error) {
			var r run
			err := row.Scan(&r.job, &r.replica, &r.tick, &r.at)
			r.tick = r.tick.Local()
			return r, err
		})
		if err != nil {
			t.Fatal(err)
		}
		return runs
	}
}

// TestProcessesLocker: three OS processes on clocks up to -skew apart share
// two jobs through the Locker: each job runs exactly once per tick.
func TestProcessesLocker(t *testing.T) {
	dsn := srv.DB(t)
	runs := runsTable(t, dsn)
	jobs := []string{"report", "cleanup"}
	startProcesses(t, replicaConfig{DSN: dsn, MinHold: period / 2, Period: period, Jobs: jobs}, spread(3, *skew))
	from := time.Now()
	time.Sleep(time.Duration(*ticks+1) * period)
	got := runs()
	checkOncePerTick(t, got, jobs, from, time.Now().Add(-period), period)
	t.Logf("runs by process: %v", ranBy(got))
}

// TestProcessesElectorLeaderKilled: three OS processes elect a leader that
// runs the jobs; when the leader is killed (SIGKILL), another process runs
// them from the first tick after the takeover delay, and no tick runs twice.
func TestProcessesElectorLeaderKilled(t *testing.T) {
	dsn := srv.DB(t)
	runs := runsTable(t, dsn)
	jobs := []string{"report", "cleanup"}
	base := replicaConfig{DSN: dsn, Elect: true, TakeoverDelay: *skew + 100*time.Millisecond, Period: period, Jobs: jobs}
	ps := startProcesses(t, base, spread(3, *skew))
	waitLeader(t, newLocker(t, dsn))
	from := time.Now().Add(base.TakeoverDelay)
	time.Sleep(time.Duration(*ticks/2+2) * period)
	before := runs()
	if len(before) == 0 {
		t.Fatal("no runs before the kill")
	}
	leader := before[len(before)-1].replica
	if by := ranBy(before); by[leader] != len(before) {
		t.Fatalf("runs before the kill: %v, want all on one leader", by)
	}
	checkOncePerTick(t, before, jobs, from, time.Now().Add(-period), period)

	// Kill the leader in the middle of a period.
	time.Sleep(time.Until(time.Now().Truncate(period).Add(period + period/3)))
	killed := time.Now()
	for _, p := range ps {
		if p.name == leader {
			if err := p.cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
		}
	}
	time.Sleep(time.Duration(*ticks/2+2) * period)
	var later []run
	all := runs()
	for _, r := range all {
		if r.at.After(killed) {
			later = append(later, r)
		}
	}
	if by := ranBy(later); by[leader] != 0 || len(by) != 1 {
		t.Errorf("runs after %s was killed: %v, want all on one other process", leader, by)
	}
	checkOncePerTick(t, later, jobs, killed.Add(base.TakeoverDelay+100*time.Millisecond), time.Now().Add(-period), period)
	for _, d := range duplicates(all) {
		t.Error("across the kill: " + d)
	}
	t.Logf("killed %s at %s; runs after: %v", leader, killed.Format("15:04:05.000"), ranBy(later))
}
