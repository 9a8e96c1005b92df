package pgtest

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// Local starts a throwaway server from the local installation for t, as
// StartLocal does, and stops it when t ends; it fails t if it cannot.
func Local(t testing.TB, o Options) *Server {
	t.Helper()
	s, err := StartLocal(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Standby starts a streaming standby of the local server s for t, and stops
// it when t ends; it fails t if it cannot.
func (s *Server) Standby(t testing.TB) *Server {
	t.Helper()
	st, err := s.StartStandby()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Stop)
	return st
}

// CheckLeaks is a check for Main: it fails a run whose tests passed but
// left goroutines behind.
func CheckLeaks(code int) int {
	if code != 0 {
		return code
	}
	if err := goleak.Find(); err != nil {
		fmt.Fprintln(os.Stderr, "goroutines left behind:", err)
		return 1
	}
	return code
}
