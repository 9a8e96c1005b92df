package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglocks/pglocks"
)

// Exit statuses.
const (
	exitConflict   = 1 // the lock was not had (-n, -w); -E changes it
	exitUsage      = 2
	exitDatabase   = 3 // cannot connect, or the server failed
	exitLost       = 4 // the lock was lost while COMMAND ran
	exitNoneEnded  = 1 // kill: no session was ended (none held NAME, or the answer was no)
	exitNotAllowed = 5 // kill: the role may not end a session (it lacks pg_signal_backend)
	exitCannotRun  = 126
	exitNotFound   = 127
)

const usage = `Usage:
  pglocks run [flags] NAME -- COMMAND [ARG...]   run COMMAND while holding the lock NAME
  pglocks elect [flags] NAME -- COMMAND [ARG...] run COMMAND while this process leads NAME
  pglocks leader [flags] NAME                    tell who leads NAME
  pglocks ls [flags]                             list the advisory locks in the database
  pglocks kill [flags] NAME | --pid PID          end the sessions that hold NAME
  pglocks key [-k SCHEME] [--slots N] [--json] NAME
                                                 print NAME's key and the SQL that takes it
  pglocks version                                print the version

Run 'pglocks COMMAND --help' for a command's flags. The database is -d/--dsn,
else DATABASE_URL, else the usual PGHOST, PGPORT, PGUSER, PGDATABASE, ...
`

const versionHead = `Usage: pglocks version

Prints pglocks' version: the module version it was built from, or (devel)
for a build from a source tree.
`

// cli runs pglocks with args and returns its exit status.
func cli(args []string, stdin *os.File, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "run":
		return runCommand(args[1:], stdin, stdout, stderr)
	case "elect":
		return electCommand(args[1:], stdin, stdout, stderr)
	case "leader":
		return leaderCommand(args[1:], stdout, stderr)
	case "ls":
		return lsCommand(args[1:], stdout, stderr)
	case "kill":
		return killCommand(args[1:], stdin, stdout, stderr)
	case "key":
		return keyCommand(args[1:], stdout, stderr)
	case "version", "--version":
		switch {
		case len(args) > 1 && (args[1] == "-h" || args[1] == "--help" || args[1] == "-help"):
			fmt.Fprint(stdout, versionHead)
			return 0
		case len(args) > 1:
			return usageError(stderr, "version", "takes no arguments, got %q", args[1])
		}
		v := "(devel)"
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
			v = bi.Main.Version
		}
		fmt.Fprintf(stdout, "pglocks %s\n", v)
		return 0
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "pglocks: unknown command %q\n%s", args[0], usage)
	return exitUsage
}

// flagSet returns a FlagSet that prints its usage (head, then the flags) on
// -h and reports errors itself.
func flagSet(name, head string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), head)
		fmt.Fprintln(fs.Output(), "\nFlags (one dash or two):")
		printFlags(fs)
	}
	return fs
}

// printFlags prints each flag once, with its short and long names together.
func printFlags(fs *flag.FlagSet) {
	names := map[string][]string{} // usage -> names
	var order []string
	fs.VisitAll(func(f *flag.Flag) {
		if _, ok := names[f.Usage]; !ok {
			order = append(order, f.Usage)
		}
		names[f.Usage] = append(names[f.Usage], f.Name)
	})
	for _, u := range order {
		ns := names[u]
		sort.Slice(ns, func(i, j int) bool { return len(ns[i]) < len(ns[j]) })
		var parts []string
		for _, n := range ns {
			if len(n) == 1 {
				parts = append(parts, "-"+n)
			} else {
				parts = append(parts, "--"+n)
			}
		}
		f := fs.Lookup(ns[0])
		typ, text := flag.UnquoteUsage(f)
		if typ != "" {
			typ = " " + typ
		}
		def := ""
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" && f.DefValue != "0s" {
			def = " (default " + f.DefValue + ")"
		}
		fmt.Fprintf(fs.Output(), "  %s%s\n    \t%s%s\n", strings.Join(parts, ", "), typ, text, def)
	}
}

// parseFlags parses args; it returns -1 to go on, or the exit status. A bad
// flag gets one line on stderr; -h or --help the whole usage on stdout.
// Single-letter flags may be grouped, as -nq for -n -q.
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) int {
	usage, out := fs.Usage, fs.Output()
	fs.Usage = func() {}
	fs.SetOutput(io.Discard)
	err := fs.Parse(groupedFlags(fs, args))
	fs.Usage = usage
	switch {
	case errors.Is(err, flag.ErrHelp):
		fs.SetOutput(stdout)
		fs.Usage()
		return 0
	case err != nil:
		return usageError(out, fs.Name(), "%s", flagError(fs, args, err))
	}
	fs.SetOutput(out)
	return -1
}

