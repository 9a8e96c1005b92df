package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/pglocks/pglocks"
)

const electHead = `Usage: pglocks elect [flags] NAME -- COMMAND [ARG...]

Campaigns for the leadership of NAME among all the processes that run
'pglocks elect NAME' against the database, and runs COMMAND while this one
leads. Candidates wait in the server's lock queue: the one that waited
longest is elected the moment the leader lets go. If leadership is lost
while COMMAND runs, COMMAND gets SIGTERM, then SIGKILL after --kill-after.
SIGINT, SIGTERM and SIGHUP go to COMMAND if it runs, and end the campaign.

Without --restart it leads once: it exits when COMMAND exits, with COMMAND's
status, or with 4 if leadership was lost. With --restart it campaigns again
after a loss, or after COMMAND exits (no sooner than a second after the
term began, and a second later if COMMAND failed), until a signal stops it. 'pglocks leader NAME' tells who leads.

Exit status: COMMAND's own (128+N if killed by signal N); 128+N if signal N
ended the campaign; 2 usage; 3 database unreachable or unsuitable; 4
leadership lost while COMMAND ran; 126 COMMAND cannot run; 127 COMMAND not
found.
`

// electCommand is "pglocks elect".
func electCommand(args []string, stdin *os.File, stdout, stderr io.Writer) int {
	fs := flagSet("elect", electHead, stderr)
	var (
		restart, quiet, verbose bool
		killAfter               time.Duration
		scheme, dsn             string
	)
	fs.BoolVar(&restart, "restart", false, "campaign again after COMMAND exits or leadership is lost")
	oneKeyFlag(fs, &scheme)
	dsnFlag(fs, &dsn)
	for _, n := range []string{"q", "quiet"} {
		fs.BoolVar(&quiet, n, false, "say nothing but errors and losses: not who leads, nor when this process is elected or campaigns again")
	}
	for _, n := range []string{"v", "verbose"} {
		fs.BoolVar(&verbose, n, false, "also log what the library does (elections, retries, lost sessions), as key=value lines")
	}
	fs.DurationVar(&killAfter, "kill-after", 10*time.Second, "after leadership is lost, SIGKILL COMMAND this long after SIGTERM")
	if code := parseFlags(fs, args, stdout); code >= 0 {
		return code
	}
	name, argv, code := nameAndCommand("elect", fs, args, scheme, stderr)
	if code >= 0 {
		return code
	}
	if killAfter <= 0 {
		return usageError(stderr, "elect", "--kill-after must be positive")
	}
	cfg, err := poolConfig(dsn)
	if err != nil {
		return usageError(stderr, "elect", "%v", err)
	}
	key, err := parseKey(scheme, orDatabase(scheme, name, cfg))
	if err != nil {
		return usageError(stderr, "elect", "%v", err)
	}
	path, code := lookCommand("elect", argv[0], stderr)
	if code >= 0 {
		return code
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	host, _ := os.Hostname()
	// Lead adds the time of the election after it.
	app := appName("elect", name, host, os.Getpid(), maxLeaderAppName)
	opts := []pglocks.Option{pglocks.WithApplicationName(app)}
	if verbose {
		// The tool says what matters in lines of its own; the library's
		// log is for finding out why.
		opts = append(opts, pglocks.WithLogger(slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	}
	_, locker, closeAll, code := openLocker(ctx, "elect", cfg, 4, stderr, opts...)
	if code >= 0 {
		return code
	}
	defer closeAll()

	// Signals end the campaign, or go to COMMAND while it runs.
	var (
		mu       sync.Mutex
		toChild  chan os.Signal // set while COMMAND runs
		stopping os.Signal
	)
	go func() {
		for s := range sigs {
			mu.Lock()
			stopping = s
			if toChild != nil {
				select {
				case toChild <- s:
				default: // COMMAND has signals enough to act on
				}
			} else {
				cancel()
			}
			mu.Unlock()
		}
	}()
	defer func() {
		signal.Stop(sigs)
		close(sigs)
	}()

	if !quiet {
		go func() {
			for h := range locker.Observe(ctx, key) {
				if h.PID != 0 && h.ApplicationName != app {
					fmt.Fprintf(stderr, "pglocks elect: %s is led by %s; waiting\n", name, describeHolder(h))
				}
			}
		}()
	}

	result := -1 // COMMAND's status, once the campaign ends after it
	leadErr := locker.Lead(ctx, key, func(lctx context.Context) error {
		mu.Lock()
		if stopping != nil {
			mu.Unlock()
			cancel()
			return nil
		}
		toChild = make(chan os.Signal, 4)
		ch := toChild
		mu.Unlock()
		if !quiet {
			fmt.Fprintf(stderr, "pglocks elect: elected for %s; running %s\n", name, argv[0])
		}
		e := runChild(path, argv, stdin, stdout, stderr, child{
			prog: "elect", lost: lctx.Done(), why: func() error { return context.Cause(lctx) }, what: "leadership of " + name,
			sigs: ch, killAfter: killAfter,
		})
		mu.Lock()
		toChild = nil
		signalled := e.signalled || stopping != nil
		mu.Unlock()
		switch {
		case signalled || !restart:
			result = e.code
			cancel()
			return nil
		case e.lost:
			// Said when it happened; Lead campaigns again at once.
			if !quiet {
				fmt.Fprintf(stderr, "pglocks elect: %s %s; campaigning again\n", argv[0], e.how)
			}
			return nil
		case e.code != 0:
			// Lead resigns and campaigns again a second later.
			if !quiet {
				fmt.Fprintf(stderr, "pglocks elect: %s %s; resigned, campaigning again in 1s\n", argv[0], e.how)
			}
			return fmt.Errorf("%s %s", argv[0], e.how)
		}
		if !quiet {
			fmt.Fprintf(stderr, "pglocks elect: %s exited; resigned, campaigning again\n", argv[0])
		}
		return nil
	})
	mu.Lock()
	sig := stopping
	mu.Unlock()
	switch {
	case result >= 0:
		return result
	case sig != nil:
		fmt.Fprintf(stderr, "pglocks elect: %v while campaigning; stopped\n", sig)
		return 128 + int(sig.(syscall.Signal))
	}
	fmt.Fprintf(stderr, "pglocks elect: %s\n", libError(leadErr))
	return exitDatabase
}

// describeHolder is h on one line: "pid 123 (app) from 10.0.0.1:5000, since
// 15:04:05 (5m3s ago)".
func describeHolder(h pglocks.Holder) string {
	s := fmt.Sprintf("pid %d", h.PID)
	if h.ApplicationName != "" {
		s += " (" + h.ApplicationName + ")"
	}
	if h.ClientAddr != "" {
		s += " from " + h.ClientAddr
	} else {
		s += " on a local socket"
	}
	if !h.Since.IsZero() {
		s += fmt.Sprintf(", leading since %s (%v ago)", h.Since.Local().Format(time.DateTime), time.Since(h.Since).Round(time.Second))
	}
	return s
}

const leaderHead = `Usage: pglocks leader [flags] NAME

Tells which session leads NAME (holds its lock exclusively): its server
pid, application_name, client address and, for a 'pglocks elect' or a Go
program's Lead, since when.

Exit status: 0 when a session leads; 1 when none does; 2 usage; 3 database
unreachable, failing or a standby (whose pg_locks does not show the
primary's locks).
`

// leaderCommand is "pglocks leader".
func leaderCommand(args []string, stdout, stderr io.Writer) int {
	fs := flagSet("leader", leaderHead, stderr)
	var (
		asJSON      bool
		scheme, dsn string
	)
	oneKeyFlag(fs, &scheme)
	dsnFlag(fs, &dsn)
	fs.BoolVar(&asJSON, "json", false, "print JSON")
	if code := parseFlags(fs, args, stdout); code >= 0 {
		return code
	}
	if fs.NArg() != 1 {
		return usageError(stderr, "leader", "want one NAME")
	}
	name := fs.Arg(0)
	key, err := parseKey(scheme, name)
	if err != nil {
		return usageError(stderr, "leader", "%v", err)
	}
	cfg, err := poolConfig(dsn)
	if err != nil {
		return usageError(stderr, "leader", "%v", err)
	}
	ctx := context.Background()
	_, locker, closeAll, code := openLocker(ctx, "leader", cfg, 1, stderr)
	if code >= 0 {
		return code
	}
	defer closeAll()
	h, err := locker.Leader(ctx, key)
	switch {
	case errors.Is(err, pglocks.ErrNoLeader):
		if asJSON {
			fmt.Fprintln(stdout, "null")
		} else {
			fmt.Fprintf(stdout, "%s has no leader\n", name)
		}
		return exitConflict
	case errors.Is(err, pglocks.ErrStandby):
		fmt.Fprintf(stderr, "pglocks leader: this server is a standby: its pg_locks does not show the primary's locks; ask the primary\n")
		return exitDatabase
	case err != nil:
		fmt.Fprintf(stderr, "pglocks leader: %s\n", libError(err))
		return exitDatabase
	}
	if asJSON {
		type out struct {
			Name            string     `json:"name"`
			Key             string     `json:"key"`
			PID             int32      `json:"pid"`
			ApplicationName string     `json:"application_name"`
			ClientAddr      string     `json:"client_addr,omitempty"`
			BackendStart    time.Time  `json:"backend_start"`
			Since           *time.Time `json:"since,omitempty"`
		}
		o := out{Name: name, Key: key.String(), PID: h.PID, ApplicationName: h.ApplicationName,
			ClientAddr: h.ClientAddr, BackendStart: h.BackendStart}
		if !h.Since.IsZero() {
			o.Since = &h.Since
		}
		enc := json.NewEncoder(stdout)
		enc.SetEscapeHTML(false)
		_ = enc.Encode(o)
		return 0
	}
	fmt.Fprintf(stdout, "%s is led by %s\n", name, describeHolder(h))
	return 0
}
