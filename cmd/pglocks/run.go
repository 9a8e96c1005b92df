package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglocks/pglocks"
)

const runHead = `Usage: pglocks run [flags] NAME -- COMMAND [ARG...]

Takes the advisory lock NAME, runs COMMAND, and releases the lock when
COMMAND exits, like flock(1) for a whole fleet. With --slots N it takes any
one of N slots of NAME instead, so that at most N run at once (consul lock
-n); with --min-hold D it keeps the lock until D after it was taken, even
when COMMAND exits sooner, so that a job runs once per window across
machines whose clocks differ (a signal, to COMMAND or during the rest of the
hold, ends the hold when COMMAND has exited). While it waits it says who
holds the lock. SIGINT, SIGTERM and SIGHUP go to COMMAND. If the lock is lost
while COMMAND runs, COMMAND gets SIGTERM, then SIGKILL after --kill-after.

Flags go before NAME. Exit status: COMMAND's own (128+N if killed by signal
N); -E's value (1) when the lock was not had (-n, -w, or the server ended the
wait); 2 usage; 3 database unreachable, failing or a standby; 4 lock lost
while COMMAND ran; 126 COMMAND exists but cannot run; 127 COMMAND not found.
`

// runCommand is "pglocks run".
func runCommand(args []string, stdin *os.File, stdout, stderr io.Writer) int {
	fs := flagSet("run", runHead, stderr)
	var (
		shared, noWait, quiet       bool
		timeout, killAfter, minHold time.Duration
		conflictCode, slots         int
		scheme, dsn                 string
	)
	for _, n := range []string{"s", "shared"} {
		fs.BoolVar(&shared, n, false, "take the lock in shared mode")
	}
	for _, n := range []string{"n", "no-wait"} {
		fs.BoolVar(&noWait, n, false, "fail at once if the lock is held")
	}
	for _, n := range []string{"w", "timeout"} {
		fs.DurationVar(&timeout, n, 0, "give up waiting after this long (e.g. 30s; 0 waits for ever)")
	}
	for _, n := range []string{"E", "conflict-exit-code"} {
		fs.IntVar(&conflictCode, n, exitConflict, "exit status `N` when the lock is not had")
	}
	oneKeyFlag(fs, &scheme)
	dsnFlag(fs, &dsn)
	for _, n := range []string{"q", "quiet"} {
		fs.BoolVar(&quiet, n, false, "say nothing but errors: not who holds the lock while waiting, nor that it was not acquired (-E's outcome), nor the minimum hold")
	}
	fs.DurationVar(&killAfter, "kill-after", 10*time.Second, "after the lock is lost, SIGKILL COMMAND this long after SIGTERM")
	fs.IntVar(&slots, "slots", 0, "take any one of `N` slots of NAME: at most N holders at once (0: NAME itself)")
	fs.DurationVar(&minHold, "min-hold", 0, "keep the lock until this long after it was taken, even when COMMAND exits sooner")
	if code := parseFlags(fs, args, stdout); code >= 0 {
		return code
	}
	name, argv, code := nameAndCommand("run", fs, args, scheme, stderr)
	if code >= 0 {
		return code
	}
	switch {
	case timeout < 0 || killAfter <= 0:
		return usageError(stderr, "run", "--timeout and --kill-after must be positive")
	case conflictCode < 0 || conflictCode > 255:
		return usageError(stderr, "run", "-E must be 0..255")
	case slots < 0 || slots > pglocks.MaxSlots:
		return usageError(stderr, "run", "--slots must be 1..%d", pglocks.MaxSlots)
	case slots > 0 && shared:
		return usageError(stderr, "run", "--slots and --shared cannot be combined: a slot is taken exclusively")
	case minHold < 0:
		return usageError(stderr, "run", "--min-hold must be positive")
	}
	cfg, err := poolConfig(dsn)
	if err != nil {
		return usageError(stderr, "run", "%v", err)
	}
	key, err := parseKey(scheme, orDatabase(scheme, name, cfg))
	if err != nil {
		return usageError(stderr, "run", "%v", err)
	}
	if migrationSchemes[scheme] {
		// What run says it waits for: "goose migrations", ...
		name, _ = pglocks.MigrationLabel(key, orDatabase(scheme, name, cfg))
	}
	path, code := lookCommand("run", argv[0], stderr)
	if code >= 0 {
		return code
	}

	// Signals: before COMMAND starts they stop the wait; afterwards they go
	// to COMMAND.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)

	host, _ := os.Hostname()
	app := appName("run", name, host, os.Getpid(), maxAppName)
	_, locker, closeAll, code := openLocker(ctx, "run", cfg, 4, stderr, pglocks.WithApplicationName(app))
	if code >= 0 {
		return code
	}
	defer closeAll()

	var opts []pglocks.LockOption
	if shared {
		opts = append(opts, pglocks.Shared())
	}
	watched := []pglocks.Key{key} // whose holders it names
	if slots > 0 {
		opts = append(opts, pglocks.Slots(slots))
		watched = watched[:0]
		for i := range slots {
			watched = append(watched, key.Slot(i))
		}
	}
	shown := name
	if slots > 0 {
		shown = fmt.Sprintf("%s (%d slots)", name, slots)
	}
	lk, code := acquire(ctx, cancel, sigs, locker, key, watched, shown, opts, noWait, timeout, quiet, stderr)
	if lk == nil {
		if code < 0 {
			return conflictCode
		}
		return code
	}
	taken := time.Now()
	defer lk.Release(context.Background())
	e := runChild(path, argv, stdin, stdout, stderr, child{
		prog: "run", lost: lk.Done(), why: lk.Err, what: "lock of " + name, sigs: sigs, killAfter: killAfter,
	})
	if !e.lost && !e.signalled && minHold > 0 {
		holdOn(lk, name, taken.Add(minHold), sigs, quiet, stderr)
	}
	return e.code
}