// groupedFlags splits grouped single-letter flags (-nq) among the flags
// at the start of args into one each (-n -q); the last of a group may be
// one that takes a value (-nk crc32, -nw30s). Other arguments, and
// everything from the first that is not a flag, are left as they are.
func groupedFlags(fs *flag.FlagSet, args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" || len(a) < 2 || a[0] != '-' {
			return append(out, args[i:]...) // NAME, or the end of the flags
		}
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if f := fs.Lookup(name); f != nil || a[1] == '-' || len(name) < 2 {
			out = append(out, a)
			if f != nil && !hasValue && !isBool(f) && i+1 < len(args) {
				i++
				out = append(out, args[i]) // its value
			}
			continue
		}
		group := a[1:]
		split := make([]string, 0, len(group))
		for j := 0; j < len(group); j++ {
			f := fs.Lookup(group[j : j+1])
			if f == nil {
				split = nil // not a group: let the flag package name it
				break
			}
			if !isBool(f) {
				split = append(split, "-"+group[j:j+1])
				if rest := group[j+1:]; rest != "" {
					split = append(split, strings.TrimPrefix(rest, "="))
				} else if i+1 < len(args) {
					i++
					split = append(split, args[i])
				}
				break
			}
			split = append(split, "-"+group[j:j+1])
		}
		if split == nil {
			out = append(out, a)
			continue
		}
		out = append(out, split...)
	}
	return out
}

