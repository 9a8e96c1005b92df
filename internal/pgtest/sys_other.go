//go:build !linux

package pgtest

import (
	"fmt"
	"io/fs"
	"syscall"
)

// processStart returns "" for a process that exists (the start time is
// unknown here), and an error that is fs.ErrNotExist if there is no process
// pid.
func processStart(pid int) (string, error) {
	if err := syscall.Kill(pid, 0); err == syscall.ESRCH {
		return "", fmt.Errorf("pgtest: no process %d: %w", pid, fs.ErrNotExist)
	}
	return "", nil
}

// bootID is unknown here.
func bootID() string { return "" }

// pidNamespace is unknown here.
func pidNamespace() string { return "" }

// worksIn cannot tell here whether process pid works in dir, so it says no:
// a server whose directory is removed stops within a minute by itself
// (PostgreSQL checks its postmaster.pid).
func worksIn(pid int, dir string) bool { return false }

// process is a running process, as processesIn lists it.
type process struct {
	pid  int
	name string
	cwd  string
}

func (p process) String() string { return fmt.Sprintf("pid %d (%s) in %s", p.pid, p.name, p.cwd) }

// processesIn cannot list processes by working directory here.
func processesIn(root string) []process { return nil }

// brokenOutput cannot tell a broken stdout here: it says -1, so that a
// SIGPIPE only makes the write fail with EPIPE.
func brokenOutput() int { return -1 }

// childAttr is how PgBouncer starts: as cred's user (if not nil).
func childAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	if cred == nil {
		return nil
	}
	return &syscall.SysProcAttr{Credential: cred}
}
