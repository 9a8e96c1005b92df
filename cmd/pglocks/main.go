// Command pglocks runs commands under PostgreSQL advisory locks, shared by a
// whole fleet of machines, and shows who holds which lock.
//
//	pglocks run [flags] NAME -- COMMAND [ARG...]   run COMMAND while holding NAME
//	pglocks elect [flags] NAME -- COMMAND [ARG...] run COMMAND while this process leads NAME
//	pglocks leader [flags] NAME                    who leads NAME
//	pglocks ls [flags]                             the advisory locks in the database
//	pglocks kill [flags] NAME | --pid PID          end the sessions that hold NAME
//	pglocks key [-k SCHEME] [--slots N] [--json] NAME  NAME's key, and the SQL that takes it
//	pglocks version
//
// Exit status of run: COMMAND's own (128+N if it was killed by signal N);
// 1, or -E's value, when the lock was not had (-n, -w, or the server ended
// the wait); 2 for usage errors; 3 when the database cannot be reached,
// fails or is a standby; 4 when the lock was lost while COMMAND ran and
// COMMAND was stopped; 126 when COMMAND exists but cannot be run; 127 when
// it is not found.
package main

import "os"

func main() { os.Exit(cli(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }
