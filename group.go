package pglocks

// group.go: the count of a Locker's background goroutines, which refuses
// new ones once the Locker closes.

import "sync"

// group counts a Locker's background goroutines (the heartbeat and its
// probes, watchers, the poller, Observe), so that Close can wait for them,
// and refuses to start new ones once closed: whoever starts one while the
// Locker may be closing asks start, and is refused after close, so that no
// goroutine begins after Close has begun to wait.
type group struct {
	mu     sync.Mutex
	closed bool // guarded by mu
	wg     sync.WaitGroup
}

// start counts a goroutine about to start, unless the group is closed.
func (g *group) start() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Add(1)
	return true
}

// add counts a goroutine that a counted one starts: it may be called after
// close, since the counter cannot reach zero meanwhile.
func (g *group) add() { g.wg.Add(1) }

// done ends what start or add counted.
func (g *group) done() { g.wg.Done() }

// close refuses new goroutines from now on.
func (g *group) close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = true
}

// isClosed reports whether close was called.
func (g *group) isClosed() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closed
}

// wait waits for every goroutine counted.
func (g *group) wait() { g.wg.Wait() }
