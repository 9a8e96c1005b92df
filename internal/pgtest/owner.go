package pgtest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The prefixes of the directories that throwaway servers and PgBouncers
// keep their files in, under os.TempDir().
const (
	serverPrefix    = "pglocks-pg-"
	standbyPrefix   = "pglocks-standby-"
	pgbouncerPrefix = "pglocks-pgbouncer-"
)

var dirPrefixes = []string{serverPrefix, standbyPrefix, pgbouncerPrefix}

// ownerFile names the file in a throwaway directory that says which process
// made it, so that a later run can tell when that process is gone without
// having removed it (it was killed with SIGKILL, say).
const ownerFile = "owner"

// owner identifies a process beyond its pid, which the system reuses.
type owner struct {
	pid   int
	start string // when it started: /proc/PID/stat's starttime; "" where unknown
	host  string // os.Hostname
	boot  string // the kernel's boot_id; "" where unknown
	pidns string // the pid namespace its pid means something in; "" where unknown
}

func (o owner) String() string {
	return fmt.Sprintf("pid=%d\nstart=%s\nhost=%s\nboot=%s\npidns=%s\n", o.pid, o.start, o.host, o.boot, o.pidns)
}

// thisProcess is the owner record of this process.
var thisProcess = sync.OnceValue(func() owner {
	host, _ := os.Hostname()
	start, _ := processStart(os.Getpid())
	return owner{pid: os.Getpid(), start: start, host: host, boot: bootID(), pidns: pidNamespace()}
})

// parseOwner reads an owner file; anything but the whole record is an error.
func parseOwner(b []byte) (owner, error) {
	var o owner
	fields := map[string]*string{"start": &o.start, "host": &o.host, "boot": &o.boot, "pidns": &o.pidns}
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok || seen[k] {
			return owner{}, fmt.Errorf("pgtest: owner file: bad line %q", sc.Text())
		}
		seen[k] = true
		if k == "pid" {
			pid, err := strconv.Atoi(v)
			if err != nil || pid <= 0 {
				return owner{}, fmt.Errorf("pgtest: owner file: bad pid %q", v)
			}
			o.pid = pid
		} else if p := fields[k]; p != nil {
			*p = v
		} else {
			return owner{}, fmt.Errorf("pgtest: owner file: unknown key %q", k)
		}
	}
	if len(seen) != len(fields)+1 || !bytes.HasSuffix(b, []byte("\n")) {
		return owner{}, errors.New("pgtest: owner file: incomplete")
	}
	return o, nil
}

// gone reports whether the process o is provably gone, as seen by me. Where
// it cannot tell (another machine sharing the directory, another pid
// namespace, a record or a process it could not read) it says no.
func (o owner) gone(me owner) bool {
	if o.host != me.host {
		return false
	}
	if o.boot != me.boot {
		return o.boot != "" && me.boot != "" // the machine was restarted since
	}
	if o.pidns != me.pidns {
		return false
	}
	start, err := processStart(o.pid)
	if errors.Is(err, fs.ErrNotExist) {
		return true
	}
	// Where start times are unknown (""), a live pid may be the owner.
	return err == nil && start != "" && o.start != "" && start != o.start // the pid is another process's now
}

// newDir makes a throwaway directory in os.TempDir() with prefix, records
// this process as its owner, and gives it to cred's user (if not nil). The
// first time, it removes what processes that died without cleaning up left
// there.
func newDir(prefix string, cred *syscall.Credential) (string, error) {
	removeStaleOnce()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return "", fmt.Errorf("pgtest: %w", err)
	}
	// Written aside and renamed, so that no other process reads half of it.
	tmp := filepath.Join(dir, ownerFile+".new")
	err = os.WriteFile(tmp, []byte(thisProcess().String()), 0o644)
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, ownerFile))
	}
	if err == nil && cred != nil {
		err = os.Chown(dir, int(cred.Uid), int(cred.Gid))
	}
	if err != nil {
		_ = os.RemoveAll(dir)
		return "", fmt.Errorf("pgtest: %w", err)
	}
	return dir, nil
}

var removeStaleOnce = sync.OnceFunc(func() { removeStale(os.TempDir()) })

// removeStale removes the throwaway directories in root whose owner is
// provably gone, after stopping the server or PgBouncer still running from
// one. A directory without a whole owner file (made by an older pgtest, or
// being made right now) is left alone, as is one whose owner may be alive.
// It returns the directories it removed.
func removeStale(root string) []string {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil
	}
	me := thisProcess()
	var removed []string
	for _, e := range entries {
		if !e.IsDir() || !hasDirPrefix(e.Name()) {
			continue
		}
		dir := filepath.Join(root, e.Name())
		b, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue
		}
		o, err := parseOwner(b)
		if err != nil || !o.gone(me) {
			continue
		}
		// The postmaster (and its backends) work in the data directory,
		// PgBouncer in its own: stopProcess checks that the pid is still
		// theirs before it signals it.
		stopProcess(pidFile(filepath.Join(dir, "data", "postmaster.pid")), filepath.Join(dir, "data"), syscall.SIGQUIT)
		stopProcess(pidFile(filepath.Join(dir, "pgbouncer.pid")), dir, syscall.SIGKILL)
		_ = os.RemoveAll(dir)
		removed = append(removed, dir)
	}
	return removed
}

func hasDirPrefix(name string) bool {
	for _, p := range dirPrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// pidFile returns the pid on the first line of a pid file, or 0.
func pidFile(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

// stopProcess sends sig to process pid if it works in directory cwd (so it
// is the server that wrote the pid file, not a process that has its pid
// since), and waits until it is gone, with SIGKILL after 10 s.
func stopProcess(pid int, cwd string, sig syscall.Signal) {
	if pid == 0 || !worksIn(pid, cwd) {
		return
	}
	_ = syscall.Kill(pid, sig)
	if !leaves(pid, cwd, 10*time.Second) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		leaves(pid, cwd, 10*time.Second)
	}
}

// leaves waits at most d until process pid no longer works in cwd (it has
// exited), and reports whether it did.
func leaves(pid int, cwd string, d time.Duration) bool {
	for end := time.Now().Add(d); worksIn(pid, cwd); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			return false
		}
	}
	return true
}