// isBool tells whether f is a flag that takes no value.
func isBool(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// flagErr matches the flag package's errors, to say them as the rest of
// the tool does.
var (
	flagUndefined = regexp.MustCompile(`^flag provided but not defined: -+(.*)$`)
	flagNoValue   = regexp.MustCompile(`^flag needs an argument: -+(.*)$`)
	flagBadValue  = regexp.MustCompile(`^invalid (?:boolean )?value "(.*)" for (?:flag )?-+([^:]*): (.*)$`)
)

// flagError says err, from parsing args with fs, with the flag named as a
// user writes it and what its value should look like.
func flagError(fs *flag.FlagSet, args []string, err error) string {
	msg := err.Error()
	if m := flagUndefined.FindStringSubmatch(msg); m != nil {
		for _, a := range args {
			// As typed: -x, --frob (without its =value).
			if typed, _, _ := strings.Cut(a, "="); strings.HasPrefix(a, "-") && strings.TrimLeft(typed, "-") == m[1] {
				return "unknown flag " + typed
			}
		}
		return "unknown flag " + dashed(m[1])
	}
	if m := flagNoValue.FindStringSubmatch(msg); m != nil {
		return fmt.Sprintf("%s needs a value: %s", dashed(m[1]), valueHint(fs.Lookup(m[1])))
	}
	if m := flagBadValue.FindStringSubmatch(msg); m != nil {
		f := fs.Lookup(m[2])
		if f == nil || strings.HasSuffix(m[3], "parse error") || strings.HasSuffix(m[3], "value out of range") {
			return fmt.Sprintf("%s %q: want %s", dashed(m[2]), m[1], valueHint(f))
		}
		return fmt.Sprintf("%s %q: %s", dashed(m[2]), m[1], m[3]) // a Value's own error
	}
	return msg
}

// dashed is a flag's name as written: -n, or --timeout.
func dashed(name string) string {
	if len(name) == 1 {
		return "-" + name
	}
	return "--" + name
}

// valueHint says what a flag's value looks like.
func valueHint(f *flag.Flag) string {
	if f == nil {
		return "a value"
	}
	g, ok := f.Value.(flag.Getter)
	if !ok {
		return "a value"
	}
	switch g.Get().(type) {
	case time.Duration:
		return "a duration with its unit, as 500ms, 30s, 5m or 1h30m"
	case int, int64, uint, uint64:
		return "a whole number"
	case bool:
		return "true or false"
	}
	return "a value"
}

// usageError prints one line and returns the usage exit status.
func usageError(stderr io.Writer, cmd, format string, args ...any) int {
	fmt.Fprintf(stderr, "pglocks %s: %s (see 'pglocks %s --help')\n", cmd, fmt.Sprintf(format, args...), cmd)
	return exitUsage
}

// nameAndCommand splits what follows the flags of run and elect, NAME --
// COMMAND [ARG...], in args, which fs has parsed; with a migration tool's
// scheme NAME may be left out (-- COMMAND). The status is -1 to go on, or
// the usage error's.
func nameAndCommand(cmd string, fs *flag.FlagSet, args []string, scheme string, stderr io.Writer) (name string, argv []string, status int) {
	rest := fs.Args()
	if migrationSchemes[scheme] && len(args) > len(rest) && args[len(args)-len(rest)-1] == "--" {
		// -k goose -- COMMAND: the scheme's key needs no NAME (or, for a
		// database's, takes the one connected to).
		if len(rest) == 0 {
			return "", nil, usageError(stderr, cmd, "missing COMMAND after --")
		}
		return "", rest, -1
	}
	switch {
	case len(rest) == 0:
		return "", nil, usageError(stderr, cmd, "missing NAME")
	case len(args) > len(rest) && args[len(args)-len(rest)-1] == "--":
		// The flag package took the -- as the end of the flags: no NAME
		// before it.
		return "", nil, usageError(stderr, cmd, "missing NAME before --")
	case rest[0] == "":
		// An unset variable ($JOB) would share one lock among every job.
		return "", nil, usageError(stderr, cmd, "empty NAME")
	case len(rest) > 1 && rest[1] != "--" && strings.HasPrefix(rest[1], "-"):
		// Flags stop at the first argument that is not one, NAME.
		return "", nil, usageError(stderr, cmd, "flag %s after NAME %q: flags go before NAME", rest[1], rest[0])
	case len(rest) == 1 || rest[1] != "--":
		return "", nil, usageError(stderr, cmd, "missing -- between NAME and COMMAND")
	case len(rest) == 2:
		return "", nil, usageError(stderr, cmd, "missing COMMAND after --")
	}
	return rest[0], rest[2:], -1
}

// lookCommand finds COMMAND as a shell would: 127 if there is no such
// file, 126 if there is one that cannot be run (not executable, a
// directory). The status is -1 when path can be run.
func lookCommand(cmd, name string, stderr io.Writer) (path string, status int) {
	path, err := exec.LookPath(name)
	switch {
	case err == nil:
		return path, -1
	case errors.Is(err, exec.ErrNotFound), errors.Is(err, fs.ErrNotExist):
		// As a shell says it: a path names a file, a bare name is looked
		// for in $PATH.
		why := "command not found"
		if strings.Contains(name, "/") {
			why = "no such file or directory"
		}
		fmt.Fprintf(stderr, "pglocks %s: %s: %s\n", cmd, name, why)
		return "", exitNotFound
	}
	why := "cannot be run: " + err.Error()
	if fi, serr := os.Stat(name); serr == nil && fi.IsDir() {
		why = "is a directory"
	} else if errors.Is(err, fs.ErrPermission) {
		why = "permission denied (not an executable file)"
	}
	fmt.Fprintf(stderr, "pglocks %s: %s: %s\n", cmd, name, why)
	return "", exitCannotRun
}

// schemes are the ways a NAME becomes a key.
const schemes = "name (hashtextextended, the default), crc32 (django-pglocks 1.0.x; alias django-pglocks), " +
	"django-pglock (the maintained django-pglock: SHA-256), dotnet (.NET DistributedLock), " +
	"rails (Ruby's with_advisory_lock; prefix from WITH_ADVISORY_LOCK_PREFIX), node (npm advisory-lock), " +
	"id (NAME is an int64), pair (NAME is A,B); the migration tools' keys, for run to wait for a migration: " +
	"goose, prisma (no NAME), golang-migrate, rails-migrations (NAME is the database, " +
	"default the one connected to; golang-migrate's table public.schema_migrations)"

// migrationSchemes are the schemes of the migration tools' keys: goose and
// prisma take no NAME, golang-migrate and rails-migrations a database's.
var migrationSchemes = map[string]bool{"goose": true, "prisma": true, "golang-migrate": true, "rails-migrations": true}

// orDatabase returns name, or, for the schemes of a database's migration
// key given no NAME, the database cfg connects to (the role's name when it
// names none, as the server does).
func orDatabase(scheme, name string, cfg *pgxpool.Config) string {
	if name != "" || (scheme != "golang-migrate" && scheme != "rails-migrations") {
		return name
	}
	if cfg.ConnConfig.Database != "" {
		return cfg.ConnConfig.Database
	}
	return cfg.ConnConfig.User
}

// schemeAll is the scheme that only ls and key take.
const schemeAll = ", all (every scheme's key of NAME)"

// nameSchemes are the schemes -k all tries, in the order it prints them;
// id and pair count only when NAME parses as one.
var nameSchemes = []string{"name", "crc32", "django-pglock", "dotnet", "rails", "node", "id", "pair"}

// schemeKey is NAME's key under one scheme.
type schemeKey struct {
	scheme string
	key    pglocks.Key
}

// allKeys returns NAME's key under every scheme of nameSchemes that takes it.
func allKeys(name string) []schemeKey {
	var out []schemeKey
	for _, s := range nameSchemes {
		if k, err := parseKey(s, name); err == nil {
			out = append(out, schemeKey{s, k})
		}
	}
	return out
}

// parseKey turns name into a key by scheme.
func parseKey(scheme, name string) (pglocks.Key, error) {
	switch scheme {
	case "name", "":
		return pglocks.Name(name), nil
	case "crc32", "django-pglocks":
		return pglocks.NameCRC32(name), nil
	case "django-pglock":
		return pglocks.NameDjangoPglock(name), nil
	case "dotnet":
		return pglocks.NameDotNet(name), nil
	case "rails":
		return pglocks.NameRails(name, rubyToI(os.Getenv("WITH_ADVISORY_LOCK_PREFIX"))), nil
	case "node":
		return pglocks.NameNode(name), nil
	case "id":
		id, err := strconv.ParseInt(strings.TrimSpace(name), 10, 64)
		if err != nil {
			return pglocks.Key{}, fmt.Errorf("-k id: %q is not an int64", name)
		}
		return pglocks.ID(id), nil
	case "pair":
		a, b, ok := strings.Cut(name, ",")
		x, err1 := strconv.ParseInt(strings.TrimSpace(a), 10, 32)
		y, err2 := strconv.ParseInt(strings.TrimSpace(b), 10, 32)
		if !ok || err1 != nil || err2 != nil {
			return pglocks.Key{}, fmt.Errorf("-k pair: %q is not two int32 as A,B", name)
		}
		return pglocks.Pair(int32(x), int32(y)), nil
	case "goose", "prisma":
		if name != "" {
			return pglocks.Key{}, fmt.Errorf("-k %s takes no NAME (%s's key is fixed); for another lock ID use -k id", scheme, scheme)
		}
		if scheme == "goose" {
			return pglocks.MigrationGoose(), nil
		}
		return pglocks.MigrationPrisma(), nil
	case "golang-migrate":
		return pglocks.MigrationGolangMigrate(name, "", ""), nil
	case "rails-migrations":
		return pglocks.MigrationRails(name), nil
	case "all":
		return pglocks.Key{}, errors.New("-k all is only for ls and key (which show every scheme's key of NAME); this command takes one key: pick one scheme")
	}
	return pglocks.Key{}, fmt.Errorf("unknown key scheme %q; schemes: %s", scheme, schemes)
}

// rubyToI reads s as Ruby's String#to_i does, which is how with_advisory_lock
// reads its prefix: an optional sign and the leading digits, else 0.
func rubyToI(s string) int64 {
	s = strings.TrimLeft(s, " \t\n")
	end := 0
	if end < len(s) && (s[end] == '-' || s[end] == '+') {
		end++
	}
	for end < len(s) && (s[end] >= '0' && s[end] <= '9' || s[end] == '_' && end > 0) {
		end++
	}
	n, err := strconv.ParseInt(strings.ReplaceAll(s[:end], "_", ""), 10, 64)
	if err != nil {
		return 0
	}
	return n
}

// poolConfig resolves the database: dsn, else DATABASE_URL, else libpq's
// environment variables (which pgx reads for what the string leaves out).
func poolConfig(dsn string) (*pgxpool.Config, error) {
	if dsn == "" {
		dsn = os.Getenv("DATABASE_URL")
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("bad connection string: %w", err)
	}
	return cfg, nil
}

// keyFlag defines -k/--key, how names become keys, for ls and key, which
// also take -k all; usage starts its help.
func keyFlag(fs *flag.FlagSet, scheme *string, usage string) {
	for _, n := range []string{"k", "key"} {
		fs.StringVar(scheme, n, "name", usage+schemes+schemeAll)
	}
}

// oneKeyFlag defines -k/--key for the commands that take one key: run,
// elect and leader.
func oneKeyFlag(fs *flag.FlagSet, scheme *string) {
	for _, n := range []string{"k", "key"} {
		fs.StringVar(scheme, n, "name", "how NAME becomes a key, `SCHEME`: "+schemes)
	}
}

// dsnFlag defines -d/--dsn.
func dsnFlag(fs *flag.FlagSet, dsn *string) {
	for _, n := range []string{"d", "dsn"} {
		fs.StringVar(dsn, n, "", "connection string, a `DSN` (default: DATABASE_URL, else PGHOST, PGUSER, ...)")
	}
}

// openLocker connects with at most maxConns connections and opens a Locker
// with opts. On failure it says why on stderr and returns the exit status;
// otherwise the status is -1 and closeAll closes the Locker, then the pool.
func openLocker(ctx context.Context, prog string, cfg *pgxpool.Config, maxConns int32, stderr io.Writer,
	opts ...pglocks.Option) (pool *pgxpool.Pool, locker *pglocks.Locker, closeAll func(), status int) {
	cfg.MaxConns = maxConns
	pool, err := connect(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "pglocks %s: %v\n", prog, err)
		return nil, nil, nil, exitDatabase
	}
	locker, err = pglocks.New(pool, opts...)
	if err != nil {
		pool.Close()
		fmt.Fprintf(stderr, "pglocks %s: %v\n", prog, err)
		return nil, nil, nil, exitUsage
	}
	return pool, locker, func() { _ = locker.Close(); pool.Close() }, -1
}

