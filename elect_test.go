package pglocks_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks"
	"github.com/pglocks/pglocks/internal/pgtest"
)

// elector runs Lead in a goroutine and records its terms in a log.
type elector struct {
	name    string
	l       *pglocks.Locker
	cancel  context.CancelFunc
	done    chan error
	resign  chan struct{} // fn returns nil when it receives
	leading atomic.Bool
	log     *termLog
}

// termLog records when each elector's fn starts and ends.
type termLog struct {
	mu      sync.Mutex
	events  []termEvent
	now     int // electors leading now
	changed chan struct{}
}

type termEvent struct {
	at      time.Time
	who     string
	start   bool
	token   int64
	leading int // electors leading just after the event
}

func newTermLog() *termLog { return &termLog{changed: make(chan struct{}, 1)} }

func (g *termLog) add(who string, start bool, token int64) {
	g.mu.Lock()
	if start {
		g.now++
	} else {
		g.now--
	}
	g.events = append(g.events, termEvent{at: time.Now(), who: who, start: start, token: token, leading: g.now})
	g.mu.Unlock()
	select {
	case g.changed <- struct{}{}:
	default:
	}
}

func (g *termLog) snapshot() []termEvent {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.events)
}

func startElector(t *testing.T, l *pglocks.Locker, key pglocks.Key, name string, g *termLog) *elector {
	ctx, cancel := context.WithCancel(context.Background())
	el := &elector{name: name, l: l, cancel: cancel, done: make(chan error, 1), resign: make(chan struct{}), log: g}
	go func() {
		el.done <- l.Lead(ctx, key, func(ctx context.Context) error {
			el.leading.Store(true)
			g.add(name, true, pglocks.FencingToken(ctx))
			defer func() {
				el.leading.Store(false)
				g.add(name, false, 0)
			}()
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-el.resign:
				return nil
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		<-el.done
	})
	return el
}

func (el *elector) stop(t *testing.T) {
	t.Helper()
	el.cancel()
	select {
	case err := <-el.done:
		wantErr(t, err, context.Canceled)
		el.done <- err // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: Lead did not return within 10 s of its ctx ending", el.name)
	}
}

func leaders(els ...*elector) []string {
	var out []string
	for _, el := range els {
		if el.leading.Load() {
			out = append(out, el.name)
		}
	}
	return out
}

// Two electors: one leads, the other waits; Leader says who, with the
// session's pid, name, address and since when; a resign hands over at once;
// stopping releases; Observe sees each leader; then there is no leader.
func TestLead(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{}) // over TCP, so that ClientAddr shows
	key := pglocks.Name("scheduler")
	for _, d := range drivers {
		t.Run(d.name, func(t *testing.T) {
			ctx := t.Context()
			g := newTermLog()
			la := lockerOn(t, d, fs.URL, pglocks.WithApplicationName("elector-a"))
			lb := lockerOn(t, d, fs.URL, pglocks.WithApplicationName("elector-b"))
			lo := lockerOn(t, d, fs.URL, pglocks.WithHeartbeat(50*time.Millisecond, time.Second))
			octx, ocancel := context.WithCancel(ctx)
			defer ocancel()
			var seen []pglocks.Holder
			var seenMu sync.Mutex
			obsDone := make(chan struct{})
			go func() {
				defer close(obsDone)
				for h := range lo.Observe(octx, key) {
					seenMu.Lock()
					seen = append(seen, h)
					seenMu.Unlock()
				}
			}()

			observed := func(name string) func() bool {
				return func() bool {
					seenMu.Lock()
					defer seenMu.Unlock()
					return len(seen) > 0 && seen[len(seen)-1].ApplicationName == name
				}
			}
			_, err := lo.Leader(ctx, key)
			wantErr(t, err, pglocks.ErrNoLeader)
			waitFor(t, 10*time.Second, "Observe to see no leader first", observed(""))
			before := time.Now()
			a := startElector(t, la, key, "a", g)
			waitFor(t, 10*time.Second, "a to lead", func() bool { return a.leading.Load() })
			waitFor(t, 10*time.Second, "Observe to see a", observed("elector-a"))
			b := startElector(t, lb, key, "b", g)
			waitFor(t, 10*time.Second, "b to campaign", func() bool { return waitedOn(t, fs, key) })
			if got := leaders(a, b); !slices.Equal(got, []string{"a"}) {
				t.Fatalf("leading: %v, want a", got)
			}
			h, err := lo.Leader(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("Leader: %+v", h)
			if int(h.PID) != heldOn(t, fs, key) || h.ApplicationName != "elector-a" {
				t.Errorf("Leader = %+v; want pid %d, elector-a", h, heldOn(t, fs, key))
			}
			if h.ClientAddr == "" || h.BackendStart.IsZero() {
				t.Errorf("Leader = %+v: no client address or backend start", h)
			}
			if h.Since.Before(before.Add(-time.Second)) || h.Since.After(time.Now().Add(time.Second)) {
				t.Errorf("Leader.Since = %v, want between %v and now", h.Since, before)
			}

			// a resigns: b leads at once, a campaigns again.
			a.resign <- struct{}{}
			waitFor(t, 10*time.Second, "b to lead", func() bool { return b.leading.Load() })
			if got := leaders(a, b); !slices.Equal(got, []string{"b"}) {
				t.Fatalf("leading: %v, want b", got)
			}
			hb, err := lo.Leader(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			if hb.ApplicationName != "elector-b" || !hb.Since.After(h.Since) || hb.PID == h.PID {
				t.Errorf("after the resign Leader = %+v (before: %+v)", hb, h)
			}
			waitFor(t, 10*time.Second, "Observe to see b", observed("elector-b"))

			// b stops: a leads again; a stops: nobody leads, nothing is held.
			b.stop(t)
			waitFor(t, 10*time.Second, "a to lead again", func() bool { return a.leading.Load() })
			a.stop(t)
			if got := leaders(a, b); len(got) != 0 {
				t.Fatalf("leading after both stopped: %v", got)
			}
			waitFor(t, 10*time.Second, "no leader", func() bool {
				_, err := lo.Leader(ctx, key)
				return errors.Is(err, pglocks.ErrNoLeader)
			})
			if locks := serverLocks(t, fs); len(locks) != 0 {
				t.Errorf("locks left: %v", locks)
			}
			waitFor(t, 10*time.Second, "Observe to see no leader", func() bool {
				seenMu.Lock()
				defer seenMu.Unlock()
				return len(seen) > 0 && seen[len(seen)-1] == pglocks.Holder{}
			})
			ocancel()
			<-obsDone
			var names []string
			for _, h := range seen {
				names = append(names, h.ApplicationName)
			}
			t.Logf("Observe saw %q", names)
			if len(seen) < 4 || seen[0] != (pglocks.Holder{}) || !slices.Contains(names, "elector-a") || !slices.Contains(names, "elector-b") {
				t.Errorf("Observe saw %q, want none, elector-a, elector-b, ..., none", names)
			}
			// The sessions' own names are back once they leave the Lockers.
			for _, ev := range g.snapshot() {
				if ev.leading > 1 {
					t.Errorf("two leaders at once: %+v", ev)
				}
			}
		})
	}
}

// Three electors; the leader's backend is terminated again and again while
// a monitor checks, continuously, that the server never shows two holders
// and that the electors' own view never has two leaders for longer than it
// takes the old one to hear of its loss (milliseconds: its idle session is
// watched; the heartbeat is set slow so that it cannot be what tells). Each
// term's fencing token is higher than the last. Failover times are logged.
func TestLeadFailover(t *testing.T) {
	t.Parallel()
	fs := pgtest.Local(t, pgtest.Options{})
	key := pglocks.Name("outbox-relay")
	g := newTermLog()
	var els []*elector
	for i, d := range []driver{drivers[0], drivers[1], drivers[0]} {
		name := fmt.Sprintf("e%d-%s", i, d.name)
		l := lockerOn(t, d, fs.URL, pglocks.WithApplicationName(name), pglocks.WithFencingTokens(),
			pglocks.WithHeartbeat(4*time.Second, time.Second))
		els = append(els, startElector(t, l, key, name, g))
	}
	ctx := t.Context()

	// The server's view, sampled continuously.
	var maxHolders atomic.Int32
	mctx, mcancel := context.WithCancel(ctx)
	monitorDone := make(chan struct{})
	go func() {
		defer close(monitorDone)
		for mctx.Err() == nil {
			var n int32
			err := fs.Admin.QueryRow(mctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
				AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1`, mustInt64(key)).Scan(&n)
			if err == nil && n > maxHolders.Load() {
				maxHolders.Store(n)
			}
			time.Sleep(time.Millisecond)
		}
	}()

	const kills = 8
	var failovers []time.Duration
	for range kills {
		waitFor(t, 10*time.Second, "a leader", func() bool { return len(leaders(els...)) == 1 })
		time.Sleep(300 * time.Millisecond)
		h, err := els[0].l.Leader(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		old := leaders(els...)[0]
		n := len(g.snapshot())
		at := time.Now()
		if _, err := fs.Admin.Exec(ctx, "SELECT pg_terminate_backend($1)", h.PID); err != nil {
			t.Fatal(err)
		}
		var next time.Time
		waitFor(t, 10*time.Second, "the next leader", func() bool {
			for _, ev := range g.snapshot()[n:] {
				if ev.start && ev.who != old {
					next = ev.at
					return true
				}
			}
			return false
		})
		failovers = append(failovers, next.Sub(at))
	}
	mcancel()
	<-monitorDone

	if m := maxHolders.Load(); m != 1 {
		t.Errorf("the server showed %d holders at once", m)
	}
	// Overlaps: from a term's start while another is still on, to the end
	// of the other. Only a kill may cause one, and only until the old leader
	// hears of it.
	evs := g.snapshot()
	var lastToken int64
	var overlapStart time.Time
	var overlaps []time.Duration
	for _, ev := range evs {
		if ev.start {
			if ev.token <= lastToken {
				t.Errorf("term of %s has token %d after %d", ev.who, ev.token, lastToken)
			}
			lastToken = ev.token
		}
		switch {
		case ev.leading > 1 && overlapStart.IsZero():
			overlapStart = ev.at
		case ev.leading <= 1 && !overlapStart.IsZero():
			overlaps = append(overlaps, ev.at.Sub(overlapStart))
			if d := ev.at.Sub(overlapStart); d > time.Second {
				t.Errorf("two leaders for %v (the heartbeat is 4 s: the watcher did not tell)", d)
			}
			overlapStart = time.Time{}
		}
	}
	slices.Sort(failovers)
	t.Logf("%d kills; failover (terminate → next leader's fn starts): min %v, median %v, max %v",
		kills, failovers[0].Round(time.Microsecond), failovers[len(failovers)/2].Round(time.Microsecond),
		failovers[len(failovers)-1].Round(time.Microsecond))
	t.Logf("overlaps of two leaders (new started before the old heard): %d, %v", len(overlaps), overlaps)
	for _, f := range failovers {
		if f > 2*time.Second {
			t.Errorf("failover took %v; the next candidate waits in the server's queue", f)
		}
	}
}
