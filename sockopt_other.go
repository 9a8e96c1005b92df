//go:build !linux

package pglocks

import (
	"net"
	"time"
)

// setUserTimeout does nothing where TCP_USER_TIMEOUT is not available; the
// keepalive settings still bound how long a silent peer goes unnoticed.
func setUserTimeout(*net.TCPConn, time.Duration) error { return nil }