// cut shortens s to at most n bytes, on a rune boundary (the server keeps
// 63 bytes of an application_name).
func cut(s string, n int) string {
	for len(s) > n {
		_, size := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-size]
	}
	return s
}

// Room for the application_name of run's and elect's sessions: the server
// keeps 63 bytes, and a leader's session ends in the 22-byte time of its
// election (" @20261203T141757.123Z"), which Lead adds after 41.
const (
	maxAppName       = 63
	maxLeaderAppName = 41
)

// appName is what "pglocks run" and "pglocks elect" call their sessions in
// pg_stat_activity, "pglocks CMD NAME on HOST[PID]", in at most max bytes.
// NAME is what matters most: to keep it whole the host is shortened first
// (its domain, then its middle, as "billing-7~x2x9z"), then left out, then
// the "pglocks " before CMD, then the pid; only then is NAME cut, keeping
// its start.
func appName(cmd, name, host string, pid, max int) string {
	tail := fmt.Sprintf("[%d]", pid)
	full := func(host string) string {
		return "pglocks " + cmd + " " + name + " on " + host + tail
	}
	if s := full(host); len(s) <= max {
		return s
	}
	if i := strings.IndexByte(host, '.'); i > 0 && net.ParseIP(host) == nil {
		host = host[:i]
		if s := full(host); len(s) <= max {
			return s
		}
	}
	// At least two bytes each side of the ~, or no host at all.
	if room := max - len(full("")); room >= 5 && utf8.ValidString(host) {
		head := cut(host, (room-1)/2)
		rest := host[len(head):]
		for len(rest) > room-1-len(head) {
			_, size := utf8.DecodeRuneInString(rest)
			rest = rest[size:]
		}
		return full(head + "~" + rest)
	}
	for _, s := range []string{
		"pglocks " + cmd + " " + name + tail,
		cmd + " " + name + tail,
		cmd + " " + name,
	} {
		if len(s) <= max {
			return s
		}
	}
	return cut(cmd+" "+name, max)
}

// connect opens a pool and checks that the server answers.
func connect(ctx context.Context, cfg *pgxpool.Config) (*pgxpool.Pool, error) {
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		pool.Close()
		var ce *pgconn.ConnectError
		if errors.As(err, &ce) && ce.Unwrap() != nil {
			// Without its "failed to connect to" head, which says it again.
			err = ce.Unwrap()
		}
		return nil, fmt.Errorf("cannot connect to %s:%d (user=%s database=%s): %s", cfg.ConnConfig.Host, cfg.ConnConfig.Port,
			cfg.ConnConfig.User, cfg.ConnConfig.Database, oneLine(err))
	}
	return pool, nil
}

// oneLine is err's text on one line. pgx lists each attempt on a line of its
// own, and with sslmode=prefer tries each address twice (with TLS, then
// without), so the same line often comes twice: it is said once.
func oneLine(err error) string {
	var lines []string
	for _, line := range strings.Split(err.Error(), "\n") {
		line = strings.Join(strings.Fields(line), " ")
		if line != "" && !slices.Contains(lines, line) {
			lines = append(lines, line)
		}
	}
	return strings.Join(lines, "; ")
}
