package pgtest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// processStart returns when process pid started (clock ticks after boot),
// or an error that is fs.ErrNotExist if there is no such process or it has
// exited (a zombie its parent has not reaped yet).
func processStart(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if errors.Is(err, fs.ErrNotExist) && syscall.Kill(pid, 0) != syscall.ESRCH {
		// /proc hides other users' processes when mounted with hidepid.
		return "", fmt.Errorf("pgtest: process %d exists, but not in /proc", pid)
	}
	if err != nil {
		return "", err
	}
	// "pid (comm) state ppid ...": comm may hold spaces and parentheses.
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 20 {
		return "", fmt.Errorf("pgtest: /proc/%d/stat: %q", pid, s)
	}
	if fields[0] == "Z" || fields[0] == "X" {
		return "", fmt.Errorf("pgtest: process %d has exited: %w", pid, fs.ErrNotExist)
	}
	return fields[19], nil
}

// bootID tells this boot of the machine from the others.
func bootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}

// pidNamespace names the pid namespace that this process's pids are of.
func pidNamespace() string {
	ns, _ := os.Readlink("/proc/self/ns/pid")
	return ns
}

// worksIn reports whether process pid's working directory is dir.
func worksIn(pid int, dir string) bool {
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	if err != nil {
		return false
	}
	real, err := filepath.EvalSymlinks(dir)
	return err == nil && strings.TrimSuffix(cwd, " (deleted)") == real
}

// process is a running process, as processesIn lists it.
type process struct {
	pid  int
	name string // its command name
	cwd  string // its working directory, " (deleted)" if removed
}

func (p process) String() string { return fmt.Sprintf("pid %d (%s) in %s", p.pid, p.name, p.cwd) }

// processesIn lists the processes that work in root or below it, as the
// servers and PgBouncers do in their directories.
func processesIn(root string) []process {
	real, err := filepath.EvalSymlinks(root)
	if err != nil {
		return nil
	}
	entries, _ := os.ReadDir("/proc")
	var ps []process
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
		if err != nil {
			continue // gone, or a zombie
		}
		if c := strings.TrimSuffix(cwd, " (deleted)"); c != real && !strings.HasPrefix(c, real+"/") {
			continue
		}
		name, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		ps = append(ps, process{pid: pid, name: strings.TrimSpace(string(name)), cwd: cwd})
	}
	return ps
}

// brokenOutput returns 1 or 2 if standard output or standard error is a
// pipe (or socket) whose reader has gone, and -1 if neither is.
func brokenOutput() int {
	for _, fd := range []int{1, 2} {
		if broken(fd) {
			return fd
		}
	}
	return -1
}

// broken reports whether a write to fd would fail with EPIPE: epoll says
// EPOLLERR for a pipe without readers and EPOLLHUP for a closed socket.
func broken(fd int) bool {
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return false
	}
	defer syscall.Close(ep)
	ev := syscall.EpollEvent{Events: syscall.EPOLLOUT, Fd: int32(fd)}
	if err := syscall.EpollCtl(ep, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return false // a regular file, /dev/null: no reader to lose
	}
	evs := make([]syscall.EpollEvent, 1)
	n, err := syscall.EpollWait(ep, evs, 0)
	return err == nil && n == 1 && evs[0].Events&(syscall.EPOLLERR|syscall.EPOLLHUP) != 0
}

// childAttr is how PgBouncer starts: as cred's user (if not nil), and
// killed if the thread that starts it ends, which pgtest makes last as long
// as the process (so that a test run killed with SIGKILL does not leave it
// running).
func childAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL}
}