// holdOn keeps lk until until (--min-hold), unless it is lost or a signal
// comes first.
func holdOn(lk *pglocks.Lock, name string, until time.Time, sigs <-chan os.Signal, quiet bool, stderr io.Writer) {
	left := time.Until(until)
	if left <= 0 {
		return
	}
	if !quiet {
		fmt.Fprintf(stderr, "pglocks run: holding %s for %v more (--min-hold)\n", name, left.Round(time.Millisecond))
	}
	t := time.NewTimer(left)
	defer t.Stop()
	select {
	case <-t.C:
	case <-lk.Done():
		fmt.Fprintf(stderr, "pglocks run: lock of %s lost during --min-hold: %s\n", name, lossReason(lk.Err()))
	case s := <-sigs:
		fmt.Fprintf(stderr, "pglocks run: %v during --min-hold; letting %s go\n", s, name)
	}
}

// acquire takes the lock, telling stderr who holds keys (key, or its slots)
// while it waits. It returns the lock, or nil and the exit status.
func acquire(ctx context.Context, cancel context.CancelCauseFunc, sigs chan os.Signal, locker *pglocks.Locker,
	key pglocks.Key, keys []pglocks.Key, name string, opts []pglocks.LockOption, noWait bool, timeout time.Duration, quiet bool,
	stderr io.Writer) (*pglocks.Lock, int) {
	type result struct {
		lk  *pglocks.Lock
		err error
	}
	lctx := ctx
	if timeout > 0 {
		var c context.CancelFunc
		lctx, c = context.WithTimeout(ctx, timeout)
		defer c()
	}
	res := make(chan result, 1)
	go func() {
		var r result
		if noWait {
			r.lk, r.err = locker.TryLock(lctx, key, opts...)
		} else {
			r.lk, r.err = locker.Lock(lctx, key, opts...)
		}
		res <- r
	}()
	status := &holderStatus{w: stderr, tty: isTerminal(os.Stderr) && stderr == io.Writer(os.Stderr), name: name, began: time.Now()}
	tick := time.NewTimer(300 * time.Millisecond) // a quick grant needs no word
	defer tick.Stop()
	var sig os.Signal
	for {
		select {
		case r := <-res:
			status.done()
			switch {
			case sig != nil:
				// Said before COMMAND started: it is not started, even
				// if the lock came as the wait was being stopped.
				if r.err == nil {
					_ = r.lk.Release(context.Background())
				}
				fmt.Fprintf(stderr, "pglocks run: %v while waiting for %s; gave up\n", sig, name)
				return nil, 128 + int(sig.(syscall.Signal))
			case r.err == nil:
				return r.lk, 0
			case errors.Is(r.err, pglocks.ErrLocked) || errors.Is(r.err, context.DeadlineExceeded):
				// The conflict is the outcome -E names, said only without -q.
				if !quiet {
					fmt.Fprintf(stderr, "pglocks run: %s is held%s; not acquired\n", name, holders(locker, keys))
				}
				return nil, -1 // the caller's conflict code
			case errors.Is(r.err, pglocks.ErrServerTimeout):
				// Not had, as on a timeout of our own (-w), though the
				// server ended the wait: say why.
				if !quiet {
					fmt.Fprintf(stderr, "pglocks run: %s is held%s; not acquired: %s\n", name, holders(locker, keys), from(r.err, pglocks.ErrServerTimeout))
				}
				return nil, -1
			}
			fmt.Fprintf(stderr, "pglocks run: %s\n", libError(r.err))
			return nil, exitDatabase
		case s := <-sigs:
			sig = s
			cancel(fmt.Errorf("%v", s))
		case <-tick.C:
			if !quiet {
				status.show(holders(locker, keys))
			}
			tick.Reset(time.Second)
		}
	}
}

