package pglocks_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// netns makes a network namespace joined to this one by a veth pair, with
// hostAddr on this side and nsAddr inside, and returns a function that takes
// the link down: packets are then dropped for real, in both directions, and
// neither end is told. It needs root.
// netAddrs returns the two ends of a /30 in 10.b.0.0/16 of this process's
// own (by its pid), so that test runs side by side do not route each
// other's packets.
func netAddrs(b int) (host, ns string) {
	n := os.Getpid() % 16384
	return fmt.Sprintf("10.%d.%d.%d", b, n/64, n%64*4+1), fmt.Sprintf("10.%d.%d.%d", b, n/64, n%64*4+2)
}

func netns(t *testing.T, name, hostAddr, nsAddr string) (cut func()) {
	t.Helper()
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	hostIf, nsIf := name+"h", name+"n"
	_ = exec.Command("ip", "netns", "del", name).Run() // left by a killed run
	ip("netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ip("link", "add", hostIf, "type", "veth", "peer", "name", nsIf)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", hostIf).Run() })
	ip("link", "set", nsIf, "netns", name)
	ip("addr", "add", hostAddr+"/30", "dev", hostIf)
	ip("link", "set", hostIf, "up")
	ip("netns", "exec", name, "ip", "addr", "add", nsAddr+"/30", "dev", nsIf)
	ip("netns", "exec", name, "ip", "link", "set", nsIf, "up")
	ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
	return func() { ip("link", "set", hostIf, "down") }
}

// 3. A holder cut off by a real network partition is told before the server
// frees its lock, and the server frees it within its keepalive bound (the
// Locker sets the session's TCP keepalives; PostgreSQL's defaults would keep
// the lock for over two hours).
func TestPartitionServerRelease(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("this test drops packets between two network namespaces, which needs root; run it as root (bash .ci/run does)")
	}
	hostAddr, nsAddr := netAddrs(213) // the test's own hosts, inside its own namespace
	cut := netns(t, fmt.Sprintf("pgl%d", os.Getpid()%100000), hostAddr, nsAddr)
	fs := pgtest.Local(t, pgtest.Options{NetNS: fmt.Sprintf("pgl%d", os.Getpid()%100000), Listen: nsAddr})

	pool, err := pgxpool.New(t.Context(), fs.URL) // over the veth pair
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	l, err := pglocks.New(pool)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	key := pglocks.ID(42)
	lk := mustLock(t, l, key)

	// Another session, over the Unix socket that the partition leaves alone,
	// waits for the key.
	other, err := pgx.Connect(t.Context(), fs.SocketURL())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(context.Background())
	acquired := make(chan time.Time, 1)
	go func() {
		if _, err := other.Exec(context.Background(), "SELECT pg_advisory_lock(42)"); err != nil {
			t.Error(err)
		}
		acquired <- time.Now()
	}()
	waitFor(t, 10*time.Second, "the other session to wait", func() bool { return waitedOn(t, fs, key) })

	start := time.Now()
	cut()
	var done, got time.Time
	select {
	case <-lk.Done():
		done = time.Now()
	case <-time.After(30 * time.Second):
		t.Fatal("the holder was not told within 30 s")
	}
	wantErr(t, lk.Err(), pglocks.ErrLockLost)
	select {
	case got = <-acquired:
	case <-time.After(60 * time.Second):
		t.Fatal("the server did not free the lock within 60 s")
	}
	t.Logf("partition: holder told after %v; server freed the lock after %v",
		done.Sub(start).Round(time.Millisecond), got.Sub(start).Round(time.Millisecond))
	if !done.Before(got) {
		t.Fatalf("the server freed the lock (%v) before the holder was told (%v)", got.Sub(start), done.Sub(start))
	}
	if _, err := other.Exec(context.Background(), "SELECT pg_advisory_unlock(42)"); err != nil {
		t.Fatal(err)
	}
}

// Leadership over a real partition: the leader is cut off from the server;
// it stops leading within the heartbeat bound, and only after that, when the
// server gives up on its session, is the candidate elected.
func TestPartitionFailover(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("this test drops packets between two network namespaces, which needs root; run it as root (bash .ci/run does)")
	}
	hostAddr, nsAddr := netAddrs(214)
	ns := fmt.Sprintf("pgf%d", os.Getpid()%100000)
	cut := netns(t, ns, hostAddr, nsAddr)
	fs := pgtest.Local(t, pgtest.Options{NetNS: ns, Listen: nsAddr})
	key := pglocks.Name("partitioned-leader")
	g := newTermLog()
	lead := lockerOn(t, drivers[0], fs.URL) // over the veth pair
	a := startElector(t, lead, key, "a", g)
	waitFor(t, 10*time.Second, "a to lead", func() bool { return a.leading.Load() })
	cand := lockerOn(t, drivers[0], fs.SocketURL()) // over the Unix socket, which the partition leaves alone
	b := startElector(t, cand, key, "b", g)
	waitFor(t, 10*time.Second, "b to campaign", func() bool { return waitedOn(t, fs, key) })

	start := time.Now()
	cut()
	var stopped, elected time.Time
	waitFor(t, 60*time.Second, "b to be elected", func() bool {
		for _, ev := range g.snapshot() {
			switch {
			case ev.who == "a" && !ev.start && stopped.IsZero():
				stopped = ev.at
			case ev.who == "b" && ev.start:
				elected = ev.at
				return true
			}
		}
		return false
	})
	t.Logf("partition: the leader stopped after %v; the candidate was elected after %v",
		stopped.Sub(start).Round(time.Millisecond), elected.Sub(start).Round(time.Millisecond))
	if stopped.IsZero() || !stopped.Before(elected) {
		t.Fatalf("the candidate was elected (%v) before the cut-off leader stopped (%v)", elected.Sub(start), stopped.Sub(start))
	}
	b.stop(t)
	a.cancel()
}
