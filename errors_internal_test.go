package pglocks

import (
	"errors"
	"fmt"
	"testing"
)

// One message per cause: a loss for a session the server ended says so
// once, and matches both sentinels; a classified error is not classified
// again.
func TestErrorTexts(t *testing.T) {
	fatal := fakePgError("57P01", "FATAL", "terminating connection due to administrator command")
	k := ID(42)
	tests := []struct {
		name  string
		err   error
		want  string
		match []error
	}{
		{"loss, ended", lossError(k, endedError{fatal}),
			"pglocks: lock 42: lock lost: its server session ended: " + fatal.Error(),
			[]error{ErrLockLost, ErrSessionEnded}},
		{"loss, heartbeat", lossError(k, sessionEnded(errors.New("heartbeat: timeout"))),
			"pglocks: lock 42: lock lost: its server session ended: heartbeat: timeout",
			[]error{ErrLockLost}},
		{"loss, heartbeat FATAL", lossError(k, sessionEnded(fmt.Errorf("heartbeat: %w", fatal))),
			"pglocks: lock 42: lock lost: its server session ended: heartbeat: " + fatal.Error(),
			[]error{ErrLockLost, ErrSessionEnded}},
		{"wait, ended", lockError(k, classify(fatal)),
			"pglocks: lock 42: the server session ended: " + fatal.Error(),
			[]error{ErrSessionEnded}},
		{"deadlock, twice", lockError(k, classify(classify(fakePgError("40P01", "ERROR", "deadlock detected")))),
			"pglocks: lock 42: deadlock detected by the server: ERROR: deadlock detected (SQLSTATE 40P01)",
			[]error{ErrDeadlock}},
		{"ended, twice", lockError(k, classify(sessionEnded(fatal))),
			"pglocks: lock 42: the server session ended: " + fatal.Error(),
			[]error{ErrSessionEnded}},
		{"granted as it ended", lockError(k, errSessionGone),
			"pglocks: lock 42: lock lost: its server session ended as it was granted",
			[]error{ErrLockLost}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("got  %s\nwant %s", got, tt.want)
			}
			for _, m := range tt.match {
				if !errors.Is(tt.err, m) {
					t.Errorf("does not match %v", m)
				}
			}
			if errors.Is(tt.err, ErrLockLost) != (tt.match[0] == ErrLockLost) {
				t.Errorf("matches ErrLockLost: %v", errors.Is(tt.err, ErrLockLost))
			}
		})
	}
}