// holders describes who holds keys (the key, or its slots), as ", by pid
// 123 (app) from 10.0.0.1, connected at 14:03:05", or "" if that cannot be
// told. It changes only when the holders do.
func holders(locker *pglocks.Locker, keys []pglocks.Key) string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var hs []pglocks.Holder
	for _, key := range keys {
		h, err := locker.Holders(ctx, key)
		if err != nil {
			return ""
		}
		hs = append(hs, h...)
	}
	if len(hs) == 0 {
		return ""
	}
	var parts []string
	for _, h := range hs {
		app, client := h.ApplicationName, "a local socket"
		if app == "" {
			app = "no application_name"
		}
		if host, _, err := net.SplitHostPort(h.ClientAddr); err == nil {
			client = host
		}
		parts = append(parts, fmt.Sprintf("pid %d (%s) from %s, connected at %s", h.PID, app, client, clock(h.BackendStart)))
	}
	return " by " + strings.Join(parts, "; ")
}

// clock is t as a waiting line shows it: the time of day, with the date
// when it is not today.
func clock(t time.Time) string {
	t = t.Local()
	if y, m, d := t.Date(); time.Now().Year() == y && time.Now().Month() == m && time.Now().Day() == d {
		return t.Format(time.TimeOnly)
	}
	return t.Format(time.DateTime)
}

// quietFor is how long a waiting line stays the last one printed, when
// stderr is not a terminal, before a change of holders is printed.
const quietFor = 10 * time.Second

// holderStatus keeps one line on stderr current while waiting. On a
// terminal it is rewritten in place, with the time waited; otherwise it is
// printed again only when who holds the lock changes, and at most once per
// quietFor, so that a long wait is a few lines in a log.
type holderStatus struct {
	w       io.Writer
	tty     bool
	name    string
	began   time.Time
	shown   string    // the last line printed
	printed time.Time // when
}

func (s *holderStatus) show(by string) {
	line := fmt.Sprintf("pglocks run: waiting for %s, held%s", s.name, by)
	if by == "" {
		line = fmt.Sprintf("pglocks run: waiting for %s", s.name)
	}
	switch {
	case s.tty:
		fmt.Fprintf(s.w, "\r\033[K%s (%v)", line, time.Since(s.began).Round(time.Second))
		s.shown = line
	case line != s.shown && (s.shown == "" || time.Since(s.printed) >= quietFor):
		fmt.Fprintln(s.w, line)
		s.shown, s.printed = line, time.Now()
	}
}

func (s *holderStatus) done() {
	if s.tty && s.shown != "" {
		fmt.Fprint(s.w, "\r\033[K")
	}
}

// child says how runChild runs COMMAND.
type child struct {
	prog      string          // "run" or "elect", for messages
	lost      <-chan struct{} // closed if the lock (or leadership) is lost
	why       func() error    // why it was lost
	what      string          // "lock of NAME" or "leadership of NAME"
	sigs      <-chan os.Signal
	killAfter time.Duration
}

