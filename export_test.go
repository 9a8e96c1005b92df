package pglocks

import "time"

// Hooks for the tests of package pglocks_test.

// WaitsForTest returns how many goroutines of l wait for a key: in the
// server's queue on a session of their own, and multiplexed (slot waits
// included).
func WaitsForTest(l *Locker) (server, multiplexed int) {
	s := l.Stat()
	return s.WaitingServer(), s.WaitingMultiplexed()
}

// SessionsForTest returns how many connections l has taken from its pool.
func SessionsForTest(l *Locker) int {
	l.pool.mu.Lock()
	defer l.pool.mu.Unlock()
	return l.pool.st.n
}

// SetPollForTest sets the backoff bounds of l's poller: a test that must see
// a notification at work sets them long.
func SetPollForTest(l *Locker, min, max time.Duration) {
	l.mux.mu.Lock()
	defer l.mux.mu.Unlock()
	l.mux.st.minPoll, l.mux.st.maxPoll = min, max
}