// exited is how COMMAND ended.
type exited struct {
	code      int    // the exit status to give: COMMAND's, 128+N for signal N, or exitLost
	signalled bool   // a signal of ours was forwarded to COMMAND
	lost      bool   // the lock (or leadership) was lost while it ran
	how       string // "exited with status 3", "was killed by signal 15 (terminated)"
}

// runChild runs COMMAND while a lock is held, forwards signals to it, and
// stops it if the lock is lost, saying so in one line.
func runChild(path string, argv []string, stdin *os.File, stdout, stderr io.Writer, c child) exited {
	cmd := exec.Command(path, argv[1:]...)
	cmd.Args[0] = argv[0]
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, stdout, stderr
	// Unless COMMAND shares our terminal, it gets a process group of its
	// own: signals reach it only through us, once.
	interactive := isTerminal(stdin)
	cmd.SysProcAttr = childAttr(!interactive)
	runtime.LockOSThread() // Pdeathsig follows the thread that starts COMMAND
	defer runtime.UnlockOSThread()
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(stderr, "pglocks %s: %s: %v\n", c.prog, argv[0], err)
		return exited{code: exitCannotRun, how: "could not start"}
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var e exited
	lostCh := c.lost
	var kill <-chan time.Time
	for {
		select {
		case s := <-c.sigs:
			e.signalled = true
			if interactive && s == syscall.SIGINT {
				continue // the terminal sent it to COMMAND too
			}
			_ = cmd.Process.Signal(s)
		case <-lostCh:
			lostCh = nil
			e.lost = true
			fmt.Fprintf(stderr, "pglocks %s: %s lost while %s ran: %s; sending SIGTERM, SIGKILL in %v\n",
				c.prog, c.what, argv[0], lossReason(c.why()), c.killAfter)
			_ = cmd.Process.Signal(syscall.SIGTERM)
			kill = time.After(c.killAfter)
		case <-kill:
			fmt.Fprintf(stderr, "pglocks %s: %s did not stop; sending SIGKILL\n", c.prog, argv[0])
			_ = cmd.Process.Kill()
		case err := <-done:
			var ee *exec.ExitError
			switch {
			case errors.As(err, &ee):
				e.code, e.how = ee.ExitCode(), fmt.Sprintf("exited with status %d", ee.ExitCode())
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					e.code = 128 + int(ws.Signal())
					e.how = fmt.Sprintf("was killed by signal %d (%v)", int(ws.Signal()), ws.Signal())
				}
			case err != nil:
				fmt.Fprintf(stderr, "pglocks %s: %v\n", c.prog, err)
				e.code, e.how = exitCannotRun, err.Error()
			default:
				e.how = "exited with status 0"
			}
			if e.lost {
				e.code = exitLost
			}
			return e
		}
	}
}

// from is err's text on one line from sentinel's on, for a line that names
// the lock already: "the server ended the wait: lock_timeout expired: …".
func from(err, sentinel error) string {
	s := oneLine(err)
	if i := strings.Index(s, sentinel.Error()); i >= 0 {
		return s[i:]
	}
	return libError(err)
}

// libError is the library's err on one line of the tool's, without the
// "pglocks: " that the line starts with already.
func libError(err error) string {
	return strings.TrimPrefix(oneLine(err), "pglocks: ")
}

// lossReason is why a lock was lost, in a few words for a line of the
// tool's own, which names the lock already: "its server session ended
// (FATAL: terminating connection due to administrator command)".
func lossReason(err error) string {
	if err == nil {
		return "lost"
	}
	s := oneLine(err)
	lost := pglocks.ErrLockLost.Error()
	i := strings.Index(s, lost)
	if i < 0 {
		if j := strings.Index(s, "pglocks: lock "); j >= 0 {
			s = s[j:]
		}
		return s
	}
	why := "its server session ended"
	detail := strings.TrimPrefix(s[i+len(lost):], ": ")
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		detail = pe.Severity + ": " + pe.Message
	}
	if detail != "" {
		why += " (" + detail + ")"
	}
	return why
}
